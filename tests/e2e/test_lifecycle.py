"""`vcluster up / status / exec / logs / down` on the 2-node sandbox, through the CLI as a user
runs it: real sshd and Docker per node, a real Ray cluster, real vLLM (CPU) serving the tiny
model with pipeline parallel 2 across both nodes, and the official `openai` client.

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
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from cluster.decide.inventory import load_inventory
from cluster.nodes.session import Session

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 900


def vcluster(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


@pytest.fixture(scope="module")
def inventory(sandbox_inventory: Path) -> Iterator[Path]:
    yield sandbox_inventory
    vcluster("down", str(sandbox_inventory))


@pytest.fixture(scope="module")
def loaded(inventory: Path):
    return load_inventory(inventory)


@pytest.fixture(scope="module")
def api_key(loaded) -> str:
    """The key `sandbox up` made; the inventory refers to it as `file:...`."""
    return loaded.secrets.api_key.resolve()


@pytest.fixture(scope="module")
def client(loaded, api_key) -> openai.OpenAI:
    head = loaded.head.address
    return openai.OpenAI(base_url=f"http://{head}:{loaded.ports.vllm}/v1", api_key=api_key)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr


def status_document(inventory: Path) -> tuple[int, dict]:
    result = vcluster("status", "--json", str(inventory))
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_up_serves_the_model_with_pipeline_parallel_across_both_nodes(inventory, loaded):
    result = vcluster("up", str(inventory), timeout=UP_TIMEOUT_S)
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


def test_a_stopped_worker_container_is_reported_with_exit_code_3(inventory, loaded):
    """`docker stop` is deliberate: the restart policy leaves the container stopped."""
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


def test_up_repairs_the_worker_and_the_cluster_is_healthy_again(inventory):
    result = vcluster("up", str(inventory), timeout=UP_TIMEOUT_S)
    assert_ok(result)
    assert "recreated" in result.stdout
    code, document = status_document(inventory)
    assert code == 0, document
    assert document["healthy"] is True


def test_down_leaves_no_container_and_a_second_down_succeeds(inventory, loaded):
    assert_ok(vcluster("down", str(inventory)))
    with Session(loaded) as session:
        session.open()
        for node in session.connections:
            listed = session.ssh(node).run(
                ["docker", "ps", "-aq", "--filter", f"label=vcluster.cluster={loaded.cluster}"]
            )
            assert listed.stdout.strip() == "", node
    assert_ok(vcluster("down", str(inventory)))
