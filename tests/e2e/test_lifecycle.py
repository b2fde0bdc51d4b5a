"""`vcluster up / status / exec / logs` on the 2-node sandbox, through the CLI as a user runs
it: real sshd and Docker per node, a real Ray cluster, real vLLM (CPU) serving the tiny model
with pipeline parallel 2 across both nodes, and the official `openai` client. A stopped worker
and its repair run on the stand-in vLLM (the behaviour is vcluster's); `down` is in
test_down.py.

The steps depend on each other (the cluster is brought up once), so they run in file order.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from cluster.decide.inventory import Inventory
from cluster.nodes.session import Session
from tests.support.cli import REPO, UP_TIMEOUT_S, vcluster

pytestmark = [pytest.mark.e2e, pytest.mark.stage("real")]


@pytest.fixture
def inventory(cluster: Inventory) -> Path:
    assert cluster.source is not None
    return Path(cluster.source)


@pytest.fixture
def loaded(cluster: Inventory) -> Inventory:
    return cluster


@pytest.fixture
def api_key(loaded: Inventory) -> str:
    """The key `sandbox up` made; the inventory refers to it as `file:...`."""
    assert loaded.secrets.api_key is not None
    return loaded.secrets.api_key.resolve()


@pytest.fixture
def client(loaded: Inventory, api_key: str) -> openai.OpenAI:
    head = loaded.head.address
    return openai.OpenAI(base_url=f"http://{head}:{loaded.ports.vllm}/v1", api_key=api_key)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr


def status_document(inventory: Path) -> tuple[int, dict]:
    result = vcluster("status", "--json", str(inventory))
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_up_serves_the_model_with_pipeline_parallel_across_both_nodes(
    inventory, loaded, sandbox_cluster
):
    # the `up` that brought the session's cluster up (a developer's may have been up already)
    result = sandbox_cluster.brought_up.get(inventory) or vcluster("up", str(inventory))
    assert_ok(result)
    assert f"http://{loaded.head.address}:{loaded.ports.vllm}/v1" in result.stdout
    plan = json.loads(vcluster("plan", "--offline", "--json", str(inventory)).stdout)
    assert plan["pipeline_parallel"] == 2


def test_status_is_healthy_with_every_node_in_ray(inventory):
    code, document = status_document(inventory)
    assert code == 0, document
    assert document["healthy"] is True
    assert document["ray_nodes_alive"] == document["ray_nodes_expected"] == 2
    assert [n["vllm_process"] for n in document["nodes"]] == [True, True]
    assert document["vllm"]["models"] == ["tiny-llama"]


def test_the_worker_runs_the_second_pipeline_stage(inventory, loaded):
    worker = loaded.workers[0].node_name
    result = vcluster("exec", str(inventory), "--node", worker, "--", "ps", "-eo", "args")
    assert_ok(result)
    assert "--node-rank 1" in result.stdout and "--headless" in result.stdout


def test_openai_client_gets_a_chat_completion(client):
    reply = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    assert reply.choices[0].message.content is not None
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_openai_client_gets_a_completion(client):
    reply = client.completions.create(model="tiny-llama", prompt="The cluster", max_tokens=8)
    assert reply.choices[0].text is not None
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_openai_client_gets_a_streamed_chat_completion(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            stream=True,
        )
    )
    assert len(chunks) > 1


def test_a_wrong_api_key_gets_401(loaded):
    wrong = openai.OpenAI(
        base_url=f"http://{loaded.head.address}:{loaded.ports.vllm}/v1", api_key="wrong"
    )
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_exec_ray_status_lists_every_node(inventory, loaded):
    result = vcluster("exec", str(inventory), "--", "ray", "status")
    assert_ok(result)
    assert result.stdout.count("node_") >= len(loaded.nodes), result.stdout


def test_exec_without_a_command_is_an_interactive_shell_that_returns_its_exit_code(inventory):
    pid, terminal = pty.fork()
    if pid == 0:  # the child: vcluster on a real terminal, as a user types into it
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "cluster", "exec", str(inventory)])
    output = b""
    typed = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not typed and b"# " in output:  # the remote shell's prompt: type as a user would
            os.write(terminal, b"echo answer=$((6*7)); exit 3\n")
            typed = True
        ready, _, _ = select.select([terminal], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child closed the terminal: it exited
            break
        if not chunk:
            break
        output += chunk
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3, output
    assert b"answer=42" in output


def test_logs_show_vllms_log(inventory):
    result = vcluster("logs", str(inventory), "--tail", "200")
    assert_ok(result)
    assert "vLLM" in result.stdout or "vllm" in result.stdout


def test_up_on_a_healthy_cluster_changes_nothing(inventory):
    result = vcluster("up", str(inventory))
    assert_ok(result)
    assert "already up, nothing changed" in result.stdout


@pytest.mark.stage("standin")
def test_a_stopped_worker_container_is_reported_with_exit_code_3(standin_cluster):
    """`docker stop` is deliberate: the restart policy leaves the container stopped.
    (On the stand-in vLLM: what is under test is the supervisor, status and `up`.)"""
    loaded = standin_cluster
    inventory = Path(str(loaded.source))
    worker = loaded.workers[0].node_name
    with Session(loaded) as session:
        session.open([loaded.workers[0]])
        session.ssh(worker).run(["docker", "stop", f"vcluster-{loaded.cluster}"], check=True)
        exit_code = session.ssh(worker).run(
            ["docker", "inspect", "-f", "{{.State.ExitCode}}", f"vcluster-{loaded.cluster}"]
        )
    assert exit_code.stdout.strip() == "0"  # the supervisor stopped vLLM and Ray, then itself
    code, document = status_document(inventory)
    assert code == 3
    assert document["healthy"] is False
    by_name = {n["name"]: n for n in document["nodes"]}
    assert by_name[worker]["healthy"] is False


@pytest.mark.stage("standin")
def test_up_repairs_the_worker_and_the_cluster_is_healthy_again(standin_cluster):
    """On the stand-in vLLM, as the test before."""
    inventory = Path(str(standin_cluster.source))
    result = vcluster("up", str(inventory), timeout=UP_TIMEOUT_S)
    assert_ok(result)
    assert "recreated" in result.stdout
    code, document = status_document(inventory)
    assert code == 0, document
    assert document["healthy"] is True
