"""The cluster lock and the Docker SDK, both riding on one real SSH connection."""

from __future__ import annotations

import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.nodes.lock import LOCK_DIR, ClusterBusy, ClusterLock, lock_path
from cluster.nodes.transport.docker import docker_client
from cluster.nodes.transport.ssh import SshConnection, SshTarget, SshTimeouts, connect
from cluster.sandbox.dockerd import LocalDocker, ensure_local_docker
from tests.support.ssh_lab import SshLab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab() -> Iterator[SshLab]:
    with tempfile.TemporaryDirectory() as workdir, SshLab(Path(workdir), 1) as lab:
        yield lab


def _connect(lab: SshLab) -> SshConnection:
    host = lab.hosts[0]
    target = SshTarget(
        name=host.name,
        host=host.address,
        port=host.port,
        key_file=lab.client_key,
        known_hosts=lab.known_hosts,
    )
    return connect(target, SshTimeouts(connect=5, command=30))


def test_a_second_run_is_refused_while_the_first_holds_the_lock(lab):
    first, second = _connect(lab), _connect(lab)
    try:
        with ClusterLock(first, "demo", "up"):
            with pytest.raises(ClusterBusy) as refused:
                ClusterLock(second, "demo", "up").__enter__()
            assert "another vcluster up/down is running" in refused.value.one_line()
        with ClusterLock(second, "demo", "up"):
            pass
    finally:
        first.close()
        second.close()


def test_locks_of_two_clusters_are_independent(lab):
    connection = _connect(lab)
    try:
        with ClusterLock(connection, "one", "up"), ClusterLock(connection, "two", "up"):
            pass
    finally:
        connection.close()


def test_a_crashed_holder_releases_the_lock(lab):
    holder, next_run = _connect(lab), _connect(lab)
    try:
        ClusterLock(holder, "demo", "down").__enter__()
        holder.close()  # what the controller dying looks like from the host
        deadline = time.monotonic() + 5
        while True:
            try:
                with ClusterLock(next_run, "demo", "down"):
                    break
            except ClusterBusy:
                assert time.monotonic() < deadline, "the lock outlived its holder"
                time.sleep(0.1)
    finally:
        next_run.close()


def test_the_lock_lies_in_a_folder_only_root_enters_even_one_left_open_before(lab):
    folder = Path(LOCK_DIR)  # the lab's hosts share this machine's file system
    if folder.exists():
        folder.chmod(0o755)  # as an older vcluster, or a careless hand, may have left it
    connection = _connect(lab)
    try:
        with ClusterLock(connection, "demo-folder", "up"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert folder.stat().st_uid == 0
            assert Path(lock_path("demo-folder")).is_file()
        assert not Path("/tmp/vcluster-demo-folder.lock").exists()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def local_docker() -> LocalDocker:
    return ensure_local_docker()


def test_the_docker_sdk_talks_to_the_hosts_engine_over_the_ssh_connection(lab, local_docker):
    connection = _connect(lab)
    client = docker_client(connection, docker_host=local_docker.host)
    try:
        info = client.info()
        assert info["ID"]
        assert client.version()["ApiVersion"]
        assert isinstance(client.images.list(), list)
    finally:
        client.close()
        connection.close()
