"""The collective check on the 2-node sandbox: gloo across both nodes' containers, for real.

It passes with figures; with the worker's link to the head cut (a firewall rule inside that
node) it names the worker within its time limit and leaves no process behind; and `up` runs it
before vLLM when the inventory asks. On the stand-in vLLM: the check is vcluster's program, run
beside vLLM (and a cut link would restart real vLLM's ranks, a minute each).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cluster.decide.inventory import Inventory
from cluster.sandbox.dockerd import ensure_local_docker
from tests.support.cli import UP_TIMEOUT_S, vcluster
from tests.support.faults import link_cut

pytestmark = [pytest.mark.e2e, pytest.mark.stage("standin")]

JOIN_TIMEOUT_S = 15
TIME_LIMIT_S = 60
# The program's own marker, in two pieces so that this test's command line does not hold it.
LEFT_BEHIND = """
import os
mark = "vcluster-collective" + ".pid"
def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""
print(sum(1 for pid in os.listdir("/proc") if pid.isdigit() and mark in cmdline(pid)))
"""


@pytest.fixture
def cluster(standin_cluster: Inventory) -> Inventory:
    return standin_cluster


@pytest.fixture(scope="module")
def bounded(standin_inventory: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in cluster's inventory with short join and time limits for the check."""
    data = yaml.safe_load(standin_inventory.read_text())
    data["collective"] = {"join_timeout_s": JOIN_TIMEOUT_S, "time_limit_s": TIME_LIMIT_S}
    path = tmp_path_factory.mktemp("collective") / "inventory.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def collective_rows(result: subprocess.CompletedProcess[str]) -> list[dict]:
    assert "Traceback" not in result.stderr, result.stderr
    return [r for r in json.loads(result.stdout) if r["name"] == "collective"]


def processes_of_the_check(inventory: Inventory) -> dict[str, int]:
    local = ensure_local_docker()
    counts = {}
    for node in inventory.nodes:
        node_container = f"vcluster-{inventory.cluster}-{node.node_name}"
        argv = local.argv("exec", node_container, "docker", "exec", f"vcluster-{inventory.cluster}",
                          "python3", "-c", LEFT_BEHIND)  # fmt: skip
        counts[node.node_name] = int(subprocess.run(argv, capture_output=True, text=True,
                                                    check=True).stdout.strip())  # fmt: skip
    return counts


def test_the_all_reduce_across_both_nodes_passes_with_its_figures(
    cluster: Inventory, bounded: Path
):
    result = vcluster("check", "--collective", "--max-size", "16", "--json", str(bounded))
    rows = collective_rows(result)
    assert rows and all(r["status"] == "PASS" for r in rows), rows
    figures = rows[0]["data"]
    assert figures["ranks"] == 2 and [s["size"] for s in figures["sizes"]] == [
        1 << 20,
        4 << 20,
        16 << 20,
    ]
    assert all(s["correct"] and s["busbw"] > 0 for s in figures["sizes"])
    assert "gloo on CPUs: no expectation" in rows[0]["detail"]
    table = vcluster("check", "--collective", "--max-size", "1", str(bounded))
    assert "all-reduce (float32, sum)" in table.stdout and "busbw" in table.stdout
    status = json.loads(vcluster("status", "--json", str(bounded)).stdout)
    assert status["collective"]["ok"] and status["collective"]["groups"][0]["busbw"] > 0
    assert processes_of_the_check(cluster) == {n.node_name: 0 for n in cluster.nodes}


def test_a_worker_cut_off_from_the_head_is_named_within_the_time_limit_and_nothing_is_left(
    cluster: Inventory, bounded: Path
):
    worker = cluster.workers[0].node_name
    started = time.monotonic()
    with link_cut(f"vcluster-{cluster.cluster}-{worker}", cluster.head.address):
        result = vcluster("check", "--collective", "--max-size", "1", "--json", str(bounded))
    took = time.monotonic() - started
    failed = [r for r in collective_rows(result) if r["status"] == "FAIL"]
    assert [r["node"] for r in failed] == [worker], failed
    assert f"{cluster.head.address}:29512 over eth0" in failed[0]["detail"]
    assert "TCP 29512" in failed[0]["remedy"]
    assert took < TIME_LIMIT_S + 30, f"the check took {took:.0f} s"
    assert processes_of_the_check(cluster) == {n.node_name: 0 for n in cluster.nodes}


def test_up_runs_the_check_before_vllm_when_the_inventory_asks(
    cluster: Inventory, bounded: Path, sandbox_cluster
):
    data = yaml.safe_load(bounded.read_text())
    data["collective"]["in_up"] = True
    data["collective"]["max_size_mib"] = 4
    asked = bounded.with_name("in-up.yaml")
    asked.write_text(yaml.safe_dump(data, sort_keys=False))
    sandbox_cluster.changed()
    assert vcluster("down", str(asked)).returncode == 0  # the check runs on new containers
    up = vcluster("up", str(asked), timeout=UP_TIMEOUT_S)
    assert up.returncode == 0, up.stderr
    lines = up.stderr.splitlines()
    check = next(i for i, line in enumerate(lines) if line.startswith("✓ Collective check: "))
    launch = next(i for i, line in enumerate(lines) if line.startswith("✓ Launching vLLM"))
    assert check < launch and "best busbw" in lines[check]
