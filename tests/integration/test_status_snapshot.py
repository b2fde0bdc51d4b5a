"""`status` asks a node in one SSH exec: a real sshd of the lab, this machine's Docker daemon (the
lab's hosts share its file system, so their `docker` CLI reaches it with `--host`), and a small
real container labelled like a vcluster container, holding a supervisor state file."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from cluster.decide.plan import LABEL_EXECUTOR, LABEL_RAY, SUPERVISOR_STATE_DIR
from cluster.nodes.status_head import HEAD_NOT_RUNNING, head_ray_view
from cluster.nodes.status_snapshot import node_snapshot
from cluster.nodes.transport.ssh import SshConnection, SshTimeouts, connect
from cluster.sandbox.dockerd import LocalDocker, ensure_local_docker
from cluster.sandbox.images import BASE_IMAGE

STATE = {"state": "backoff", "spec_id": "s1", "restarts": 3, "last_exit": {"cause": "exit 1"}}


@pytest.fixture(scope="module")
def local_docker() -> LocalDocker:
    return ensure_local_docker()


@pytest.fixture
def connection(ssh_lab, target_for) -> Iterator[SshConnection]:
    ssh = connect(target_for("node01"), SshTimeouts(connect=5, command=60))
    yield ssh
    ssh.close()


@pytest.fixture(scope="module")
def container(local_docker) -> Iterator[str]:
    """A running container labelled as a worker of vLLM's own executor without Ray."""
    name = f"vcluster-status-test-{secrets.token_hex(3)}"
    write = f'mkdir -p {SUPERVISOR_STATE_DIR} && printf %s "$0" > {SUPERVISOR_STATE_DIR}/vllm.json'
    subprocess.run(
        local_docker.argv("run", "--detach", "--rm", "--name", name,
                          "--label", f"{LABEL_EXECUTOR}=mp", "--label", f"{LABEL_RAY}=no",
                          "--entrypoint", "sh", BASE_IMAGE, "-c", f"{write} && sleep 300",
                          json.dumps(STATE)),
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield name
    finally:
        subprocess.run(local_docker.argv("rm", "--force", name), capture_output=True)


def test_one_exec_gives_the_container_and_its_supervisors_report(
    connection, container, local_docker
):
    snapshot = node_snapshot(
        connection, container, head=False, default_executor="ray", docker_host=local_docker.host
    )
    assert snapshot.state is not None and snapshot.state.running
    assert snapshot.state.executor == "mp"  # the label wins over the inventory's default
    assert snapshot.supervised is not None
    assert (snapshot.supervised.state, snapshot.supervised.restarts) == ("backoff", 3)


def test_a_ray_worker_is_not_asked_for_a_supervisor_it_does_not_have(connection, local_docker):
    snapshot = node_snapshot(
        connection, "vcluster-no-such", head=False, default_executor="ray",
        docker_host=local_docker.host,
    )  # fmt: skip
    assert snapshot.state is None
    assert snapshot.supervised is None


def test_the_heads_ray_query_stops_at_a_container_without_ray(connection, container, local_docker):
    assert head_ray_view(connection, container, "127.0.0.1", 6379, local_docker.host) == (
        set(),
        {},
        None,
    )
    missing = head_ray_view(connection, "vcluster-no-such", "127.0.0.1", 6379, local_docker.host)
    assert missing == (set(), {}, HEAD_NOT_RUNNING)
