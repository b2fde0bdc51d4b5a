"""The router's model report as vcluster reads it, and what `vcluster models`, `status` and the
exporter show of sleeping models: a real `/vcluster/models` reply of the router (captured with
the stand-in models of tests/integration: a level-1 sleeper, a level-2 sleeper and a model whose
wake failed and which was started cold)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from cluster.cli.models import models_table
from cluster.cli.tables import status_view
from cluster.nodes.router_client import parse_models_report
from tests.unit.test_metrics import scrape, snapshot

CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "router" / "models-sleep.json"


def report():
    return {m.name: m for m in parse_models_report(json.loads(CAPTURE.read_text()))}


def rendered(table) -> str:
    console = Console(width=300, record=True)
    console.print(table)
    return console.export_text()


def test_a_sleeper_reads_as_sleeping_at_its_level_with_the_host_memory_it_holds():
    models = report()
    assert models["a"].shown_state == "sleeping (level 1)"
    assert models["b"].shown_state == "sleeping (level 2)"
    assert models["a"].host_memory_bytes > 32 * 1024**2  # the stand-in held 32 MiB at level 1
    assert (models["a"].wakes, models["c"].shown_state) == (1, "loaded")
    assert "CUDA error: out of memory" in models["c"].wake_failure


def test_vcluster_models_shows_the_level_the_host_memory_and_the_last_wake():
    text = rendered(models_table(tuple(report().values())))
    assert "sleeping (level 1)" in text and "sleeping (level 2)" in text
    assert "0.1 GiB" in text  # a's ~105 MiB
    assert "(1 wake(s))" in text


def test_status_names_the_sleepers_and_the_failed_wake():
    status = replace(snapshot(), models=tuple(report().values()))
    lines = [part for part in status_view(status) if isinstance(part, str)]
    text = "\n".join(lines)
    assert "model a: sleeping (level 1)" in text and "GiB host memory held" in text
    assert "last wake failed, started cold: /wake_up answered 500" in text


def test_the_exporter_gives_each_models_wakes_and_last_wake_time():
    families = scrape(replace(snapshot(), models=tuple(report().values())))
    wakes = {s.labels["model"]: s.value for s in families["vcluster_model_wakes"]}
    assert wakes == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert [s.labels["model"] for s in families["vcluster_model_last_wake_seconds"]] == ["a"]
    sleeping = {
        s.labels["model"]
        for s in families["vcluster_model_state"]
        if s.labels["state"] == "sleeping" and s.value == 1.0
    }
    assert sleeping == {"a", "b"}
