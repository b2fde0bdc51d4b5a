"""`vcluster sandbox up / down` for real, on disk: a one-node sandbox whose node keeps its Docker
data on its own volume, moved to memory and back, then removed with its volume.

The two-node sandbox in memory (each node's own address, hostname and Docker engine, the image
and the model on every node, a second `up` that sends nothing, `down` without a trace) is the
e2e tier's own sandbox, checked in tests/e2e/test_sandbox.py: bringing up another here cost a
minute of every `make test`.

Brought up once for the module (a cold machine builds the images first: allow an hour).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cluster.sandbox.images import WORKLOAD_IMAGE
from cluster.sandbox.sandbox import Sandbox, sandbox_down, sandbox_up
from tests.support.sandbox_nodes import connect_nodes, docker_data_fs, labelled

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,  # a sandbox brought up (about 30 s), moved to memory and back (80 s)
    pytest.mark.timeout(3600),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's Docker daemon needs root"),
]

DISK_NAME = "itest-disk"  # its own name, network and node: another sandbox may be up meanwhile


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
def sandbox_on_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from _up_until_the_end(tmp_path_factory, DISK_NAME, 1, "disk")


def test_a_node_on_disk_keeps_its_docker_data_on_its_own_volume(sandbox_on_disk):
    (connection,) = connect_nodes(sandbox_on_disk).values()
    with connection:
        assert docker_data_fs(connection) != "tmpfs"
        argv = ["docker", "image", "inspect", "--format", "{{.Id}}", WORKLOAD_IMAGE]
        assert connection.run(argv, check=True).stdout.strip() == sandbox_on_disk.image_id
    assert len(labelled("volume", DISK_NAME)) == 1


def test_moving_a_sandbox_between_disk_and_memory_keeps_only_the_volumes_it_uses(
    sandbox_on_disk,
):
    def up(storage: str) -> str:
        lines: list[str] = []
        sandbox_up(1, sandbox_on_disk.workdir, DISK_NAME, lines.append, node_storage=storage)
        (connection,) = connect_nodes(sandbox_on_disk).values()
        with connection:
            return docker_data_fs(connection)

    assert up("memory") == "tmpfs"
    assert labelled("volume", DISK_NAME) == []
    assert up("disk") != "tmpfs"
    assert len(labelled("volume", DISK_NAME)) == 1


def test_down_of_a_sandbox_on_disk_removes_its_volume_too(sandbox_on_disk):
    sandbox_up(1, sandbox_on_disk.workdir, DISK_NAME, progress=print, node_storage="disk")
    assert len(labelled("volume", DISK_NAME)) == 1
    sandbox_down(DISK_NAME, progress=print)
    assert [labelled(kind, DISK_NAME) for kind in ("container", "volume", "network")] == [[]] * 3
