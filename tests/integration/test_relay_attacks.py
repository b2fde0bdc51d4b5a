"""The relay confined: each attack on it, played against real relays on the SSH lab's hosts.

Every test starts relays as a round does (`python3 -c` over SSH, the configuration on stdin)
and plays a hostile stream itself: into the first relay's SSH channel, or as a TCP upstream
that holds the hop's token. The relays run as root on a file system this machine shares, so a
write that escaped the cache would land in the test's folder: each test compares that folder,
outside the cache, before and after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import paramiko
import pytest

from cluster.decide.manifest import Item
from cluster.nodes.transfer import ChainNode, check_node, frame, relay_argv
from cluster.nodes.transport.ssh import connect
from cluster.remote.relay import CHUNK, MAX_FRAME, STAMPS
from tests.integration.conftest import lab_target
from tests.support.ssh_lab import SshLab

EVENTS_TIMEOUT_S = 60.0
"""Longer than any relay here may take; a relay still silent then has failed the test."""
END = frame(json.dumps({"kind": "end"}).encode())


class Relay:
    """A relay started on a lab host, as `run_round` starts one; the test is its upstream."""

    def __init__(self, node: ChainNode, **config: object) -> None:
        self.channel: paramiko.Channel = node.connection.open_channel(relay_argv())
        self.channel.settimeout(EVENTS_TIMEOUT_S)
        settings = {"mode": "relay", "root": node.root, "node": node.name, "token": None,
                    "next": None, "listen": None, **config}  # fmt: skip
        self.channel.sendall((json.dumps(settings) + "\n").encode())
        self.lines = self.channel.makefile("r")

    def next_event(self) -> dict:
        line = self.lines.readline()
        assert line, "the relay ended without a word"
        return json.loads(line)

    def port(self) -> int:
        event = self.next_event()
        assert event["event"] == "listening", event
        return int(event["port"])

    def send(self, frames: Sequence[bytes]) -> None:
        for data in frames:
            self.channel.sendall(data)

    def finish(self, frames: Sequence[bytes] = ()) -> tuple[list[dict], int]:
        """Send the last frames, close its stdin; every event it printed, and its exit status."""
        self.send(frames)
        self.channel.shutdown_write()
        events = [json.loads(line) for line in self.lines]
        return events, self.channel.recv_exit_status()


def header(kind: str, path: str, *, sinks: Sequence[str] = ("node01",), **fields: object) -> bytes:
    return frame(json.dumps({"kind": kind, "path": path, "sinks": list(sinks), **fields}).encode())


def file_frames(
    path: str, content: bytes, *, size: int | None = None, sinks: Sequence[str] = ("node01",)
) -> list[bytes]:
    """A file item: its header (`size` declared, the content's by default), chunks, the end."""
    declared = len(content) if size is None else size
    digest = hashlib.sha256(content).hexdigest()
    chunks = [frame(content[i : i + CHUNK]) for i in range(0, len(content), CHUNK)]
    return [header("file", path, size=declared, sha256=digest, sinks=sinks), *chunks, frame(b"")]


def let_go(connection: socket.socket) -> bool:
    """Whether the other end closed `connection` (a reset counts: it had unread bytes)."""
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True


def link_frames(path: str, target: str) -> list[bytes]:
    return [header("link", path, target=target)]


def outcomes(events: list[dict]) -> dict[str, str | None]:
    """Each item's outcome: None when it is in place, else the relay's reason."""
    return {e["path"]: e["error"] for e in events if e["event"] == "item"}


def tree(folder: Path, leave_out: Path) -> dict[str, tuple]:
    """Every path under `folder` but those under `leave_out`: its kind, size, time or target."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path == leave_out or leave_out in path.parents:
            continue
        info = path.lstat()
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
        detail = os.readlink(path) if kind == "link" else (info.st_size, info.st_mtime_ns)
        found[str(path.relative_to(folder))] = (kind, detail)
    return found


@pytest.fixture
def node(ssh_lab: SshLab, tmp_path: Path) -> Iterator[ChainNode]:
    """node01, its cache in the test's folder, beside a folder `outside` that holds a victim."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.txt").write_text("untouched")
    connection = connect(lab_target(ssh_lab, "node01"))
    yield ChainNode("node01", ssh_lab.host("node01").address, connection, str(tmp_path / "cache"))
    connection.close()


@pytest.fixture
def nothing_outside_the_cache(node: ChainNode, tmp_path: Path) -> Iterator[None]:
    """Asserts, after the test, that nothing outside node01's cache changed."""
    cache = Path(node.root)
    before = tree(tmp_path, cache)
    yield
    assert tree(tmp_path, cache) == before
    assert (tmp_path / "outside" / "victim.txt").read_text() == "untouched"


pytestmark = pytest.mark.usefixtures("nothing_outside_the_cache")


def test_a_link_whose_target_leaves_the_cache_is_refused_and_a_file_under_its_name_stays_inside(
    node, tmp_path
):
    outside = tmp_path / "outside"
    events, status = Relay(node).finish([
        *link_frames("hub/door", "../../outside"),  # from cache/hub: up two is the test's folder
        *link_frames("abs", str(outside)),
        *link_frames("hub/sneaky", "x/../../../outside"),  # `..` after a name: refused too
        *link_frames("hub/top", ".."),
        *link_frames("hub/door/pwned", "../blobs/a"),  # the link's folder is made, inside
        *file_frames("hub/door/victim.txt", b"written through the link"),
        *link_frames("snapshots/rev/config.json", "../../blobs/a"),  # as the hub layout does
        END,
    ])  # fmt: skip
    results = outcomes(events)
    for path, target in [
        ("hub/door", "../../outside"),
        ("abs", str(outside)),
        ("hub/sneaky", "x/../../../outside"),
        ("hub/top", ".."),
    ]:
        assert results[path] == (
            f"refused link {path!r} -> {target!r}: its target is not inside the model cache"
        )
    assert results["hub/door/pwned"] is None and results["hub/door/victim.txt"] is None
    assert results["snapshots/rev/config.json"] is None
    cache = Path(node.root)
    door = cache / "hub" / "door"
    assert door.is_dir() and not door.is_symlink()  # the file landed in a real folder, inside
    assert (door / "victim.txt").read_bytes() == b"written through the link"
    assert status == 0


def test_a_file_through_a_link_the_stream_made_is_refused(node):
    events, _ = Relay(node).finish([
        *link_frames("door", "blobs"),  # a target inside the cache: the link is made
        *file_frames("door/a", b"through the door"),
        *link_frames("door/b", "../blobs/a"),
        END,
    ])  # fmt: skip
    results = outcomes(events)
    assert results["door"] is None
    refused = "door is a symbolic link: the relay follows none under the model cache"
    assert results["door/a"] == refused and results["door/b"] == refused
    assert not (Path(node.root) / "blobs").exists()  # nothing written where the link points


def test_symbolic_links_already_in_the_cache_are_not_followed_for_writes(node, tmp_path):
    cache, outside = Path(node.root), tmp_path / "outside"
    (cache / "blobs").mkdir(parents=True)
    (cache / "hub").symlink_to(outside)  # a folder of the cache that is a link out
    (cache / "blobs" / "a").symlink_to(outside / "victim.txt")  # a file's name, a link out
    (cache / "blobs" / "b.vcluster-partial").symlink_to(outside / "victim.txt")  # its partial
    events, status = Relay(node).finish([
        *file_frames("hub/models--acme--tiny/blobs/x", b"through a link out"),
        *link_frames("hub/models--acme--tiny/snapshots/r/config.json", "../../blobs/x"),
        *file_frames("blobs/a", b"replaces the link"),
        *file_frames("blobs/b", b"not through its partial"),
        END,
    ])  # fmt: skip
    results = outcomes(events)
    refused = "hub is a symbolic link: the relay follows none under the model cache"
    assert results["hub/models--acme--tiny/blobs/x"] == refused
    assert results["hub/models--acme--tiny/snapshots/r/config.json"] == refused
    assert results["blobs/a"] is None and results["blobs/b"] is None
    assert not (cache / "blobs" / "a").is_symlink()  # the link itself was replaced
    assert (cache / "blobs" / "a").read_bytes() == b"replaces the link"
    assert (cache / "blobs" / "b").read_bytes() == b"not through its partial"
    assert not (cache / "blobs" / "b.vcluster-partial").exists()
    assert status == 0


def test_stamps_are_never_written_from_the_stream(node):
    real = b"the real bytes"
    forged = {"size": 6, "mtime_ns": 1, "sha256": hashlib.sha256(b"forged").hexdigest()}
    events, _ = Relay(node).finish([
        *file_frames("blobs/a", real),
        *file_frames(f"{STAMPS}/blobs/b.json", json.dumps(forged).encode()),
        *link_frames(f"{STAMPS}/blobs/c.json", f"../../{STAMPS}/blobs/a.json"),
        END,
    ])  # fmt: skip
    results = outcomes(events)
    assert results["blobs/a"] is None
    for path in (f"{STAMPS}/blobs/b.json", f"{STAMPS}/blobs/c.json"):
        assert results[path] == (
            f"refused path {path!r}: the stamps folder is written by the relay only"
        )
    stamps = Path(node.root) / STAMPS
    assert sorted(p.relative_to(stamps).as_posix() for p in stamps.rglob("*")) == [
        "blobs",
        "blobs/a.json",
    ]  # fmt: skip  (the relay's own stamp of what it verified)
    (Path(node.root) / "blobs" / "b").write_bytes(b"forged")  # what a forged stamp would cover
    items = [Item("file", "blobs/b", 6, forged["sha256"])]
    states, _ = check_node(node, items, rehash=False)
    assert states == {"blobs/b": "unverified"}


def test_a_stamps_folder_that_is_a_link_out_is_not_written_through(node, tmp_path):
    cache = Path(node.root)
    cache.mkdir()
    (cache / STAMPS).symlink_to(tmp_path / "outside")
    events, _ = Relay(node).finish([*file_frames("blobs/a", b"bytes"), END])
    assert outcomes(events)["blobs/a"] == (
        f"{STAMPS} is a symbolic link: the relay follows none under the model cache"
    )


def largest_while_held(file: Path, seconds: float = 1.0) -> int:
    """The largest size `file` had over `seconds`; -1 when it never existed."""
    largest = -1
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            largest = max(largest, file.stat().st_size)
        time.sleep(0.01)
    return largest


def test_a_file_larger_than_declared_is_refused_and_the_stream_goes_on(node):
    relay = Relay(node)
    big = file_frames("blobs/big", os.urandom(8 << 20), size=1)  # 8 MiB for a declared byte
    relay.send(big[:-1])  # held open before the item's end: it is refused at the first chunk
    assert largest_while_held(Path(node.root) / "blobs" / "big.vcluster-partial") <= 1
    events, status = relay.finish([big[-1], *file_frames("blobs/next", b"the stream goes on"), END])
    results = outcomes(events)
    assert results["blobs/big"] == "more than the 1 bytes declared arrived"
    assert results["blobs/next"] is None
    assert sorted(p.name for p in (Path(node.root) / "blobs").iterdir()) == ["next"]
    assert status == 0


def test_a_file_without_room_is_refused_before_a_byte_is_written(node, tmp_path):
    free = shutil.disk_usage(tmp_path).free  # the lab's hosts share this file system
    relay = Relay(node)
    relay.send([header("file", "blobs/huge", size=free * 2, sha256="0" * 64), frame(b"x" * 1000)])
    assert largest_while_held(Path(node.root) / "blobs" / "huge.vcluster-partial") == -1
    events, _ = relay.finish([frame(b""), *file_frames("blobs/small", b"fits"), END])
    results = outcomes(events)
    refused = results["blobs/huge"]
    assert refused is not None and refused.startswith(
        f"not enough disk space: {free * 2} bytes needed, "
    )
    assert refused.endswith(f" bytes free under {node.root}")
    assert results["blobs/small"] is None
    assert sorted(p.name for p in (Path(node.root) / "blobs").iterdir()) == ["small"]


@pytest.mark.parametrize("before", [[], file_frames("blobs/a", b"a whole file")[:2]])
def test_a_frame_longer_than_the_limit_ends_the_relay_without_waiting_for_its_bytes(node, before):
    relay = Relay(node, listen=node.address, token="t" * 32)
    port = relay.port()
    upstream = socket.create_connection((node.address, port), timeout=10)
    upstream.sendall(b"t" * 32)
    for data in before:
        upstream.sendall(data)
    upstream.sendall(struct.pack(">I", 0xFFFFFFFF))  # 4 GiB announced; the upstream stays open
    started = time.monotonic()
    event = relay.next_event()
    while event["event"] != "bad-stream":
        event = relay.next_event()
    assert time.monotonic() - started < 5
    assert event["error"] == f"a frame of {0xFFFFFFFF} bytes (at most {MAX_FRAME})"
    assert relay.channel.recv_exit_status() == 5
    assert let_go(upstream)
    upstream.close()
    assert not list(Path(node.root).rglob("*.vcluster-partial"))


def junk(address: str, port: int, kind: int) -> socket.socket:
    """A connection that never presents the token: silent, a few bytes, or a wrong token."""
    connection = socket.create_connection((address, port), timeout=10)
    connection.sendall([b"", b"GET / HTTP/1.0\r\n", os.urandom(32), b"\0" * 4096][kind % 4])
    return connection


def timed_transfer(node: ChainNode, junk_connections: int) -> float:
    """Seconds from an upstream's connection to the relay's `done`, for a 4 MiB file, with
    `junk_connections` opened on the relay's port just before."""
    token = os.urandom(16).hex()
    relay = Relay(node, listen=node.address, token=token)
    port = relay.port()
    held = [junk(node.address, port, kind) for kind in range(junk_connections)]
    stream = [token.encode(), *file_frames("blobs/a", os.urandom(4 << 20)), END]
    started = time.monotonic()
    with socket.create_connection((node.address, port), timeout=EVENTS_TIMEOUT_S) as upstream:
        upstream.sendall(b"".join(stream))
        events = [relay.next_event()]
        while events[-1]["event"] not in ("done", "upstream-lost", "bad-stream"):
            events.append(relay.next_event())
    elapsed = time.monotonic() - started
    assert events[-1]["event"] == "done" and outcomes(events) == {"blobs/a": None}, events
    for connection in held:  # every junk connection was let go, at the latest with the listener
        assert let_go(connection)
        connection.close()
    return elapsed


def test_junk_connections_do_not_delay_a_real_transfer_by_more_than_a_second(node):
    baseline = timed_transfer(node, junk_connections=0)
    shutil.rmtree(node.root)
    with_junk = timed_transfer(node, junk_connections=40)  # 20 silent or half a token among them
    assert with_junk - baseline < 1.0, (baseline, with_junk)
    assert (Path(node.root) / "blobs" / "a").stat().st_size == 4 << 20


def test_a_silent_connection_is_dropped_and_junk_does_not_extend_the_accept_deadline(node):
    relay = Relay(node, listen=node.address, token="t" * 32, accept_timeout_s=3, token_timeout_s=1)
    port = relay.port()
    listening = time.monotonic()
    silent = socket.create_connection((node.address, port), timeout=10)
    stop = threading.Event()
    opened: list[socket.socket] = []

    def keep_knocking() -> None:  # a new junk connection every 0.2 s, until the relay gives up
        kind = 0
        while not stop.wait(0.2):
            try:
                opened.append(junk(node.address, port, kind))
            except OSError:
                return  # the relay no longer listens
            kind += 1

    knocker = threading.Thread(target=keep_knocking)
    knocker.start()
    try:
        assert let_go(silent)  # dropped after the token timeout, not held
        dropped_after = time.monotonic() - listening
        event = relay.next_event()
        gave_up_after = time.monotonic() - listening
    finally:
        stop.set()
        knocker.join()
        for connection in [silent, *opened]:
            connection.close()
    assert 0.9 < dropped_after < 2.0
    assert event["event"] == "no-upstream" and event["refused"] >= 5
    assert 2.9 < gave_up_after < 4.0  # 3 s from listening, whatever came in meanwhile
    assert relay.channel.recv_exit_status() == 4
    assert len(opened) >= 10
