"""The exporter never serves a stuck snapshot as the cluster's current health, and by default
only this machine reaches it."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.decide.inventory import load_inventory
from cluster.report.exporter import STALE_AFTER_INTERVALS, ClusterCollector
from tests.unit.test_metrics import snapshot

REPO = Path(__file__).resolve().parents[2]
INTERVAL_S = 15.0


def collector_with(refreshed_seconds_ago: float) -> ClusterCollector:
    collector = ClusterCollector(load_inventory(REPO / "inventory" / "gpu-2x8.yaml"), INTERVAL_S)
    collector._snapshot = (snapshot(), time.time() - refreshed_seconds_ago, 1.5)
    return collector


def samples(collector: ClusterCollector, name: str) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families.get(name)
    return {s.labels.get("node", ""): s.value for s in family.samples} if family else {}


def test_a_fresh_snapshot_is_served_as_it_was_taken():
    collector = collector_with(refreshed_seconds_ago=INTERVAL_S)
    assert samples(collector, "vcluster_node_up") == {"gpu-a": 1.0, "gpu-b": 1.0}
    assert samples(collector, "vcluster_vllm_up") == {"": 1.0}


def test_a_snapshot_older_than_the_stale_limit_reads_every_node_down(caplog):
    collector = collector_with(refreshed_seconds_ago=(STALE_AFTER_INTERVALS + 1) * INTERVAL_S)
    with caplog.at_level(logging.WARNING, logger="cluster.report.exporter"):
        assert samples(collector, "vcluster_node_up") == {"gpu-a": 0.0, "gpu-b": 0.0}
        assert samples(collector, "vcluster_node_healthy") == {"gpu-a": 0.0, "gpu-b": 0.0}
        assert samples(collector, "vcluster_vllm_up") == {"": 0.0}
        assert samples(collector, "vcluster_gpu_temperature_celsius") == {}
        assert samples(collector, "vcluster_ray_nodes_alive") == {"": 0.0}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "the stuck refresh is logged once, not on every scrape"
    assert "no status refresh finished for 75 s" in warnings[0]


def test_the_warning_shows_where_the_stuck_refresh_waits(caplog):
    collector = collector_with(refreshed_seconds_ago=(STALE_AFTER_INTERVALS + 1) * INTERVAL_S)
    release = threading.Event()

    def stuck_refresh_waiting_on_a_host() -> None:
        collector._refresher = threading.get_ident()
        release.wait()

    thread = threading.Thread(target=stuck_refresh_waiting_on_a_host)
    thread.start()
    try:
        while collector._refresher is None:
            time.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger="cluster.report.exporter"):
            samples(collector, "vcluster_node_up")
    finally:
        release.set()
        thread.join()
    assert "stuck_refresh_waiting_on_a_host" in caplog.records[0].getMessage()


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


def test_the_exporter_listens_on_loopback_unless_told_an_address(tmp_path: Path) -> None:
    outward = _outward_address()
    if outward is None:
        pytest.skip("this machine has no address but loopback to try from")
    # its nodes do not answer here: the first refresh fails fast, then the metrics are served
    inventory = REPO / "inventory" / "gpu-2x8.yaml"
    port = _free_port()
    env = {**os.environ, "VCLUSTER_STATE_DIR": str(tmp_path / "state")}
    exporter = subprocess.Popen(
        [sys.executable, "-m", "cluster", "exporter", str(inventory), "--port", str(port),
         "--interval", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _answers("127.0.0.1", port):
            assert exporter.poll() is None, (
                exporter.stderr.read().decode() if exporter.stderr else ""
            )
            assert time.monotonic() < deadline, "the exporter did not listen on 127.0.0.1"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert b"vcluster_node_up" in reply.read()
        assert not _answers(outward, port), f"the exporter answered on {outward}"
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
