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
- `save`: `docker save` of an image on the node that has it, to stdout, without the layers in
  `drop` (the nodes of the chain have them): the image's source for a chain.

The stream is a sequence of items. Each is a header (4-byte big-endian length, JSON: kind,
path, size, sha256, sinks: the nodes that keep it), then chunks (4-byte length, bytes), then
an empty chunk. A file is written beside its final name and renamed only once its size and
sha256 are right; an image goes into `docker load`, its tar read as it passes: every layer's
sha256 must be one of the image's diff IDs (and every content-named file's its name), and the
end of the tar is held back until they are, so `docker load` never completes an image that
arrived wrong. Events go to stdout as JSON lines; the controller reads them over SSH (progress,
each item's outcome, a lost neighbour).

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
from collections.abc import Iterable, Iterator
from typing import IO, Any

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


def emit(**event: object) -> None:
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


def await_upstream(
    server: socket.socket, token: bytes, accept_s: float, token_s: float
) -> socket.socket:
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
        or (kind == "image" and not _image_fields(header))
    ):
        raise BadStream(
            f"a header with fields of the wrong types for {str(header.get('path'))[:200]!r}"
        )
    return header


def _image_fields(header: dict) -> bool:
    """An image's header names its ID, its diff IDs and the layers the stream carries."""
    diff_ids, layers = header.get("diff_ids"), header.get("layers")
    if not isinstance(diff_ids, list) or not isinstance(layers, list):
        return False
    if not isinstance(header.get("by_name", False), bool):
        return False
    digests = [header.get("image_id"), *diff_ids]
    return all(isinstance(d, str) and d.startswith("sha256:") for d in digests) and all(
        d in diff_ids for d in layers
    )


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


BLOCK = 512
TRAILER = bytes(2 * BLOCK)
MAX_EXTENSION = 1 << 20
"""The longest pax or GNU long-name record read into memory."""
HEX = frozenset("0123456789abcdef")
TAR_KINDS = frozenset("01234567")
"""The member types read (with the extension headers x g L K): files, links, devices,
folders, fifos."""
MAX_MANIFEST = 1 << 20
"""The largest `manifest.json`, and the largest config read, that an image check keeps."""


class TarError(ValueError):
    """A tar that cannot be read, or an image file that arrived wrong."""


def _number(field: bytes) -> int:
    """A tar header's numeric field: octal, or base-256 for large values."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"a tar header with a bad number {text[:20]!r}") from None


def _pax_records(data: bytes) -> dict:
    records = {}
    while data:
        length = data.partition(b" ")[0]
        if not length.isdigit() or int(length) <= len(length) + 1:
            raise TarError("a pax header that cannot be read")
        size = int(length)
        record, data = data[:size], data[size:]
        key, _, value = record[len(length) + 1 : -1].partition(b"=")
        records[key.decode(errors="replace")] = value.decode(errors="replace")
    return records


class TarWalk:
    """A tar stream read as it passes, in pieces of any size (`feed`): `begin(name, kind, size)`
    says whether each member passes on; its data goes through `body` and `end`. What passes is
    returned by `feed`; the end-of-archive blocks are held back (`trailer()` gives them)."""

    def __init__(self) -> None:
        self.header = b""  # an incomplete header block
        self.pending = b""  # the raw extension headers of the next member
        self.extension = b""  # the data of the extension header being read
        self.overrides: dict = {}  # from pax or GNU long-name headers, for the next member
        self.kind = ""  # the extension being read (x, L, K, g)
        self.left = 0  # data and padding left of the current member or extension
        self.data_left = 0  # data left (without padding)
        self.passing = True
        self.state = "header"
        self.ended = False

    def begin(self, name: str, kind: str, size: int) -> bool:
        return True

    def body(self, data: bytes) -> None:
        pass

    def end(self) -> None:
        pass

    def trailer(self) -> bytes:
        return TRAILER

    def feed(self, data: bytes) -> bytes:
        out = []
        view = memoryview(data)
        at = 0
        while at < len(view):
            if self.state == "trailer":
                break  # zero blocks (and any record padding) after the end
            if self.state in ("data", "extension"):
                take = min(self.left, len(view) - at)
                piece = bytes(view[at : at + take])
                content = piece[: self.data_left]
                self.data_left -= len(content)
                self.left -= take
                at += take
                if self.state == "data":
                    if content:
                        self.body(content)
                    if self.passing:
                        out.append(piece)
                    if not self.left:
                        self.end()
                        self.state = "header"
                else:
                    self.pending += piece
                    self.extension += content
                    if not self.left:
                        self._extension_read()
                continue
            take = min(BLOCK - len(self.header), len(view) - at)
            self.header += bytes(view[at : at + take])
            at += take
            if len(self.header) == BLOCK:
                block, self.header = self.header, b""
                passed = self._header(block)
                if passed:
                    out.append(passed)
        return b"".join(out)

    def _header(self, block: bytes) -> bytes:
        if block == bytes(BLOCK):
            self.state, self.ended = "trailer", True
            return b""
        stored = _number(block[148:156])
        rest = block[:148] + b" " * 8 + block[156:]
        signed = sum(byte - 256 if byte > 127 else byte for byte in rest)
        if stored not in (sum(rest), signed):
            raise TarError("a tar header whose checksum is wrong")
        kind = chr(block[156]) if block[156] else "0"
        size = _number(block[124:136])
        padded = -(-size // BLOCK) * BLOCK
        if kind in "xLKg":
            if size > MAX_EXTENSION:
                raise TarError(f"an extension header of {size} bytes")
            self.kind, self.extension, self.pending = kind, b"", self.pending + block
            self.left, self.data_left, self.state = padded, size, "extension"
            if not padded:
                self._extension_read()
            return b""
        name = block[:100].split(b"\0", 1)[0].decode(errors="replace")
        if block[257:262] == b"ustar" and block[345] != 0:
            name = block[345:500].split(b"\0", 1)[0].decode(errors="replace") + "/" + name
        name = self.overrides.get("path", name)
        if "size" in self.overrides:
            if not self.overrides["size"].isdigit():
                raise TarError("a pax header with a size that is not a number")
            size = int(self.overrides["size"])
            padded = -(-size // BLOCK) * BLOCK
        self.overrides = {}
        if kind not in TAR_KINDS:
            raise TarError(f"a tar member of unknown type {kind!r}")
        if kind in "123456":  # links, devices, folders, fifos: no data
            size = padded = 0
        self.passing = self.begin(name, kind, size)
        raw, self.pending = self.pending + block, b""
        self.left, self.data_left = padded, size
        if padded:
            self.state = "data"
        else:
            self.end()
        return raw if self.passing else b""

    def _extension_read(self) -> None:
        self.state = "header"
        if self.kind == "x":
            self.overrides.update(_pax_records(self.extension))
        elif self.kind == "L":
            self.overrides["path"] = self.extension.split(b"\0", 1)[0].decode(errors="replace")


def _layer_digest(name: str) -> str | None:
    """The digest a member's name promises its bytes have, if it names one:
    `blobs/sha256/HEX` (Docker 25 and later), `HEX.json` (the image's config before 25)."""
    parts = name.split("/")
    if len(parts) == 3 and parts[:2] == ["blobs", "sha256"] and set(parts[2]) <= HEX:
        return "sha256:" + parts[2]
    if len(parts) == 1 and len(parts[0]) == 69 and parts[0].endswith(".json"):
        return "sha256:" + parts[0][:64] if set(parts[0][:64]) <= HEX else None
    return None


def _is_legacy_layer(name: str) -> bool:
    """`V1ID/layer.tar`: a layer of a `docker save` before Docker 25 (named by a v1 ID)."""
    parts = name.split("/")
    return len(parts) == 2 and parts[1] == "layer.tar" and len(parts[0]) == 64


class ImageCheck(TarWalk):
    """An image's tar on its way into `docker load`: every layer's sha256 against the image's
    diff IDs (a content-named file against its name), every layer the stream carries seen,
    the image's config, and `manifest.json` naming that config and those layers; the tar's
    end is given only by `trailer()` after `problem()`.

    `by_name` (a source in containerd's image store): its save names gzip-compressed layers by
    their compressed digest, so each file is checked against its own name only, and the
    manifest's layers must be files that arrived so checked."""

    def __init__(self, header: dict) -> None:
        super().__init__()
        self.image = header["path"]
        self.image_id = header["image_id"]
        self.diff_ids = set(header["diff_ids"])
        self.layer_count = len(header["diff_ids"])
        self.by_name = bool(header.get("by_name", False))
        self.expected = set() if self.by_name else set(header["layers"])
        self.seen: set = set()
        self.arrived: dict = {}  # member name -> the sha256 it arrived with
        self.digest: Any = None  # the sha256 of the member read now, when it is checked
        self.promised: str | None = None  # what the member's name promises; None: a diff ID
        self.member = ""
        self.kept: bytearray | None = None  # the bytes of manifest.json (or a config) read now
        self.manifest: bytes | None = None
        self.small: dict = {}  # digest -> bytes of the small checked files (by_name: configs)

    def begin(self, name: str, kind: str, size: int) -> bool:
        self.digest = None
        self.kept = None
        self.member = name
        if kind in "07":
            if name == "manifest.json":
                if size > MAX_MANIFEST:
                    raise TarError(f"a manifest.json of {size} bytes")
                self.kept = bytearray()
            self.promised = _layer_digest(name)
            if self.promised is not None or _is_legacy_layer(name):
                self.digest = hashlib.sha256()
                if self.by_name and self.promised is not None and size <= MAX_MANIFEST:
                    self.kept = bytearray()
        return True

    def body(self, data: bytes) -> None:
        if self.digest is not None:
            self.digest.update(data)
        if self.kept is not None:
            self.kept += data

    def end(self) -> None:
        kept, self.kept = self.kept, None
        if self.member == "manifest.json" and kept is not None:
            self.manifest = bytes(kept)
        if self.digest is None:
            return
        got = "sha256:" + self.digest.hexdigest()
        self.digest = None
        if self.promised is not None and got != self.promised:
            raise TarError(f"{self.member} arrived with {got[:19]}, not {self.promised[:19]}")
        if self.promised is None and got not in self.diff_ids:
            raise TarError(f"layer {self.member} arrived with {got[:19]}, not a layer of the image")
        self.seen.add(got)
        self.arrived[self.member] = got
        if kept is not None and sum(map(len, self.small.values())) + len(kept) <= 8 * MAX_MANIFEST:
            self.small[got] = bytes(kept)

    def problem(self) -> str | None:
        """Why the image must not load, or None."""
        if not self.ended:
            return "the image's tar ended early: refused, nothing loaded"
        lacking = sorted(self.expected - self.seen)
        if lacking:
            return f"layer {lacking[0][:19]} did not arrive: refused, nothing loaded"
        if self.image_id not in self.seen:
            return (
                f"the image's config {self.image_id[:19]} did not arrive: refused, nothing loaded"
            )
        why = self._manifest_problem()
        return f"{why}: refused, nothing loaded" if why else None

    def _manifest_problem(self) -> str | None:
        """Why `manifest.json` does not describe exactly the declared image, or None."""
        if self.manifest is None:
            return "the image's tar has no manifest.json"
        try:
            entries = json.loads(self.manifest)
        except (ValueError, RecursionError):
            return "the image's manifest.json is not JSON"
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
            return "the image's manifest.json does not name exactly one image"
        config, layers = entries[0].get("Config"), entries[0].get("Layers")
        if not isinstance(config, str) or not isinstance(layers, list):
            return "the image's manifest.json names no config or layers"
        if not self._is_the_config(config):
            return (
                f"the image's manifest.json names config {config[:80]!r}, not {self.image_id[:19]}"
            )
        if len(layers) != self.layer_count:
            return f"the image's manifest.json names {len(layers)} layer(s), not {self.layer_count}"
        for layer in layers:
            if not isinstance(layer, str) or not self._is_a_layer(layer):
                return f"the image's manifest.json names layer {str(layer)[:80]!r}, not one of the image's"
        return None

    def _is_the_config(self, path: str) -> bool:
        digest = _layer_digest(path)
        if digest is None or self.arrived.get(path) != digest:
            return False
        if digest == self.image_id:
            return True
        # containerd's store names an image by its index or manifest, not its config: there
        # the config (checked against its name) must list the image's layers, in order
        if not self.by_name or digest not in self.small:
            return False
        try:
            rootfs = json.loads(self.small[digest]).get("rootfs", {})
            return isinstance(rootfs, dict) and set(rootfs.get("diff_ids") or ()) == self.diff_ids
        except (ValueError, RecursionError, AttributeError):
            return False

    def _is_a_layer(self, path: str) -> bool:
        if self.by_name:
            return path in self.arrived and _layer_digest(path) is not None
        if path in self.arrived:
            return self.arrived[path] in self.diff_ids
        digest = _layer_digest(path)
        if digest is not None:
            return digest in self.diff_ids  # left out: the node has it by this name
        # a pre-25 layer left out by the filter: `docker load` finds it by its chain or fails
        return _is_legacy_layer(path)


def chain_ids(diff_ids: list) -> list:
    """Each layer's chain ID: the layer with every layer below it, as Docker's layer store
    names it."""
    chains: list = []
    for diff_id in diff_ids:
        chains.append(
            diff_id
            if not chains
            else "sha256:" + hashlib.sha256((chains[-1] + " " + diff_id).encode()).hexdigest()
        )
    return chains


def _go_json(value: object) -> str:
    """JSON as Go's encoding/json writes it: compact, `<>&` and U+2028/9 escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text


def legacy_layer_index(folder: str, v1_json: bytes, chains: list) -> int | None:
    """Which layer a `docker save` folder before Docker 25 holds, from its `json` (read before
    its `layer.tar`): the folder's name is a v1 ID, the sha256 of that JSON without `id`,
    with `layer_id` (the layer's chain ID) and `parent` (`sha256:` + the folder below), as
    Docker's `v1.CreateID` makes it. None when no layer gives that name."""
    try:
        v1 = json.loads(v1_json)
    except ValueError:
        return None
    if not isinstance(v1, dict):
        return None
    for keep_os in (False, True):  # the top layer's carries `os`; the others got it afterwards
        fields = {k: v for k, v in v1.items() if k not in ("id", "parent")}
        if not keep_os:
            fields.pop("os", None)
        if "parent" in v1:
            fields["parent"] = "sha256:" + str(v1["parent"])
        for index, chain in enumerate(chains):
            fields["layer_id"] = chain
            text = (
                "{"
                + ",".join(_go_json(k) + ":" + _go_json(fields[k]) for k in sorted(fields))
                + "}"
            )
            if hashlib.sha256(text.encode()).hexdigest() == folder:
                return index
    return None


class SaveFilter(TarWalk):
    """`docker save`'s tar without the layers in `drop`: blobs named by their digest (Docker
    25 and later), or V1ID/layer.tar whose folder's `json` shows it is one of them (before 25).
    Everything else passes, a layer it cannot place too: `docker load` skips what it has."""

    def __init__(self, drop: list, diff_ids: list) -> None:
        super().__init__()
        self.drop = set(drop)
        self.diff_ids = list(diff_ids)
        self.chains = chain_ids(self.diff_ids)
        self.dropped_folders: set = set()
        self.v1_json: bytes | None = None
        self.member = ""
        self.left_out = 0  # the bytes of the layers left out

    def begin(self, name: str, kind: str, size: int) -> bool:
        self.member, self.v1_json = name, None
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "json" and len(parts[0]) == 64 and size <= MAX_EXTENSION:
            self.v1_json = b""
        digest = _layer_digest(name)
        dropped = (digest is not None and digest in self.drop) or (
            len(parts) == 2 and parts[1] == "layer.tar" and parts[0] in self.dropped_folders
        )
        if dropped:
            self.left_out += size
        return not dropped

    def body(self, data: bytes) -> None:
        if self.v1_json is not None:
            self.v1_json += data

    def end(self) -> None:
        if self.v1_json is None:
            return
        folder = self.member.split("/")[0]
        index = legacy_layer_index(folder, self.v1_json, self.chains)
        if index is not None and self.diff_ids[index] in self.drop:
            self.dropped_folders.add(folder)
        self.v1_json = None


def filtered_save(chunks: Iterable[bytes], drop: list, diff_ids: list) -> Iterator[bytes]:
    """`docker save`'s chunks without the layers in `drop`, the tar's end included."""
    walk = SaveFilter(drop, diff_ids)
    for chunk in chunks:
        passed = walk.feed(chunk)
        if passed:
            yield passed
    if not walk.ended:
        raise TarError("`docker save` ended before its tar did")
    yield walk.trailer()


def save(config: dict) -> int:
    """`docker save` of CONFIG's image to stdout, without the layers in `drop`."""
    out = sys.stdout.buffer
    process = subprocess.Popen(
        [*docker_argv(config), "save", config["image"]], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    reader = process.stdout
    try:
        for piece in filtered_save(
            iter(lambda: reader.read(CHUNK), b""), config["drop"], config["diff_ids"]
        ):
            out.write(piece)
    except TarError as error:
        process.kill()
        process.wait()
        sys.stderr.write(f"{error}\n")
        return 6
    out.flush()
    return process.wait()


class Sink:
    """Where this node keeps an item: a file written aside, or `docker load`."""

    def __init__(self, cache: Cache, header: dict, docker: tuple = ("docker",)) -> None:
        self.cache = cache
        self.header = header
        self.error: str | None = None
        self.digest = hashlib.sha256()
        self.written = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.handle: IO[bytes] | None = None
        self.folder: int | None = None
        self.name = ""
        self.image: ImageCheck | None = None
        try:
            if header["kind"] == "image":
                self.image = ImageCheck(header)
                self.process = subprocess.Popen(
                    [*docker, "load"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
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
            if self.image is not None:
                self.handle.write(self.image.feed(data))
            else:
                self.handle.write(data)
                self.digest.update(data)
            self.written += len(data)
        except ValueError as error:  # a TarError, or a number in a tar header that is not one
            self.fail(f"{error}: refused, nothing loaded")
        except OSError as error:
            self.error = str(error)

    def fail(self, why: str) -> None:
        """Give the item up now: its partial file is removed; `docker load` is ended mid-tar."""
        self.error = self.error or why
        if self.process is None:
            self._close_partial()
        else:
            with contextlib.suppress(OSError):
                self.process.kill()

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
            return self._finish_load()
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

    def _finish_load(self) -> str | None:
        """Let `docker load` complete (the tar's end) only when every layer arrived right;
        otherwise end it mid-tar, so that it loads nothing."""
        assert self.process is not None and self.image is not None
        if self.error is None:
            self.error = self.image.problem()
        try:
            if self.error is None:
                self.handle.write(self.image.trailer())  # type: ignore[union-attr]
                self.handle.close()  # type: ignore[union-attr]
            else:
                self.process.kill()  # the daemon sees the upload cut: nothing is loaded
        except OSError as error:
            self.error = self.error or str(error)
        assert self.process.stdout is not None
        output = self.process.stdout.read().decode(errors="replace")
        status = self.process.wait()
        if self.error is not None:
            return self.error
        if status != 0:
            return f"docker load failed: {output.strip()[-300:]}"
        return None


def docker_argv(config: dict) -> tuple:
    """`docker`, at the engine CONFIG names (`docker_host`), else at the host's default."""
    host = config.get("docker_host")
    return ("docker", "--host", host) if host else ("docker",)


def relay(config: dict) -> int:
    root, node = config["root"], config["node"]
    try:
        upstream = Upstream(config)
    except NoUpstream as gone:
        emit(
            event="no-upstream",
            seconds=config.get("accept_timeout_s", ACCEPT_TIMEOUT_S),
            refused=gone.refused,
        )
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
            sink = Sink(cache, header, docker_argv(config)) if node in header["sinks"] else None
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
    modes = {"check": check, "relay": relay, "save": save}
    sys.exit(modes[settings["mode"]](settings))
