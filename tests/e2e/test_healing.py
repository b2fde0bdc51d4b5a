"""A vLLM that heals itself: faults injected for real on the running sandbox cluster, then NO
vcluster command until the endpoint answers a chat completion again; after that `up` is a no-op.

Faults: `kill -9` of the API server; `kill -9` of the engine core; the worker's container
crashing (its first process killed from the node); the worker node's Docker daemon restarted.
Each test ends with the cluster serving; they run in file order on one cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from cluster.inventory import load_inventory
from cluster.session import Session

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 900
HEAL_TIMEOUT_S = 900
"""vLLM's own start on this machine is 50 to 90 s (173 s on an AVX2 CPU); a heal adds the
supervisor's back-off, Ray's rejoin and the peer rank's restart."""


def vcluster(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(sandbox_inventory: Path):
    up = vcluster("up", str(sandbox_inventory), timeout=UP_TIMEOUT_S)
    assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
    return load_inventory(sandbox_inventory)


def on_node(cluster, node: str, argv: list[str]) -> str:
    """Run argv on a node's host (the sandbox node itself), over vcluster's SSH transport."""
    with Session(cluster) as session:
        session.open([n for n in cluster.nodes if n.node_name == node])
        return session.ssh(node).run(argv, check=True).stdout


def in_container(cluster, node: str, argv: list[str]) -> str:
    return on_node(cluster, node, ["docker", "exec", f"vcluster-{cluster.cluster}", *argv])


def supervisor_report(cluster, node: str) -> dict:
    return json.loads(in_container(cluster, node, ["cat", "/var/lib/vcluster/vllm.json"]))


def chat_answered_after(cluster, started: float) -> float:
    """Poll with chat completions until one is answered; seconds since `started`."""
    client = openai.OpenAI(
        base_url=f"http://{cluster.head.address}:{cluster.ports.vllm}/v1",
        api_key=cluster.secrets.api_key.resolve(),
        timeout=30,
        max_retries=0,
    )
    deadline = started + HEAL_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            reply = client.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            if reply.choices[0].message.content is not None:
                return time.monotonic() - started
        except openai.OpenAIError:
            pass
        time.sleep(2)
    pytest.fail(f"no chat completion within {HEAL_TIMEOUT_S} s of the fault")


def assert_up_is_a_no_op(inventory: Path) -> None:
    result = vcluster("up", str(inventory), timeout=UP_TIMEOUT_S)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "already up, nothing changed" in result.stdout, result.stdout


def restarts(inventory: Path) -> dict[str, tuple[int, str | None]]:
    document = json.loads(vcluster("status", "--json", str(inventory)).stdout)
    return {n["name"]: (n["vllm_restarts"], n["vllm_last_exit"]) for n in document["nodes"]}


def test_killing_the_api_server_heals_it(cluster, sandbox_inventory):
    head = cluster.head.node_name
    before = restarts(sandbox_inventory)[head][0]
    leader = supervisor_report(cluster, head)["pid"]
    started = time.monotonic()
    in_container(cluster, head, ["kill", "-9", str(leader)])
    print(f"healed in {chat_answered_after(cluster, started):.0f} s")
    count, cause = restarts(sandbox_inventory)[head]
    assert count == before + 1 and cause == "vllm serve killed by SIGKILL"
    zombies = in_container(cluster, head, ["ps", "-eo", "stat="]).split()
    assert not [state for state in zombies if state.startswith("Z")]
    assert_up_is_a_no_op(sandbox_inventory)


def test_killing_the_engine_core_heals_it(cluster, sandbox_inventory):
    head = cluster.head.node_name
    before = restarts(sandbox_inventory)[head][0]
    engine = in_container(cluster, head, ["pgrep", "-f", "^VLLM::EngineCore"]).split()
    assert engine, "no VLLM::EngineCore process on the head"
    started = time.monotonic()
    in_container(cluster, head, ["kill", "-9", engine[0]])
    print(f"healed in {chat_answered_after(cluster, started):.0f} s")
    count, cause = restarts(sandbox_inventory)[head]
    assert count > before and cause is not None
    assert_up_is_a_no_op(sandbox_inventory)


def test_a_crashed_worker_container_comes_back_and_serves(cluster, sandbox_inventory):
    worker = cluster.workers[0].node_name
    name = f"vcluster-{cluster.cluster}"
    first_process = on_node(cluster, worker, ["docker", "inspect", "-f", "{{.State.Pid}}", name])
    started = time.monotonic()
    on_node(cluster, worker, ["kill", "-9", first_process.strip()])
    print(f"healed in {chat_answered_after(cluster, started):.0f} s")
    restarted = on_node(cluster, worker, ["docker", "inspect", "-f", "{{.RestartCount}}", name])
    assert int(restarted) >= 1
    assert_up_is_a_no_op(sandbox_inventory)


def test_a_restarted_docker_daemon_brings_the_cluster_back(cluster, sandbox_inventory):
    worker = cluster.workers[0].node_name
    started = time.monotonic()
    on_node(cluster, worker, ["pkill", "-TERM", "-x", "dockerd"])
    print(f"healed in {chat_answered_after(cluster, started):.0f} s")
    assert_up_is_a_no_op(sandbox_inventory)
