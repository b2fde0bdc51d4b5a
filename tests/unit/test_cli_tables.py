"""The tables a person reads (`cluster/cli/tables.py`): what each shows of its data."""

from __future__ import annotations

import datetime as dt
from io import StringIO

from rich.console import Console

from cluster.cli.tables import results_table, uptime
from cluster.decide.checks import CheckResult, Status


def printed(*parts: object) -> str:
    out = StringIO()
    console = Console(file=out, width=200)
    for part in parts:
        console.print(part)
    return out.getvalue()


def test_check_results_as_a_table():
    results = [
        CheckResult("docker", Status.PASS, "Docker 28.3.3", "a"),
        CheckResult("clock skew", Status.WARN, "b is 7.2 s ahead", None, "run NTP"),
    ]
    text = printed(results_table(results))
    assert "Docker 28.3.3" in text
    assert "cluster" in text
    assert "run NTP" in text


def test_uptime_reads_dockers_timestamps():
    now = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=dt.UTC)
    assert uptime("2026-11-25T09:47:30.123456789Z", now) == "2h12m"
    assert uptime("2026-11-25T11:58:55.5Z", now) == "1m04s"
    assert uptime("0001-01-01T00:00:00Z", now) == "-"
    assert uptime(None, now) == "-"
