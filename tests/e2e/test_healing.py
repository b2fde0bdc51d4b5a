"""A vLLM that heals itself: faults injected for real on the running sandbox cluster, then NO
vcluster command until the cluster serves again; after that `up` is a no-op.

Faults (tests/support/faults.py): `kill -9` of the API server, on real vLLM (both ranks restart:
the worker's because its peer went away), then, on the stand-in vLLM (what heals is vcluster's
supervisor, Docker's restart policy and Ray, not vLLM): `kill -9` of the process titled
`VLLM::EngineCore`; the worker's container crashing; the worker node's Docker daemon restarted.
They run in file order, each ending with the cluster serving. With the stand-in the head keeps
answering while the worker is away, so those heals wait for `status` to be healthy again (every
node's vLLM process running, both nodes in Ray) as well as for a chat completion.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.decide.inventory import Inventory
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


def heal(cluster: Inventory, fault) -> float:
    with nodes_of(cluster) as nodes:
        started = time.monotonic()
        fault(nodes)
    seconds = seconds_to_first_chat(cluster, started, HEAL_TIMEOUT_S)
    assert seconds is not None, f"no chat completion within {HEAL_TIMEOUT_S} s of the fault"
    print(f"{fault.__name__}: answered {seconds:.0f} s after the fault")
    return seconds


def heal_to_healthy(cluster: Inventory, fault, healed: Callable[[], bool]) -> None:
    """The fault, then (with no vcluster command but `status`, which changes nothing) `healed()`
    true, `status` healthy and a chat completion answered. The stand-in may answer before the
    fault is even seen: `healed` says it was (a restart counted, a container restarted)."""
    with nodes_of(cluster) as nodes:
        started = time.monotonic()
        fault(nodes)
    while not (healed() and healthy(inventory_of(cluster))):
        waited = time.monotonic() - started
        assert waited < HEAL_TIMEOUT_S, f"not healed within {HEAL_TIMEOUT_S} s of the fault"
        time.sleep(1)
    seconds = seconds_to_first_chat(cluster, started, HEAL_TIMEOUT_S)
    assert seconds is not None, f"no chat completion within {HEAL_TIMEOUT_S} s of the fault"
    print(f"{fault.__name__}: healthy and answering {seconds:.0f} s after the fault")


def inventory_of(cluster: Inventory) -> Path:
    assert cluster.source is not None
    return Path(cluster.source)


def assert_up_is_a_no_op(inventory: Path) -> None:
    result = vcluster("up", str(inventory), timeout=UP_TIMEOUT_S)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "already up, nothing changed" in result.stdout, result.stdout


def status_of(inventory: Path) -> dict:
    return json.loads(vcluster("status", "--json", str(inventory)).stdout)


def healthy(inventory: Path) -> bool:
    shown = vcluster("status", "--json", str(inventory))
    try:
        return json.loads(shown.stdout)["healthy"] is True
    except ValueError:  # no document while a node does not answer: not healthy yet
        return False


def restarts(inventory: Path) -> dict[str, tuple[int, str | None]]:
    document = status_of(inventory)
    return {n["name"]: (n["vllm_restarts"], n["vllm_last_exit"]) for n in document["nodes"]}


@pytest.mark.stage("real", last=True)  # the stage's other stories meet a cluster not healing
def test_killing_the_api_server_heals_it(cluster):
    inventory = inventory_of(cluster)
    head = cluster.head.node_name
    before = restarts(inventory)
    heal(cluster, kill_api_server)
    after = restarts(inventory)
    count, cause = after[head]
    assert count == before[head][0] + 1 and (cause or "").startswith("vllm serve killed by SIGKILL")
    worker = cluster.workers[0].node_name  # its rank restarted to meet the new head
    assert after[worker][0] == before[worker][0] + 1
    assert "peer rank went away" in (after[worker][1] or "")
    with nodes_of(cluster) as nodes:
        states = nodes.in_container(head, ["ps", "-eo", "stat="]).split()
    assert not [state for state in states if state.startswith("Z")], "zombies in the container"
    assert_up_is_a_no_op(inventory)


@pytest.mark.stage("standin")
def test_killing_the_engine_core_heals_it(standin_cluster):
    """On the stand-in vLLM: its `VLLM::EngineCore` child is killed, the supervisor restarts it."""
    inventory = inventory_of(standin_cluster)
    head = standin_cluster.head.node_name
    before = restarts(inventory)[head][0]
    heal_to_healthy(
        standin_cluster, kill_engine_core, lambda: restarts(inventory)[head][0] > before
    )
    count, cause = restarts(inventory)[head]
    assert count == before + 1 and "EngineCore" in (cause or ""), cause
    assert_up_is_a_no_op(inventory)


@pytest.mark.stage("standin")
def test_a_crashed_worker_container_comes_back_and_serves(standin_cluster):
    """On the stand-in vLLM: Docker restarts the container, the supervisor vLLM, Ray rejoins."""
    worker = standin_cluster.workers[0].node_name

    def restarted_by_docker() -> bool:
        with nodes_of(standin_cluster) as nodes:
            argv = ["docker", "inspect", "-f", "{{.RestartCount}}", nodes.container]
            return int(nodes.on_node(worker, argv)) >= 1

    heal_to_healthy(standin_cluster, crash_worker_container, restarted_by_docker)
    assert_up_is_a_no_op(inventory_of(standin_cluster))


@pytest.mark.stage("standin")
def test_a_restarted_docker_daemon_brings_the_cluster_back(standin_cluster):
    """On the stand-in vLLM, as the test before."""
    worker = standin_cluster.workers[0].node_name

    def started_at() -> str | None:
        """When the worker's container started; None while its Docker does not answer."""
        with nodes_of(standin_cluster) as nodes:
            argv = ["docker", "inspect", "-f", "{{.State.StartedAt}}", nodes.container]
            found = nodes.session.ssh(worker).run(argv)
        return found.stdout.strip() if found.ok else None

    before = started_at()
    heal_to_healthy(
        standin_cluster, restart_worker_docker, lambda: started_at() not in (None, before)
    )
    assert_up_is_a_no_op(inventory_of(standin_cluster))
