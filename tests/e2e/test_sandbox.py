"""`vcluster sandbox up / down` for real, on the e2e tier's own sandbox (conftest.py brings it up
once through the CLI: two Docker-in-Docker nodes keeping their Docker data in memory), checked
through vcluster's own SSH transport with the sandbox's strict known_hosts; a second `up` keeps
it and sends nothing; `down`, the tier's very last test, removes it without a trace. (The disk
mode and the move between disk and memory: tests/integration/test_sandbox.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.decide.inventory import load_inventory
from cluster.nodes.transport.ssh import SshConnection
from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.images import WORKLOAD_IMAGE, image_id
from cluster.sandbox.sandbox import Sandbox, sandbox_down, sandbox_up
from tests.e2e.conftest import SANDBOX
from tests.support.sandbox_nodes import connect_nodes, docker_data_fs, labelled

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.stage("bare"),
    pytest.mark.skipif(
        bool(os.environ.get("VCLUSTER_E2E_INVENTORY")),
        reason="a developer's sandbox (VCLUSTER_E2E_INVENTORY) is not brought up or down here",
    ),
]

MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def second_up(sandbox_inventory: Path) -> tuple[Sandbox, list[str]]:
    """`sandbox up` again, as conftest.py's (its Sandbox, and the lines it printed)."""
    lines: list[str] = []
    again = sandbox_up(2, sandbox_inventory.parent, SANDBOX, lines.append, node_storage="memory")
    return again, lines


@pytest.fixture(scope="module")
def sandbox(second_up: tuple[Sandbox, list[str]]) -> Sandbox:
    return second_up[0]


@pytest.fixture(scope="module")
def connections(sandbox: Sandbox) -> Iterator[dict[str, SshConnection]]:
    opened = connect_nodes(sandbox)
    yield opened
    for connection in opened.values():
        connection.close()


def test_a_second_up_keeps_the_nodes_and_sends_nothing_again(second_up, sandbox_inventory):
    again, lines = second_up
    first = load_inventory(sandbox_inventory)
    assert [n.address for n in again.nodes] == [n.address for n in first.nodes]
    text = "\n".join(lines)
    assert "2 kept running" in text
    assert "already on every node" in text
    assert "copied to 0" in text


def test_the_inventory_names_the_nodes_the_cpu_image_and_the_model_in_the_cache(sandbox):
    inventory = load_inventory(sandbox.inventory)
    assert inventory.accelerator == "cpu"
    assert inventory.image == WORKLOAD_IMAGE
    assert [n.address for n in inventory.nodes] == [n.address for n in sandbox.nodes]
    assert inventory.head.node_name == "node-1"
    assert inventory.model is not None
    assert inventory.model.name.startswith(inventory.model_cache.rstrip("/") + "/")
    assert Path(inventory.ssh.key_file).parent == sandbox.workdir
    assert Path(inventory.ssh.known_hosts).parent == sandbox.workdir


def test_each_node_answers_with_its_own_address_and_hostname(sandbox, connections):
    for node in sandbox.nodes:
        connection = connections[node.name]
        assert connection.run(["hostname"], check=True).stdout.strip() == node.name
        addresses = connection.run(["ip", "-4", "-o", "addr", "show", "eth0"], check=True).stdout
        assert f" {node.address}/" in addresses


def test_each_node_runs_its_own_docker_engine(sandbox, connections):
    engine_ids = set()
    for node in sandbox.nodes:
        info = connections[node.name].run(
            ["docker", "info", "--format", "{{.ID}} {{.Driver}}"], check=True
        )
        engine_id, driver = info.stdout.split()
        engine_ids.add(engine_id)
        assert driver == "overlay2"
    assert len(engine_ids) == len(sandbox.nodes)


def test_each_node_keeps_its_docker_data_in_memory_when_asked_to(sandbox, connections):
    assert {name: docker_data_fs(c) for name, c in connections.items()} == {
        node.name: "tmpfs" for node in sandbox.nodes
    }
    local = ensure_local_docker()
    for node in sandbox.nodes:
        inspected = subprocess.run(
            local.argv("container", "inspect", "--format", "{{json .Mounts}}", node.container),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        mounts = json.loads(inspected.stdout)
        assert "/var/lib/docker" not in {m["Destination"] for m in mounts}  # no (anonymous) volume


def test_the_workload_image_has_the_same_id_on_every_node_as_here(sandbox, connections):
    local_id = image_id(ensure_local_docker(), WORKLOAD_IMAGE)
    argv = ["docker", "image", "inspect", "--format", "{{.Id}}", WORKLOAD_IMAGE]
    found = {name: c.run(argv, check=True).stdout.strip() for name, c in connections.items()}
    assert set(found.values()) == {local_id} == {sandbox.image_id}


def test_the_model_files_are_in_each_nodes_model_cache(sandbox, connections):
    inventory = load_inventory(sandbox.inventory)
    assert inventory.model is not None
    for connection in connections.values():
        listed = connection.run(["ls", inventory.model.name], check=True).stdout.split()
        assert set(listed) >= MODEL_FILES


@pytest.mark.stage("last")
def test_down_leaves_no_container_network_or_volume_and_twice_is_fine(sandbox_inventory):
    assert labelled("container", SANDBOX)
    sandbox_down(SANDBOX, progress=print)
    assert labelled("container", SANDBOX) == []
    assert labelled("network", SANDBOX) == []
    assert labelled("volume", SANDBOX) == []
    assert sandbox_down(SANDBOX, progress=print) == []
