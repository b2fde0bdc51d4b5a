"""The relay: one link of the chain that carries model files and images to the nodes.

Sent to each node as it is: the node's host runs `python3 -c <this source>` over SSH.
Standard library only, Python 3.8 syntax (the hosts' python3, any version from 3.8).

Modes (CONFIG, the first line of stdin, is JSON; tokens are in it, never in argv):
- `check`: given a list of files (path, size, sha256) in `entries`, print, for each, whether it is
  present and verified under `root`, and the free bytes there. A file verified before carries
  a stamp (size, mtime, sha256) and is not read again unless it changed.
- `relay`: receive the stream from upstream (stdin, or one TCP connection on the node's address
  that must open with this hop's token), write the items this node needs, and pass every byte
  on to the next node at once (its address, port and its own token in CONFIG's `next`).

The stream is a sequence of items. Each is a header (4-byte big-endian length, JSON: kind,
path, size, sha256, sinks: the nodes that keep it), then chunks (4-byte length, bytes), then
an empty chunk. A file is written beside its final name and renamed only once its size and
sha256 are right; an image goes into `docker load`. Events go to stdout as JSON lines; the
controller reads them over SSH (progress, each item's outcome, a lost neighbour).

Confinement: every write goes through directory descriptors opened from `root` down with
O_NOFOLLOW, so no symbolic link under the cache is ever followed for a write (one there is
refused); a link item's target must stay inside the cache; the stamps folder is the relay's
own; a file is refused as soon as more bytes than declared arrive, or when the disk lacks the
room; a frame longer than MAX_FRAME ends the relay before it is read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import selectors
import socket
import stat
import struct
import subprocess
import sys
import time
from typing import IO

CHUNK = 1 << 20
MAX_FRAME = 4 * CHUNK
"""The longest frame read; the controller sends chunks of at most CHUNK."""
PROGRESS_EVERY_S = 0.5
STAMPS = ".vcluster-verified"
PARTIAL = ".vcluster-partial"
ACCEPT_TIMEOUT_S = 120.0
"""How long a relay waits for its upstream, from the moment it listens (never extended)."""
TOKEN_TIMEOUT_S = 5.0
"""How long a new connection has to present the token before it is dropped."""
MAX_PENDING = 64
"""Connections waiting to present the token at once; the oldest is dropped for a newer one."""
CONNECT_TIMEOUT_S = 60.0
STALL_TIMEOUT_S = 300.0
"""An upstream that sends nothing this long is gone (likewise a next node that takes nothing)."""
KINDS = ("file", "link", "image", "end")
FOLDER = os.O_RDONLY | os.O_DIRECTORY
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Refused(ValueError):
    """A write the relay will not make: it would leave the cache, or touch what is not the
    stream's."""


class BadStream(Exception):
    """The stream breaks its format: the relay stops reading it."""


class NoUpstream(Exception):
    """No connection presented the token before the deadline."""

    def __init__(self, refused: int) -> None:
        super().__init__(refused)
        self.refused = refused


def components(path: str) -> list:
    """The names along `path` under the cache; refused when it could leave the cache, names the
    stamps folder, or ends like the relay's own partial files."""
    names = path.split("/")
    if path.startswith("/") or "\0" in path or any(n in ("", ".", "..") for n in names):
        raise Refused(f"refused path {path!r}: not inside the model cache")
    if names[0] == STAMPS:
        raise Refused(f"refused path {path!r}: the stamps folder is written by the relay only")
    if names[-1].endswith(PARTIAL):
        raise Refused(f"refused path {path!r}: {PARTIAL} names are the relay's own")
    return names


def check_target(path: str, target: str) -> None:
    """Refuse a link target that could resolve outside the cache: it must be relative, with
    `..` only in front, and climb no higher than the link's own folder is deep."""
    names = target.split("/")
    ups = 0
    while ups < len(names) and names[ups] == "..":
        ups += 1
    rest = names[ups:]
    depth = len(path.split("/")) - 1
    if (
        target.startswith("/")
        or "\0" in target
        or not rest
        or any(n in ("", ".", "..") for n in rest)
        or ups > depth
    ):
        raise Refused(
            f"refused link {path!r} -> {target!r}: its target is not inside the model cache"
        )


class Cache:
    """The model cache, written only through directory descriptors: no symbolic link under
    `root` is followed (`root` itself is the inventory's, and may be one)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def folder(self, names: list) -> int:
        """A descriptor of root/names..., each folder made where missing, none a link."""
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.root, FOLDER)
        try:
            for index, name in enumerate(names):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                try:
                    inner = os.open(name, FOLDER | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as error:
                    if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    where = "/".join(names[: index + 1])
                    mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                    if stat.S_ISLNK(mode):
                        raise Refused(
                            f"{where} is a symbolic link: the relay follows none under the model cache"
                        ) from None
                    raise Refused(f"{where} is not a folder") from None
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    def free(self, fd: int) -> int:
        info = os.fstatvfs(fd)
        return info.f_bavail * info.f_frsize

    def create(self, fd: int, name: str) -> IO[bytes]:
        """A new file `name` in folder `fd`, whatever was there under that name (never written
        through: a link or a hard link there is removed first)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd)
        return os.fdopen(os.open(name, NEW_FILE, 0o666, dir_fd=fd), "wb")

    def link(self, path: str, target: str) -> None:
        names = components(path)
        check_target(path, target)
        fd = self.folder(names[:-1])
        try:
            partial = names[-1] + PARTIAL
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial, dir_fd=fd)
            os.symlink(target, partial, dir_fd=fd)
            os.replace(partial, names[-1], src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            os.close(fd)

    def stamp(self, path: str, info: os.stat_result, sha256: str) -> None:
        """Vouch for the file at `path` as it is now (`info`): the relay's own write."""
        names = components(path)
        fd = self.folder([STAMPS, *names[:-1]])
        try:
            name = names[-1] + ".json"
            stamp = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": sha256}
            with self.create(fd, name + PARTIAL) as handle:
                handle.write(json.dumps(stamp).encode())
            os.replace(name + PARTIAL, name, src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            os.close(fd)


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
    with contextlib.suppress(OSError, ValueError):  # right, but not stamped: read again next time
        Cache(root).stamp(entry["path"], info, entry["sha256"])
    return "ok"


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


def await_upstream(server: socket.socket, token: bytes, accept_s: float, token_s: float):
    """The first connection that presents `token`; raises NoUpstream after `accept_s`.

    Connections wait side by side: one that sends nothing is dropped after `token_s` and holds
    no other up, and none moves the deadline.
    """
    deadline = time.monotonic() + accept_s
    pending: dict = {}  # connection -> [when it is dropped, the bytes it sent so far]
    refused = 0
    selector = selectors.DefaultSelector()
    server.setblocking(False)
    selector.register(server, selectors.EVENT_READ, None)

    def drop(connection: socket.socket) -> None:
        selector.unregister(connection)
        del pending[connection]
        connection.close()

    try:
        while True:
            now = time.monotonic()
            for connection in [c for c, (until, _) in pending.items() if until <= now]:
                drop(connection)
                refused += 1
            if now >= deadline:
                raise NoUpstream(refused)
            wake = min([deadline] + [until for until, _ in pending.values()])
            for key, _ in selector.select(max(0.0, wake - now)):
                if key.data is None:  # the listening socket
                    try:
                        connection, _ = server.accept()
                    except OSError:
                        continue
                    if len(pending) >= MAX_PENDING:
                        drop(next(iter(pending)))
                        refused += 1
                    connection.setblocking(False)
                    pending[connection] = [now + token_s, b""]
                    selector.register(connection, selectors.EVENT_READ, connection)
                    continue
                connection = key.data
                if connection not in pending:
                    continue  # dropped earlier in this pass
                offered = pending[connection][1]
                try:
                    data = connection.recv(len(token) - len(offered))
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                offered += data
                if data and len(offered) < len(token):
                    pending[connection][1] = offered
                    continue
                if data and hmac.compare_digest(offered, token):
                    selector.unregister(connection)
                    del pending[connection]
                    connection.setblocking(True)
                    return connection
                drop(connection)
                refused += 1
    finally:
        for connection in list(pending):
            connection.close()
        selector.close()


class Upstream:
    """The stream in: stdin, or the one TCP connection that opens with this hop's token."""

    def __init__(self, config: dict) -> None:
        self.stream = sys.stdin.buffer
        if config.get("listen"):
            server = socket.create_server((config["listen"], 0))
            try:
                emit(event="listening", port=server.getsockname()[1])
                connection = await_upstream(
                    server,
                    config["token"].encode(),
                    float(config.get("accept_timeout_s", ACCEPT_TIMEOUT_S)),
                    float(config.get("token_timeout_s", TOKEN_TIMEOUT_S)),
                )
            finally:
                server.close()  # one upstream, and no other connection afterwards
            connection.settimeout(STALL_TIMEOUT_S)
            self.stream = connection.makefile("rb")

    def read_exact(self, size: int) -> bytes:
        data = self.stream.read(size)
        if len(data) != size:
            raise EOFError
        return data

    def frame(self) -> bytes:
        (size,) = struct.unpack(">I", self.read_exact(4))
        if size > MAX_FRAME:
            raise BadStream(f"a frame of {size} bytes (at most {MAX_FRAME})")
        return self.read_exact(size) if size else b""


def parse_header(raw: bytes) -> dict:
    """An item's header, its fields of the right types, or BadStream."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadStream("a header that is not JSON") from None
    if not isinstance(header, dict) or header.get("kind") not in KINDS:
        raise BadStream("a header without a known kind")
    if header["kind"] == "end":
        return header
    kind, size = header["kind"], header.get("size")
    sized = isinstance(size, int) and not isinstance(size, bool) and size >= 0
    if (
        not isinstance(header.get("path"), str)
        or not isinstance(header.get("sinks"), list)
        or (kind == "file" and not (sized and isinstance(header.get("sha256"), str)))
        or (kind == "link" and not isinstance(header.get("target"), str))
    ):
        raise BadStream(
            f"a header with fields of the wrong types for {str(header.get('path'))[:200]!r}"
        )
    return header


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
                    (target["address"], target["port"]), timeout=CONNECT_TIMEOUT_S
                )
                self.socket.settimeout(STALL_TIMEOUT_S)
                self.socket.sendall(target["token"].encode())
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

    def abandon(self) -> None:
        """Cut the next node off: it sees its upstream lost."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None


class Sink:
    """Where this node keeps an item: a file written aside, or `docker load`."""

    def __init__(self, cache: Cache, header: dict) -> None:
        self.cache = cache
        self.header = header
        self.error: str | None = None
        self.digest = hashlib.sha256()
        self.written = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.handle: IO[bytes] | None = None
        self.folder: int | None = None
        self.name = ""
        try:
            if header["kind"] == "image":
                self.process = subprocess.Popen(
                    ["docker", "load"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
                self.handle = self.process.stdin
            else:
                names = components(header["path"])
                self.folder = cache.folder(names[:-1])
                self.name = names[-1]
                with contextlib.suppress(FileNotFoundError):  # a partial left by a cut-off run
                    os.unlink(self.name + PARTIAL, dir_fd=self.folder)
                free = cache.free(self.folder)
                if header["size"] > free:
                    raise Refused(
                        f"not enough disk space: {header['size']} bytes needed, "
                        f"{free} bytes free under {cache.root}"
                    )
                self.handle = cache.create(self.folder, self.name + PARTIAL)
        except (OSError, ValueError) as error:  # reported with the item; the stream goes on
            self.error = str(error)

    def write(self, data: bytes) -> None:
        if self.error is not None or self.handle is None:
            return
        if self.process is None and self.written + len(data) > self.header["size"]:
            self.fail(f"more than the {self.header['size']} bytes declared arrived")
            return
        try:
            self.handle.write(data)
            self.digest.update(data)
            self.written += len(data)
        except OSError as error:
            self.error = str(error)

    def fail(self, why: str) -> None:
        """Give the item up now: its partial file is removed."""
        self.error = self.error or why
        if self.process is None:
            self._close_partial()

    def _close_partial(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None
        if self.folder is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.name + PARTIAL, dir_fd=self.folder)
            os.close(self.folder)
            self.folder = None

    def finish(self) -> str | None:
        """None when the item is in place, else why not."""
        if self.process is not None:
            with contextlib.suppress(OSError):
                self.handle.close()  # type: ignore[union-attr]
            assert self.process.stdout is not None
            output = self.process.stdout.read().decode(errors="replace")
            if self.process.wait() != 0 or self.error:
                return f"docker load failed: {self.error or output.strip()[-300:]}"
            return None
        if self.error is None and self.written != self.header["size"]:
            self.error = f"{self.written} bytes arrived, {self.header['size']} expected"
        if self.error is None and self.digest.hexdigest() != self.header["sha256"]:
            self.error = f"sha256 {self.digest.hexdigest()[:12]}..., expected {self.header['sha256'][:12]}..."
        if self.error is None and self.handle is not None:
            try:
                self.handle.close()
            except OSError as error:
                self.error = str(error)
            self.handle = None
        if self.error is not None:
            self._close_partial()
            return self.error
        assert self.folder is not None
        try:
            os.replace(
                self.name + PARTIAL, self.name, src_dir_fd=self.folder, dst_dir_fd=self.folder
            )
            info = os.stat(self.name, dir_fd=self.folder, follow_symlinks=False)
            self.cache.stamp(self.header["path"], info, self.header["sha256"])
        except (OSError, ValueError) as error:
            return str(error)
        finally:
            os.close(self.folder)
            self.folder = None
        return None


def relay(config: dict) -> int:
    root, node = config["root"], config["node"]
    try:
        upstream = Upstream(config)
    except NoUpstream as gone:
        emit(event="no-upstream", seconds=config.get("accept_timeout_s", ACCEPT_TIMEOUT_S),
             refused=gone.refused)  # fmt: skip
        return 4
    except OSError:
        emit(event="no-upstream", seconds=0, refused=0)
        return 4
    downstream = Downstream(config)
    cache = Cache(root)
    item = None
    sink = None
    streamed = 0  # every item's bytes so far: the node's progress
    try:
        while True:
            raw = upstream.frame()
            header = parse_header(raw)
            downstream.send(raw, item)
            if header["kind"] == "end":
                break
            item = header["path"]
            if header["kind"] == "link":
                if node in header["sinks"]:
                    emit(event="item", path=item, error=_link(cache, header))
                continue
            sink = Sink(cache, header) if node in header["sinks"] else None
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
                emit(event="item", path=item, error=sink.finish(), bytes=streamed)
            sink = None
    except BadStream as error:
        if sink is not None:
            sink.fail(str(error))
        downstream.abandon()
        emit(event="bad-stream", item=item, error=str(error))
        return 5
    except (EOFError, OSError):
        if sink is not None:
            sink.fail("the stream ended")
        emit(event="upstream-lost", item=item)
        return 3
    downstream.close()
    emit(event="done")
    return 0


def _link(cache: Cache, header: dict) -> str | None:
    try:
        cache.link(header["path"], header["target"])
    except (OSError, ValueError) as error:
        return str(error)
    return None


if __name__ == "__main__":
    settings = json.loads(sys.stdin.buffer.readline())
    sys.exit(check(settings) if settings["mode"] == "check" else relay(settings))
