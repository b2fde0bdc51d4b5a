"""Model files through the chain, over real sshd hosts in network namespaces (the SSH lab).

The lab's hosts share this machine's file system, so each node gets its own folder as its
model cache; the relays, the chain's TCP connections and the SSH channels are real.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.decide.chain import NoRoom
from cluster.decide.manifest import Item, hub_folder, model_items
from cluster.nodes.transfer import ChainNode, check_node, distribute
from cluster.nodes.transport.ssh import connect
from tests.integration.conftest import lab_target
from tests.support.ssh_lab import SshLab

MODEL = "acme/tiny-weights"
NODES = ("node01", "node02", "node03", "node04")


def write_model(folder: Path, shard_mib: int = 8) -> Path:
    """A model folder: config, tokenizer and two weight shards of random bytes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    for index in (1, 2):
        (folder / f"model-0000{index}-of-00002.safetensors").write_bytes(
            os.urandom(shard_mib << 20)
        )
    return folder


@pytest.fixture(autouse=True)
def own_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest keeps file hashes in vcluster's state folder: a fresh one per test."""
    monkeypatch.setenv("VCLUSTER_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def hosts_reach_each_other(ssh_lab: SshLab) -> Iterator[None]:
    """Let the lab's hosts open TCP connections to each other, as a cluster's nodes can.

    Docker's daemon on this machine sets the FORWARD policy to DROP, and the bridge's traffic
    passes iptables: without this rule only the root namespace reaches the hosts.
    """
    rule = ["FORWARD", "-i", ssh_lab.bridge, "-o", ssh_lab.bridge, "-j", "ACCEPT"]
    subprocess.run(["iptables", "-I", *rule], check=True)
    yield
    subprocess.run(["iptables", "-D", *rule], check=True)


@pytest.fixture
def nodes(
    ssh_lab: SshLab, tmp_path: Path, hosts_reach_each_other: None
) -> Iterator[list[ChainNode]]:
    connections = [connect(lab_target(ssh_lab, name)) for name in NODES]
    yield [
        ChainNode(name, ssh_lab.host(name).address, connection, str(tmp_path / "cache" / name))
        for name, connection in zip(NODES, connections, strict=True)
    ]
    for connection in connections:
        connection.close()


def snapshot(node: ChainNode) -> Path:
    folder = Path(node.root) / hub_folder(MODEL)
    revision = (folder / "refs" / "main").read_text()
    return folder / "snapshots" / revision


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_node_gets_the_model_in_the_hub_cache_layout_and_the_source_sends_it_once(
    nodes, tmp_path
):
    source = write_model(tmp_path / "source")
    items = model_items(source, MODEL, "/data/hf")
    outcome = distribute(nodes, items)
    assert outcome.failed == {} and outcome.complete == list(NODES)
    total = sum(p.stat().st_size for p in source.iterdir())
    assert outcome.bytes_sent == total + 40  # every file once, plus refs/main (a revision)
    for node in nodes:
        for original in source.iterdir():
            placed = snapshot(node) / original.name
            assert placed.is_symlink()  # into blobs/, as huggingface_hub lays it out
            assert sha256(placed) == sha256(original)
        assert not list(Path(node.root).rglob("*.vcluster-partial"))


def test_a_second_run_sends_nothing(nodes, tmp_path):
    items = model_items(write_model(tmp_path / "source"), MODEL, "/data/hf")
    distribute(nodes, items)
    again = distribute(nodes, items)
    assert (again.rounds, again.bytes_sent, again.failed) == (0, 0, {})


def test_a_corrupted_file_on_one_node_is_found_and_replaced_on_that_node_only(nodes, tmp_path):
    source = write_model(tmp_path / "source")
    items = model_items(source, MODEL, "/data/hf")
    distribute(nodes, items)
    shard = snapshot(nodes[2]) / "model-00001-of-00002.safetensors"
    with open(shard.resolve(), "r+b") as handle:  # same size, other bytes
        handle.seek(1000)
        handle.write(b"\0" * 16)
    before = {n.name: (snapshot(n) / "config.json").resolve().stat().st_mtime_ns for n in nodes}
    repaired = distribute(nodes, items)
    assert repaired.failed == {}
    assert repaired.bytes_sent == shard.stat().st_size  # that file, once
    assert sha256(shard) == sha256(source / shard.name)
    after = {n.name: (snapshot(n) / "config.json").resolve().stat().st_mtime_ns for n in nodes}
    assert after == before  # nothing else was written


def relay_pids(ssh_lab: SshLab, node: str) -> list[int]:
    namespace = ssh_lab.host(node).namespace
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
    return [
        int(pid) for pid in pids.split()
        if "The relay: one link of the chain" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    ]  # fmt: skip


def test_a_node_killed_mid_transfer_is_named_and_the_others_complete(nodes, tmp_path, ssh_lab):
    source = write_model(tmp_path / "source", shard_mib=256)
    items = model_items(source, MODEL, "/data/hf")
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=distribute(nodes, items)))
    runner.start()
    deadline = time.monotonic() + 60
    partial = list(Path(nodes[1].root).rglob("*.vcluster-partial"))
    while not partial or partial[0].stat().st_size < (16 << 20):
        assert time.monotonic() < deadline, "node02 never started writing"
        time.sleep(0.05)
        partial = list(Path(nodes[1].root).rglob("*.vcluster-partial"))
    for pid in relay_pids(ssh_lab, "node02"):
        os.kill(pid, signal.SIGKILL)
    runner.join(timeout=300)
    result = outcome["result"]
    assert set(result.failed) == {"node02"}
    assert "its relay ended during hub/models--acme--tiny-weights/blobs/" in result.failed["node02"]
    assert result.complete == ["node01", "node03", "node04"]
    for node in (nodes[0], nodes[2], nodes[3]):
        assert sha256(snapshot(node) / "model-00002-of-00002.safetensors") == sha256(
            source / "model-00002-of-00002.safetensors"
        )
    again = distribute(nodes, items)  # the next run completes the failed node
    assert again.failed == {} and again.complete == list(NODES)
    shard = source / "model-00001-of-00002.safetensors"
    assert again.bytes_sent < 2 * shard.stat().st_size + 1000  # what node02 lacked, not all


def test_nodes_without_room_are_refused_before_anything_is_sent(nodes, tmp_path):
    items = model_items(write_model(tmp_path / "source"), MODEL, "/data/hf")
    free = shutil.disk_usage(tmp_path).free  # the lab's hosts share this file system
    huge = Item("file", "huge.safetensors", size=free * 2, sha256="0" * 64, source="/dev/zero")
    with pytest.raises(NoRoom) as error:
        distribute(nodes, [*items, huge])
    assert error.value.where == "node01, node02, node03, node04"
    assert "node01 needs " in error.value.message and " free" in error.value.message
    assert not any(Path(n.root).joinpath("hub").exists() for n in nodes)  # nothing was sent


def test_a_look_without_reading_trusts_only_the_stamps(nodes, tmp_path):
    items = model_items(write_model(tmp_path / "source"), MODEL, "/data/hf")
    distribute(nodes, items)
    states, _ = check_node(nodes[0], items, rehash=False)  # what `status` shows
    assert set(states.values()) == {"ok"}
    config = snapshot(nodes[0]) / "config.json"
    os.utime(config.resolve(), ns=(1, 1))  # changed since its stamp: not vouched for
    states, _ = check_node(nodes[0], items, rehash=False)
    assert "unverified" in states.values()
    states, _ = check_node(nodes[0], items)  # what `check` does: reads it, and it is right
    assert set(states.values()) == {"ok"}
