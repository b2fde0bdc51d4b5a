"""The relay: one link of the chain that carries model files and images to the nodes.

Sent to each node as it is: the node's host runs `python3 -c <this source>` over SSH.
Standard library only (the hosts' python3, any version from 3.8).

Modes (CONFIG, the first line of stdin, is JSON; the transfer's token is in it, never in argv):
- `check`: given a list of files (path, size, sha256) in `entries`, print, for each, whether it is
  present and verified under `root`, and the free bytes there. A file verified before carries
  a stamp (size, mtime, sha256) and is not read again unless it changed.
- `relay`: receive the stream from upstream (stdin, or one TCP connection on the node's address
  that must open with the transfer's token), write the items this node needs, and pass every
  byte on to the next node at once (its address, port and the token in CONFIG).

The stream is a sequence of items. Each is a header (4-byte big-endian length, JSON: kind,
path, size, sha256, sinks: the nodes that keep it), then chunks (4-byte length, bytes), then
an empty chunk. A file is written beside its final name and renamed only once its size and
sha256 are right; an image goes into `docker load`. Events go to stdout as JSON lines; the
controller reads them over SSH (progress, each item's outcome, a lost neighbour).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import socket
import struct
import subprocess
import sys
import time
from typing import IO

CHUNK = 1 << 20
PROGRESS_EVERY_S = 0.5
STAMPS = ".vcluster-verified"
PARTIAL = ".vcluster-partial"
ACCEPT_TIMEOUT_S = 120.0
TOKEN_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 300.0
"""An upstream that sends nothing this long is gone."""


def emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def stamp_path(root: str, path: str) -> str:
    return os.path.join(root, STAMPS, path + ".json")


def file_state(root: str, entry: dict, rehash: bool = True) -> str:
    """`ok`, `missing`, `size` (another size) or `sha256` (other bytes) for one file; without
    `rehash`, `unverified` where no stamp vouches for the file (nothing is read)."""
    full = os.path.join(root, entry["path"])
    try:
        info = os.stat(full)
    except OSError:
        return "missing"
    if info.st_size != entry["size"]:
        return "size"
    try:
        with open(stamp_path(root, entry["path"])) as handle:
            stamp = json.load(handle)
        if stamp == {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": entry["sha256"]}:
            return "ok"
    except (OSError, ValueError):
        pass
    if not rehash:
        return "unverified"
    digest = hashlib.sha256()
    with open(full, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    if digest.hexdigest() != entry["sha256"]:
        return "sha256"
    write_stamp(root, entry["path"], entry["sha256"])
    return "ok"


def write_stamp(root: str, path: str, sha256: str) -> None:
    info = os.stat(os.path.join(root, path))
    stamp = stamp_path(root, path)
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp + PARTIAL, "w") as handle:
        json.dump({"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": sha256}, handle)
    os.replace(stamp + PARTIAL, stamp)


def check(config: dict) -> int:
    root = config["root"]
    entries = config["entries"]
    rehash = config.get("hash", True)
    states = {e["path"]: file_state(root, e, rehash) for e in entries if e["kind"] == "file"}
    links = {e["path"]: _link_state(root, e) for e in entries if e["kind"] == "link"}
    existing = root
    while not os.path.isdir(existing):  # what the files would go on, before it exists
        existing = os.path.dirname(existing)
    free = os.statvfs(existing)
    emit(event="check", files={**states, **links}, free=free.f_bavail * free.f_frsize)
    return 0


def _link_state(root: str, entry: dict) -> str:
    try:
        return "ok" if os.readlink(os.path.join(root, entry["path"])) == entry["target"] else "size"
    except OSError:
        return "missing"


class Upstream:
    """The stream in: stdin, or the one TCP connection that opens with the token."""

    def __init__(self, config: dict) -> None:
        self.stream = sys.stdin.buffer
        self.server = None
        if config.get("listen"):
            self.server = socket.create_server((config["listen"], 0))
            self.server.settimeout(ACCEPT_TIMEOUT_S)
            emit(event="listening", port=self.server.getsockname()[1])
            token = config["token"].encode()
            while True:
                connection, _ = self.server.accept()  # socket.timeout: no upstream came
                connection.settimeout(TOKEN_TIMEOUT_S)
                stream = connection.makefile("rb")
                try:
                    offered = stream.read(len(token))
                except OSError:
                    offered = b""
                if offered and hmac.compare_digest(offered, token):
                    connection.settimeout(STALL_TIMEOUT_S)
                    self.stream = stream
                    break
                connection.close()  # not the transfer's upstream

    def read_exact(self, size: int) -> bytes:
        data = self.stream.read(size)
        if len(data) != size:
            raise EOFError
        return data

    def frame(self) -> bytes:
        (size,) = struct.unpack(">I", self.read_exact(4))
        return self.read_exact(size) if size else b""


class Downstream:
    """The next node, while it takes the stream; a failure is reported once and then ignored."""

    def __init__(self, config: dict) -> None:
        self.socket = None
        self.name = None
        target = config.get("next")
        if target:
            self.name = target["name"]
            try:
                self.socket = socket.create_connection(
                    (target["address"], target["port"]), timeout=60
                )
                self.socket.settimeout(300)
                self.socket.sendall(config["token"].encode())
            except OSError as error:
                self.lost(error, None)

    def send(self, data: bytes, item: str | None) -> None:
        if self.socket is None:
            return
        try:
            self.socket.sendall(struct.pack(">I", len(data)) + data)
        except OSError as error:
            self.lost(error, item)

    def lost(self, error: OSError, item: str | None) -> None:
        emit(event="downstream-lost", node=self.name, item=item, error=str(error))
        if self.socket is not None:
            self.socket.close()
        self.socket = None

    def close(self) -> None:
        if self.socket is None:
            return
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)
            self.socket.recv(1)  # until the next node has read everything and closed
        self.socket.close()


class Sink:
    """Where this node keeps an item: a file written aside, or `docker load`."""

    def __init__(self, root: str, header: dict) -> None:
        self.header = header
        self.error: str | None = None
        self.digest = hashlib.sha256()
        self.written = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.handle: IO[bytes] | None = None
        self.final = os.path.join(root, header["path"])
        try:
            if header["kind"] == "image":
                self.process = subprocess.Popen(
                    ["docker", "load"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
                self.handle = self.process.stdin
            else:
                inside(header["path"])
                os.makedirs(os.path.dirname(self.final), exist_ok=True)
                self.handle = open(self.final + PARTIAL, "wb")  # noqa: SIM115
        except (OSError, ValueError) as error:  # reported with the item; the stream goes on
            self.error = str(error)

    def write(self, data: bytes) -> None:
        if self.error is not None or self.handle is None:
            return
        try:
            self.handle.write(data)
            self.digest.update(data)
            self.written += len(data)
        except OSError as error:
            self.error = str(error)

    def finish(self, root: str) -> str | None:
        """None when the item is in place, else why not."""
        try:
            if self.handle is not None:
                self.handle.close()
        except OSError as error:
            self.error = self.error or str(error)
        if self.process is not None:
            assert self.process.stdout is not None
            output = self.process.stdout.read().decode(errors="replace")
            if self.process.wait() != 0 or self.error:
                return f"docker load failed: {self.error or output.strip()[-300:]}"
            return None
        if self.error is None and self.written != self.header["size"]:
            self.error = f"{self.written} bytes arrived, {self.header['size']} expected"
        if self.error is None and self.digest.hexdigest() != self.header["sha256"]:
            self.error = f"sha256 {self.digest.hexdigest()[:12]}..., expected {self.header['sha256'][:12]}..."
        if self.error is not None:
            _remove(self.final + PARTIAL)
            return self.error
        try:
            os.replace(self.final + PARTIAL, self.final)
            write_stamp(root, self.header["path"], self.header["sha256"])
        except OSError as error:
            return str(error)
        return None


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def relay(config: dict) -> int:
    root, node = config["root"], config["node"]
    try:
        upstream = Upstream(config)
    except OSError:  # socket.timeout among them
        emit(event="no-upstream", seconds=ACCEPT_TIMEOUT_S)
        return 4
    downstream = Downstream(config)
    item = None
    streamed = 0  # every item's bytes so far: the node's progress
    try:
        while True:
            raw = upstream.frame()
            downstream.send(raw, item)
            header = json.loads(raw)
            if header["kind"] == "end":
                break
            item = header["path"]
            if header["kind"] == "link":
                if node in header["sinks"]:
                    emit(event="item", path=item, error=_link(root, header))
                continue
            sink = Sink(root, header) if node in header["sinks"] else None
            reported = time.monotonic()
            while True:
                data = upstream.frame()
                downstream.send(data, item)
                if not data:
                    break
                if sink is not None:
                    sink.write(data)
                streamed += len(data)
                if time.monotonic() - reported > PROGRESS_EVERY_S:
                    emit(event="progress", path=item, bytes=streamed)
                    reported = time.monotonic()
            if sink is not None:
                emit(event="item", path=item, error=sink.finish(root), bytes=streamed)
    except (EOFError, OSError):
        emit(event="upstream-lost", item=item)
        return 3
    downstream.close()
    emit(event="done")
    return 0


def inside(path: str) -> None:
    """Refuse a path that would leave the model cache (absolute, or with `..`)."""
    if os.path.isabs(path) or ".." in path.split("/"):
        raise ValueError(f"refused path {path!r}: not inside the model cache")


def _link(root: str, header: dict) -> str | None:
    path = os.path.join(root, header["path"])
    try:
        inside(header["path"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _remove(path + PARTIAL)
        os.symlink(header["target"], path + PARTIAL)
        os.replace(path + PARTIAL, path)
    except (OSError, ValueError) as error:
        return str(error)
    return None


if __name__ == "__main__":
    settings = json.loads(sys.stdin.buffer.readline())
    sys.exit(check(settings) if settings["mode"] == "check" else relay(settings))
