"""`vcluster sandbox up / down` for real: two Docker-in-Docker nodes, checked through vcluster's
own SSH transport with the sandbox's strict known_hosts, then removed without a trace. The two
nodes keep their Docker data in memory; a second, one-node sandbox checks the disk mode and the
move from disk to memory.

Brought up once for the module (a cold machine builds the images first: allow an hour).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.decide.inventory import load_inventory
from cluster.nodes.transport.ssh import SshConnection, SshTarget, SshTimeouts, connect
from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.images import WORKLOAD_IMAGE, image_id
from cluster.sandbox.nodes import SANDBOX_LABEL
from cluster.sandbox.sandbox import Sandbox, sandbox_down, sandbox_up

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,  # two sandboxes brought up (about 90 s), one moved to disk and back (80 s)
    pytest.mark.timeout(3600),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's Docker daemon needs root"),
]

NAME = "itest"  # its own name, network and nodes: a developer's sandbox may be up meanwhile
DISK_NAME = "itest-disk"
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def _up_until_the_end(
    factory: pytest.TempPathFactory, name: str, nodes: int, storage: str
) -> Iterator[Sandbox]:
    """A sandbox of its own for the module, removed whatever the tests did."""
    workdir = factory.mktemp(name)
    try:
        yield sandbox_up(nodes, workdir, name, progress=print, node_storage=storage)
    finally:
        sandbox_down(name, progress=print)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from _up_until_the_end(tmp_path_factory, NAME, 2, "memory")


@pytest.fixture(scope="module")
def sandbox_on_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from _up_until_the_end(tmp_path_factory, DISK_NAME, 1, "disk")


def _connect_all(sandbox: Sandbox) -> dict[str, SshConnection]:
    inventory = load_inventory(sandbox.inventory)
    opened = {}
    for node in inventory.nodes:
        target = SshTarget(
            name=node.name,
            host=node.address,
            key_file=Path(inventory.ssh.key_file),
            known_hosts=Path(inventory.ssh.known_hosts),
        )
        opened[node.name] = connect(target, SshTimeouts(connect=5, command=60))
    return opened


@pytest.fixture(scope="module")
def connections(sandbox: Sandbox) -> Iterator[dict[str, SshConnection]]:
    opened = _connect_all(sandbox)
    yield opened
    for connection in opened.values():
        connection.close()


def _docker_data_fs(connection: SshConnection) -> str:
    """The file system type under a node's /var/lib/docker: tmpfs, or ext2/ext3 for a volume."""
    return connection.run(["stat", "-f", "-c", "%T", "/var/lib/docker"], check=True).stdout.strip()


def _labelled(kind: str, sandbox: str = NAME) -> list[str]:
    local = ensure_local_docker()
    label = f"label={SANDBOX_LABEL}={sandbox}"
    argv = ["ps", "-aq", "--filter", label] if kind == "container" else [kind, "ls", "-q"]
    if kind != "container":
        argv += ["--filter", label]
    done = subprocess.run(local.argv(*argv), capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_inventory_names_the_nodes_the_cpu_image_and_the_model_in_the_cache(sandbox):
    inventory = load_inventory(sandbox.inventory)
    assert inventory.accelerator == "cpu"
    assert inventory.image == WORKLOAD_IMAGE
    assert [n.address for n in inventory.nodes] == [n.address for n in sandbox.nodes]
    assert inventory.head.node_name == "node-1"
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
    assert {name: _docker_data_fs(c) for name, c in connections.items()} == {
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
    for connection in connections.values():
        listed = connection.run(["ls", inventory.model.name], check=True).stdout.split()
        assert set(listed) >= MODEL_FILES


def test_a_second_up_keeps_the_nodes_and_sends_nothing_again(sandbox):
    lines: list[str] = []
    again = sandbox_up(2, sandbox.workdir, NAME, progress=lines.append, node_storage="memory")
    assert again.nodes == sandbox.nodes
    text = "\n".join(lines)
    assert "2 kept running" in text
    assert "already on every node" in text
    assert "copied to 0" in text


def test_down_leaves_no_container_network_or_volume_and_twice_is_fine(sandbox):
    assert _labelled("container")
    sandbox_down(NAME, progress=print)
    assert _labelled("container") == []
    assert _labelled("network") == []
    assert _labelled("volume") == []
    assert sandbox_down(NAME, progress=print) == []


def test_a_node_on_disk_keeps_its_docker_data_on_its_own_volume(sandbox_on_disk):
    (connection,) = _connect_all(sandbox_on_disk).values()
    with connection:
        assert _docker_data_fs(connection) != "tmpfs"
        argv = ["docker", "image", "inspect", "--format", "{{.Id}}", WORKLOAD_IMAGE]
        assert connection.run(argv, check=True).stdout.strip() == sandbox_on_disk.image_id
    assert len(_labelled("volume", DISK_NAME)) == 1


def test_moving_a_sandbox_between_disk_and_memory_keeps_only_the_volumes_it_uses(
    sandbox_on_disk,
):
    def up(storage: str) -> str:
        lines: list[str] = []
        sandbox_up(1, sandbox_on_disk.workdir, DISK_NAME, lines.append, node_storage=storage)
        (connection,) = _connect_all(sandbox_on_disk).values()
        with connection:
            return _docker_data_fs(connection)

    assert up("memory") == "tmpfs"
    assert _labelled("volume", DISK_NAME) == []
    assert up("disk") != "tmpfs"
    assert len(_labelled("volume", DISK_NAME)) == 1


def test_down_of_a_sandbox_on_disk_removes_its_volume_too(sandbox_on_disk):
    sandbox_up(1, sandbox_on_disk.workdir, DISK_NAME, progress=print, node_storage="disk")
    assert len(_labelled("volume", DISK_NAME)) == 1
    sandbox_down(DISK_NAME, progress=print)
    assert [_labelled(kind, DISK_NAME) for kind in ("container", "volume", "network")] == [[]] * 3
