"""Prometheus by the book: ``GET /metrics`` of a real service passes
``promtool check metrics``, serves OpenMetrics when asked, exports latency
histograms; the shipped alerting rules pass ``promtool check rules`` and their
unit tests (``promtool test rules``).

The promtool tests skip when promtool is not installed (Debian package
``prometheus``), unless ``BUDGET_REQUIRE_PROMTOOL=1`` (as in CI), where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from budget_actor import make_config, open_budget
from budget_actor.core.histogram import Histogram

from ._client import Launcher, Service, connect, http_get

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "docs" / "prometheus"
RULES = RULES_DIR / "budget_actor.rules.yml"
RULE_TESTS = RULES_DIR / "budget_actor.rules.test.yml"
REQUIRE_PROMTOOL = os.environ.get("BUDGET_REQUIRE_PROMTOOL") == "1"
# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if REQUIRE_PROMTOOL:
            pytest.fail("BUDGET_REQUIRE_PROMTOOL=1 but promtool is not installed")
        pytest.skip(
            "promtool is not installed (apt-get install prometheus);"
            " set BUDGET_REQUIRE_PROMTOOL=1 to make this a failure"
        )
    return found


def _run(*argv: str, stdin: bytes | None = None, cwd: Path | None = None) -> tuple[int, str]:
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=60, cwd=cwd, check=False)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


async def _get(url: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    if accept is None:
        reply = await http_get(url)
        return reply.status, reply.headers, reply.body
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.rpartition(":")
    stream = await trio.open_tcp_stream(name, int(port))
    async with stream:
        request = f"GET /{rest} HTTP/1.1\r\nhost: {host}\r\naccept: {accept}\r\n\r\n"
        await stream.send_all(request.encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def _busy_service(launcher: Launcher, database_url: str) -> Service:
    """A service that has counted costs, a duplicate, refused a bad cost,
    crossed a threshold and counted a cycle: every kind of figure is there."""
    service = await launcher.start(database_url, "--daily-cap", "1.00", "--alert-at", "0.5,0.8")
    async with connect(service.ws_url) as conn:
        for n, usd in enumerate(["0.25", "0.2", "0.15"]):
            await conn.cost(f"prom-{n}", usd)
        await conn.cost("prom-0", "0.25")  # duplicate
        await conn.send({"type": "cost", "dispatch_id": "bad", "usd": "-1"})
        assert (await conn.recv_type("error"))["code"] == "invalid_cost"
        await conn.send({"type": "cycle"})
        await conn.health()
    return service


def _families(text: str) -> dict[str, str]:
    """Metric family name -> type, from the TYPE lines."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))


# -- the real output of a running service ------------------------------------------


async def test_metrics_of_a_running_service_pass_promtool(
    database_url: str, launcher: Launcher
) -> None:
    promtool = _promtool()
    service = await _busy_service(launcher, database_url)
    status, headers, body = await _get(service.http_base + "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    code, output = await trio.to_thread.run_sync(
        lambda: _run(promtool, "check", "metrics", stdin=body)
    )
    assert (code, output.strip()) == (0, ""), f"promtool check metrics:\n{output}\n{body.decode()}"

    text = body.decode()
    families = _families(text)
    # Counters end in _total; histograms in seconds.
    counters = {name for name, kind in families.items() if kind == "counter"}
    assert counters >= {
        "budget_costs_total",
        "budget_duplicates_total",
        "budget_errors_total",
        "budget_restarts_total",
    }
    assert all(name.endswith("_total") for name in counters), counters
    for histogram in ("budget_ack_latency_seconds", "budget_store_commit_duration_seconds"):
        assert families.get(histogram) == "histogram", families
        count = re.search(rf"^{histogram}_count (\S+)$", text, flags=re.MULTILINE)
        inf = re.search(rf'^{histogram}_bucket{{le="\+Inf"}} (\S+)$', text, flags=re.MULTILINE)
        assert count and inf and float(count[1]) == float(inf[1]) >= 1, text
    # Three costs were acknowledged (the duplicate waits on a barrier).
    assert re.search(r"^budget_ack_latency_seconds_count 3\.0$", text, flags=re.MULTILINE), text
    # The figures are the service's.
    assert re.search(r'^budget_daily_spend_usd\{day="[-0-9]+"\} 0\.6$', text, re.MULTILINE), text
    assert re.search(r'^budget_alert_sent\{day="[-0-9]+",threshold="0.5"\} 1\.0$', text, re.M)
    assert re.search(r'^budget_errors_total\{code="invalid_cost"\} 1\.0$', text, re.M), text
    assert re.search(r"^budget_duplicates_total 1\.0$", text, re.M), text
    assert re.search(r'^budget_cycles\{day="[-0-9]+"\} 1\.0$', text, re.M), text
    last_cycle = re.search(r"^budget_last_cycle_timestamp_seconds (\S+)$", text, re.M)
    assert last_cycle and float(last_cycle[1]) > 1.7e9, text
    # The name promtool used to reject is gone (renamed budget_cycles).
    assert "budget_cycle_count" not in text


async def test_openmetrics_when_the_scraper_asks(database_url: str, launcher: Launcher) -> None:
    service = await _busy_service(launcher, database_url)
    status, headers, body = await _get(service.http_base + "/metrics", PROMETHEUS_ACCEPT)
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    # prometheus_client's OpenMetrics parser is strict: it raises on anything
    # the format does not allow.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["budget_costs"].type == "counter"
    assert [s.value for s in families["budget_costs"].samples] == [3.0]
    assert families["budget_ack_latency_seconds"].type == "histogram"
    assert families["budget_store_commit_duration_seconds"].type == "histogram"
    assert families["budget_daily_spend_usd"].samples[0].value == 0.6

    # The plain text format for a scraper that asks for nothing in particular.
    status, headers, body = await _get(service.http_base + "/metrics", "*/*")
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert not body.decode().endswith("# EOF\n")


async def test_rules_name_only_metrics_the_service_exports(
    sqlite_url: str, launcher: Launcher
) -> None:
    service = await launcher.start(sqlite_url)
    text = (await http_get(service.http_base + "/metrics")).body.decode()
    exported = set(_families(text))
    series = set()
    for name in exported:
        series.add(name)
        if _families(text)[name] == "histogram":
            series.update({f"{name}_bucket", f"{name}_count", f"{name}_sum"})
    rules = RULES.read_text()
    expressions = re.findall(r"expr: (?:>-\n((?:\s{10}.*\n)+)|(.*))", rules)
    named = set()
    for block, line in expressions:
        unquoted = re.sub(r'"[^"]*"', "", block or line)  # job="budget_actor" is no metric
        named.update(re.findall(r"\bbudget_[a-z0-9_]+", unquoted))
    assert named, "no budget_* metric found in the rules"
    assert named <= series, f"rules use metrics the service does not export: {named - series}"


# -- the rules ---------------------------------------------------------------------


def test_the_rules_pass_promtool_check() -> None:
    promtool = _promtool()
    code, output = _run(promtool, "check", "rules", str(RULES))
    assert code == 0, output
    assert "SUCCESS: 8 rules found" in output, output


def test_the_rules_pass_their_unit_tests() -> None:
    promtool = _promtool()
    code, output = _run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULES_DIR)
    assert code == 0, output
    assert "SUCCESS" in output, output


def test_the_example_prometheus_configuration_is_valid() -> None:
    promtool = _promtool()
    code, output = _run(promtool, "check", "config", "prometheus.yml", cwd=RULES_DIR)
    assert code == 0, output


# -- the histograms, in process ----------------------------------------------------


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = Histogram((0.01, 0.1, 1.0))
    histogram.observe(0.01)  # on a bound: counts in that bucket (le)
    histogram.observe(0.05, 3)
    histogram.observe(5.0)
    histogram.observe(-1.0)  # a clock that stepped back counts as 0
    assert histogram.cumulative() == [(0.01, 2), (0.1, 5), (1.0, 5), (float("inf"), 6)]
    assert histogram.count == 6
    assert histogram.sum == pytest.approx(0.01 + 0.15 + 5.0)
    with pytest.raises(ValueError):
        Histogram((0.1, 0.01))


async def test_acks_and_commits_are_observed(database_url: str) -> None:
    config = make_config(daily_cap="10")
    async with open_budget(config, database=database_url, spill=False) as budget:
        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(budget.record, f"h-{n}", Decimal("0.01"))
        await budget.record("h-0", "0.01")  # a duplicate is not a new ack latency
        stats = budget.stats
        assert stats.ack_latency.count == 50
        # Group commit: fewer transactions than costs, each observed.
        assert 1 <= stats.commit_duration.count <= 50
        assert stats.ack_latency.sum > 0 and stats.commit_duration.sum > 0
        # Each ack waited at least for the commit that made it durable.
        assert stats.ack_latency.sum >= stats.commit_duration.sum
