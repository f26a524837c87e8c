"""Developer sessions: ``nox -s tests lint typecheck bench demo fuzz``."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: SQLite, and PostgreSQL at BUDGET_TEST_DATABASE_URL."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "budget_actor", "tests", "bench", "examples", "noxfile.py")
    session.run(
        "ruff", "format", "--check", "budget_actor", "tests", "bench", "examples", "noxfile.py"
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".", "mypy")
    session.run("mypy", "--strict", "budget_actor", "examples")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks; prints a table and writes bench/results.json. ``-- NAME`` runs one."""
    session.install("-e", ".")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    session.install("-e", ".")
    session.run("budget-actor", "demo")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The property tests of the connection handler, run long: BUDGET_FUZZ_EXAMPLES
    examples per property (default here 2000; the normal suite runs 40)."""
    session.install("-e", ".[test]")
    examples = os.environ.get("BUDGET_FUZZ_EXAMPLES", "2000")
    session.run(
        "pytest",
        "tests/test_fuzz_server.py",
        "--hypothesis-show-statistics",
        *session.posargs,
        env={"BUDGET_FUZZ_EXAMPLES": examples},
    )
