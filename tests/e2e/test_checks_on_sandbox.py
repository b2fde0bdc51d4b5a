"""`vcluster check` and `vcluster exporter` on the sandbox (cpu mode), before the cluster is up,
and a worker whose link to the head is cut for real (a firewall rule inside that node)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.decide.inventory import load_inventory
from cluster.sandbox.dockerd import ensure_local_docker
from tests.support.faults import link_cut

pytestmark = [pytest.mark.e2e, pytest.mark.stage("bare")]

REPO = Path(__file__).resolve().parents[2]


def vcluster(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )  # fmt: skip


def check_results(inventory: Path) -> tuple[int, list[dict]]:
    result = vcluster("check", "--json", str(inventory))
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_check_passes_on_the_sandbox_and_skips_gpu_rules_with_the_reason(sandbox_inventory):
    code, results = check_results(sandbox_inventory)
    assert code == 0, [r for r in results if r["status"] == "FAIL"]
    gpu_rules = [r for r in results if r["name"] in ("gpus", "nvidia runtime", "topology")]
    assert gpu_rules and all(r["status"] == "SKIP" for r in gpu_rules)
    assert all("cpu" in r["detail"] for r in gpu_rules)
    reach = [r for r in results if r["name"] == "reach head"]
    assert [r["status"] for r in reach] == ["PASS"]


def test_a_worker_cut_off_from_the_head_fails_the_check_by_name(sandbox_inventory):
    inventory = load_inventory(sandbox_inventory)
    worker = inventory.workers[0].node_name
    container = f"vcluster-{inventory.cluster}-{worker}"
    with link_cut(container, inventory.head.address):
        code, results = check_results(sandbox_inventory)
    assert code == 1
    failed = [r for r in results if r["status"] == "FAIL"]
    assert [(r["name"], r["node"]) for r in failed] == [("reach head", worker)]
    assert inventory.head.address in failed[0]["detail"]
    code_after, _ = check_results(sandbox_inventory)
    assert code_after == 0


def test_an_unreachable_node_is_its_own_fail_row_and_the_others_are_still_checked(
    sandbox_inventory,
):
    inventory = load_inventory(sandbox_inventory)
    worker = inventory.workers[0].node_name
    local = ensure_local_docker()
    container = f"vcluster-{inventory.cluster}-{worker}"
    subprocess.run(local.argv("pause", container), check=True, capture_output=True)
    try:
        code, results = check_results(sandbox_inventory)
    finally:
        subprocess.run(local.argv("unpause", container), check=True, capture_output=True)
    assert code == 1
    failed = {(r["name"], r["node"]) for r in results if r["status"] == "FAIL"}
    assert ("ssh", worker) in failed
    head = inventory.head.node_name
    assert ("docker", head, "PASS") in {(r["name"], r["node"], r["status"]) for r in results}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_exporter_serves_every_node_and_marks_a_stopped_one_down(sandbox_inventory, tmp_path):
    inventory = load_inventory(sandbox_inventory)
    port = _free_port()
    log_path = tmp_path / "exporter.log"  # a file, not a pipe nobody reads: a full pipe stalls it
    exporter = subprocess.Popen(
        [sys.executable, "-m", "cluster", "exporter", str(sandbox_inventory),
         "--port", str(port), "--address", "127.0.0.1", "--interval", "3"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_path.open("w"),
    )  # fmt: skip
    local = ensure_local_docker()
    worker = inventory.workers[0].node_name
    container = f"vcluster-{inventory.cluster}-{worker}"
    try:
        assert _node_up(port)["node-1"] == 1.0
        subprocess.run(local.argv("pause", container), check=True)
        try:
            deadline = time.monotonic() + 60
            while _node_up(port).get(worker) != 0.0:
                assert time.monotonic() < deadline, (
                    f"the paused node was never marked down; the exporter's log:\n"
                    f"{log_path.read_text()}"
                )
                time.sleep(1)
            head_up = _node_up(port)[inventory.head.node_name]
            assert head_up == 1.0, log_path.read_text()
        finally:
            subprocess.run(local.argv("unpause", container), check=True)
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)


def _node_up(port: int) -> dict[str, float]:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            break
        except OSError:
            assert time.monotonic() < deadline, "the exporter never answered"
            time.sleep(0.5)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    if "vcluster_node_up" not in families:
        return {}
    return {s.labels["node"]: s.value for s in families["vcluster_node_up"].samples}
