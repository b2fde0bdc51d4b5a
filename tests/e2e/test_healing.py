"""A vLLM that heals itself: faults injected for real on the running sandbox cluster, then NO
vcluster command until the endpoint answers a chat completion again; after that `up` is a no-op.

Faults (tests/support/faults.py): `kill -9` of the API server; `kill -9` of the engine core; the
worker's container crashing; the worker node's Docker daemon restarted. They run in file order
on one cluster, each ending with the cluster serving.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.cli import UP_TIMEOUT_S, vcluster
from tests.support.faults import (
    crash_worker_container,
    kill_api_server,
    kill_engine_core,
    nodes_of,
    restart_worker_docker,
    seconds_to_first_chat,
)

pytestmark = pytest.mark.e2e

HEAL_TIMEOUT_S = 900
"""vLLM's own start on this machine is 50 to 90 s (173 s on an AVX2 CPU); a heal adds the
supervisor's back-off, Ray's rejoin and the peer rank's restart."""


def heal(cluster, fault) -> float:
    with nodes_of(cluster) as nodes:
        started = time.monotonic()
        fault(nodes)
    seconds = seconds_to_first_chat(cluster, started, HEAL_TIMEOUT_S)
    assert seconds is not None, f"no chat completion within {HEAL_TIMEOUT_S} s of the fault"
    print(f"{fault.__name__}: answered {seconds:.0f} s after the fault")
    return seconds


def assert_up_is_a_no_op(inventory: Path) -> None:
    result = vcluster("up", str(inventory), timeout=UP_TIMEOUT_S)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "already up, nothing changed" in result.stdout, result.stdout


def restarts(inventory: Path) -> dict[str, tuple[int, str | None]]:
    document = json.loads(vcluster("status", "--json", str(inventory)).stdout)
    return {n["name"]: (n["vllm_restarts"], n["vllm_last_exit"]) for n in document["nodes"]}


def test_killing_the_api_server_heals_it(cluster, sandbox_inventory):
    head = cluster.head.node_name
    before = restarts(sandbox_inventory)
    heal(cluster, kill_api_server)
    after = restarts(sandbox_inventory)
    count, cause = after[head]
    assert count == before[head][0] + 1 and (cause or "").startswith("vllm serve killed by SIGKILL")
    worker = cluster.workers[0].node_name  # its rank restarted to meet the new head
    assert after[worker][0] == before[worker][0] + 1
    assert "peer rank went away" in (after[worker][1] or "")
    with nodes_of(cluster) as nodes:
        states = nodes.in_container(head, ["ps", "-eo", "stat="]).split()
    assert not [state for state in states if state.startswith("Z")], "zombies in the container"
    assert_up_is_a_no_op(sandbox_inventory)


def test_killing_the_engine_core_heals_it(cluster, sandbox_inventory):
    head = cluster.head.node_name
    before = restarts(sandbox_inventory)[head][0]
    heal(cluster, kill_engine_core)
    count, cause = restarts(sandbox_inventory)[head]
    assert count == before + 1 and "EngineCore" in (cause or ""), cause
    assert_up_is_a_no_op(sandbox_inventory)


def test_a_crashed_worker_container_comes_back_and_serves(cluster, sandbox_inventory):
    heal(cluster, crash_worker_container)
    worker = cluster.workers[0].node_name
    with nodes_of(cluster) as nodes:
        name = nodes.container
        restarted = nodes.on_node(worker, ["docker", "inspect", "-f", "{{.RestartCount}}", name])
    assert int(restarted) >= 1
    assert_up_is_a_no_op(sandbox_inventory)


def test_a_restarted_docker_daemon_brings_the_cluster_back(cluster, sandbox_inventory):
    heal(cluster, restart_worker_docker)
    assert_up_is_a_no_op(sandbox_inventory)
