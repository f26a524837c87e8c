"""Shared fixtures: a fresh database per test, on SQLite and on the real PostgreSQL.

PostgreSQL is found at ``BUDGET_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Each test gets its own schema,
selected through the connection's ``search_path``, and the schema is dropped
afterwards. If the server cannot be reached, PostgreSQL tests are skipped with
the reason, unless ``BUDGET_REQUIRE_POSTGRES=1`` (as in CI), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from ._client import Launcher

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = os.environ.get("BUDGET_TEST_DATABASE_URL", DEFAULT_PG)
REQUIRE_PG = os.environ.get("BUDGET_REQUIRE_POSTGRES") == "1"


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files a service makes in its working directory (budget.db, spill
    files) land in this test's own directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a schema of this test's own."""
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL required but unreachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc}")
    schema = f"budget_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield _with_search_path(PG_URL, schema)
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'budget.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs twice: on SQLite and on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Starts `budget-actor serve` processes in this test's own directory;
    stops them all afterwards."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    launch = Launcher(workdir)
    try:
        yield launch
    finally:
        launch.close()
