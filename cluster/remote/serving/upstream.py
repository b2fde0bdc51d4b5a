"""The router's connections to the models' API servers: kept alive, pooled, and read by an
HTTP/1.1 state machine that passes a streamed answer on as it arrives.

Through aiohttp's client, every piece of a streamed answer was parsed into a buffer and a
task woken to copy it out; at tens of thousands of SSE chunks per second that was most of
the router's CPU (docs/performance.md, "Router in front"). Here an asyncio Protocol reads the
answer: its head is parsed, a Content-Length body is collected whole, and a chunked body is
followed chunk by chunk (`ChunkedBody`) while its bytes, framing included, go straight to the
client's connection, whose answer is chunked too. The upstream's last chunk and trailers are
held back: the client's answer gets its own end from aiohttp.

Standard library only: it runs in the containers, on the images' Python (3.8 and later).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import cast

MAX_HEAD_BYTES = 64 * 1024
"""An answer's status line and headers together; a longer head is refused."""
MAX_CHUNK_LINE_BYTES = 4096
"""A chunk's size line with its extensions."""
MAX_TRAILER_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
IDLE_KEEP_S = 4.0
"""How long an idle connection is kept: less than the 5 s after which vLLM's server (uvicorn,
`VLLM_HTTP_TIMEOUT_KEEP_ALIVE`) closes one, so that it never closes one being reused."""
IDLE_KEPT_PER_SERVER = 64
"""Idle connections kept per server; connections in use are not limited (as with aiohttp's
client before, `limit=0`): every request in flight has its own."""

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([\t\x20-\x7e\x80-\xff]*)")
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?\r\n")
_match_chunk_size_line = _CHUNK_SIZE_LINE.match  # once per chunk: no attribute lookup
_CHUNK_SIZE_LINE_START = re.compile(
    rb"(?:[0-9A-Fa-f]{1,16}(?:[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?)?\r?)?"
)
"""What a size line cut off at the end of a piece may be (the rest comes with the next)."""


class UpstreamError(Exception):
    """The model's server did not answer, or broke its answer off; the message says how."""


class MalformedAnswer(UpstreamError):
    """The model's server answered something that is not HTTP/1.1 as it must be."""


class ClientGone(Exception):
    """The client's connection closed while its answer streamed."""


class StaleConnection(UpstreamError):
    """A kept-alive connection the server had closed before the request went out on it."""


@dataclass(frozen=True)
class ResponseHead:
    """An answer's status line and headers, and how its body is delimited."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    chunked: bool
    length: int | None
    """The body's Content-Length (0 for a status that has no body); None when the body is
    chunked or ends when the server closes the connection."""
    keep_alive: bool
    """Whether the connection may carry another request once this answer is read whole."""

    @property
    def interim(self) -> bool:
        """A 1xx answer: another head follows it."""
        return 100 <= self.status < 200


def parse_head(block: bytes) -> ResponseHead:
    """The head of an answer: `block` is its status line and header lines, without the blank
    line that ends them (RFC 9112, sections 4, 5 and 6.3)."""
    lines = block.split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise MalformedAnswer(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
    headers = []
    for line in lines[1:]:
        field = _HEADER_LINE.fullmatch(line)
        if field is None:  # obsolete line folding and control characters included
            raise MalformedAnswer(f"a malformed header line: {line[:100]!r}")
        value = field.group(2).strip(b" \t")
        headers.append((field.group(1).decode("ascii"), value.decode("latin-1")))
    status = int(status_line.group(2))
    if status == 101:
        raise MalformedAnswer("101 Switching Protocols: no protocol switch passes the router")
    http11 = status_line.group(1) == b"1"
    chunked, length = _body_framing(status, headers)
    close = "close" in _tokens(headers, "connection")
    return ResponseHead(
        status=status,
        reason=(status_line.group(3) or b"").decode("latin-1"),
        headers=headers,
        chunked=chunked,
        length=length,
        keep_alive=http11 and not close and (chunked or length is not None),
    )


def _body_framing(status: int, headers: list[tuple[str, str]]) -> tuple[bool, int | None]:
    """(chunked, Content-Length) of an answer's body; (False, None): until the server closes."""
    if 100 <= status < 200 or status in (204, 304):
        return False, 0
    codings = _tokens(headers, "transfer-encoding")
    if codings:  # it overrides any Content-Length
        return codings[-1] == "chunked", None
    lengths = {
        v.strip() for n, value in headers if n.lower() == "content-length" for v in value.split(",")
    }
    if not lengths:
        return False, None
    if len(lengths) > 1 or not all(length.isdigit() and length.isascii() for length in lengths):
        raise MalformedAnswer(f"Content-Length {', '.join(sorted(lengths))} is not one length")
    return False, int(lengths.pop())


def _tokens(headers: list[tuple[str, str]], name: str) -> list[str]:
    """The comma-separated tokens of every `name` header, lowercased, in order."""
    return [
        token.strip().lower()
        for n, value in headers
        if n.lower() == name
        for token in value.split(",")
        if token.strip()
    ]


_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)


class ChunkedBody:
    """The framing of a chunked body (RFC 9112, section 7.1), followed over the pieces it
    arrives in: which bytes may pass on now, and where the body ends.

    Data chunks pass with their framing (size line, extensions, data, CRLF) unchanged, a chunk
    cut between pieces as it comes; the last chunk and the trailers never pass (the client's
    answer ends with a last chunk of its own). A size line cut between pieces is held back
    until it is whole: its size says whether it is the last chunk.
    """

    def __init__(self) -> None:
        self.done = False
        """The last chunk and the trailers have come."""
        self.rest = b""
        """Bytes that came after the body's end (none from a server that behaves)."""
        self._state = _SIZE
        self._left = 0
        """In _DATA, the chunk's data bytes still to come; in _DATA_END, its CRLF's."""
        self._held = b""
        self._trailers = b""

    def feed(self, data: bytes) -> bytes:
        """The bytes to pass on now, given the next piece of the body; raises MalformedAnswer."""
        if self._held:
            data, self._held = self._held + data, b""
        state, end, at = self._state, len(data), 0
        while at < end:
            if state == _SIZE:
                line = _match_chunk_size_line(data, at)
                if line is None:
                    self._held = _size_line_start(data, at)
                    self._state = _SIZE
                    return data[:at]
                size, data_start = int(line[1], 16), line.end()
                if size == 0:  # the last chunk: it and the trailers stay here
                    self._state = _TRAILERS
                    self._trailer_section(data[data_start:])
                    return data[:at]
                data_end = data_start + size
                if data_end + 2 <= end:  # the whole chunk is in this piece: the usual case
                    if not data.startswith(b"\r\n", data_end):
                        raise MalformedAnswer("a chunk's data does not end with CRLF")
                    at = data_end + 2
                elif data_end <= end:
                    state, self._left, at = _DATA_END, 2, data_end
                else:
                    state, self._left, at = _DATA, data_end - end, end
            elif state == _DATA:
                taken = min(self._left, end - at)
                at += taken
                self._left -= taken
                if not self._left:
                    state, self._left = _DATA_END, 2
            elif state == _DATA_END:
                seen = data[at : at + self._left]
                if not b"\r\n"[2 - self._left :].startswith(seen):
                    raise MalformedAnswer("a chunk's data does not end with CRLF")
                at += len(seen)
                self._left -= len(seen)
                if not self._left:
                    state = _SIZE
            elif state == _TRAILERS:
                self._trailer_section(data)
                return b""
            else:
                self.rest += data
                return b""
        self._state = state
        return data

    def _trailer_section(self, data: bytes) -> None:
        """Takes the bytes after the last chunk's size line: trailer lines, then an empty one."""
        self._trailers += data
        if self._trailers.startswith(b"\r\n"):
            end = 2
        else:
            found = self._trailers.find(b"\r\n\r\n")
            end = found + 4 if found >= 0 else -1
        if end < 0:
            if len(self._trailers) > MAX_TRAILER_BYTES:
                raise MalformedAnswer(f"trailers longer than {MAX_TRAILER_BYTES} bytes")
            return
        self.rest, self._trailers = self._trailers[end:], b""
        self._state, self.done = _DONE, True


def _size_line_start(data: bytes, at: int) -> bytes:
    """`data[at:]`, the start of a size line cut off at the end of a piece; raises
    MalformedAnswer when it cannot be one."""
    start = data[at:]
    if len(start) > MAX_CHUNK_LINE_BYTES:
        raise MalformedAnswer(f"a chunk size line longer than {MAX_CHUNK_LINE_BYTES} bytes")
    if _CHUNK_SIZE_LINE_START.fullmatch(start) is None:
        raise MalformedAnswer(f"a malformed chunk size line: {start[:40]!r}")
    return start


def request_bytes(
    method: str,
    target: str,
    server: tuple[str, int],
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    http11: bool = True,
) -> bytes:
    """A request to `server`: its `Host`, the body's `Content-Length`, then `headers` (the
    caller leaves out the hop-by-hop ones). Texts as aiohttp's server decoded them (UTF-8 with
    surrogateescape) go out as the bytes they came from."""
    lines = [
        f"{method} {target} HTTP/1.{1 if http11 else 0}",
        f"Host: {_address(server)}",
        f"Content-Length: {len(body)}",
        *(f"{n}: {v}" for n, v in headers),
    ]
    if any("\r" in line or "\n" in line for line in lines):
        raise ValueError("a request line or header holds a line break")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


class Downstream:
    """Where a streamed answer goes: the client's connection, written to directly, and how
    to wait until it has taken what it was given."""

    def __init__(
        self, transport: asyncio.WriteTransport, drain: Callable[[], Awaitable[None]]
    ) -> None:
        self.transport = transport
        self.drain = drain
        self.high_water = transport.get_write_buffer_limits()[1]
        """Above this, the transport has told its protocol to pause writing (asyncio and uvloop
        alike): reading from the server pauses too until `drain` returns."""


_IDLE, _HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _COMPLETE = range(6)


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a model's server, one exchange at a time: `exchange` sends a
    request and returns the answer's head, then `read_body` or `stream_to` takes the body."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.on_closed: Callable[[UpstreamConnection], None] | None = None
        self.head: ResponseHead | None = None
        self._mode = _IDLE
        self._frame_pieces = False
        self._buffer = bytearray()
        self._length_left = 0
        self._chunks = ChunkedBody()
        self._pending: list[bytes] = []
        self._downstream: Downstream | None = None
        self._failure: BaseException | None = None
        self._head_ready: asyncio.Future[ResponseHead] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._reusable = True

    # the exchange, as the router sees it

    async def exchange(self, request: bytes, *, client_chunked: bool = True) -> ResponseHead:
        """Send `request`; the answer's head once it has come (1xx answers skipped).

        `client_chunked`: the client's answer is chunked, so a body that ends when the server
        closes passes as chunks. Raises StaleConnection when the server had closed the
        connection before the request went out, UpstreamError when it fails to answer."""
        if not self.open or self.transport is None:
            raise StaleConnection(f"{_address(self.server)} closed the connection")
        self.head, self._mode, self._buffer = None, _HEAD, bytearray()
        self._downstream, self._pending, self._reading_paused = None, [], False
        self._frame_pieces = client_chunked
        self._head_ready = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._head_ready

    async def read_body(self) -> bytes:
        """The whole body of an answer with a Content-Length."""
        await self._until(lambda: self._mode == _COMPLETE)
        return bytes(self._buffer)

    async def stream_to(self, downstream: Downstream) -> None:
        """Pass the body to the client as it comes, until its end. Raises UpstreamError when
        the server breaks it off, ClientGone when the client leaves (then this connection
        closes: the server stops working for nobody)."""
        self._downstream = downstream
        pending, self._pending = self._pending, []
        for piece in pending:
            self._pass(piece)
        while True:
            await self._until(lambda: self._mode == _COMPLETE or self._reading_paused)
            if self._mode == _COMPLETE:
                return
            await self._drained(downstream)

    @property
    def open(self) -> bool:
        """Neither side has closed it (nor begun to)."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    @property
    def reusable(self) -> bool:
        """Its answer was read whole, and the server keeps the connection open for another."""
        return (
            self._mode == _COMPLETE
            and self._reusable
            and self.head is not None
            and self.head.keep_alive
            and self.open
        )

    def close(self) -> None:
        self._reusable = False
        if self.transport is not None:
            self.transport.close()

    async def _until(self, condition: Callable[[], bool]) -> None:
        """Until `condition` holds; raises the exchange's failure when there is one."""
        while True:
            if self._failure is not None:
                raise self._failure
            if condition():
                return
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None

    async def _drained(self, downstream: Downstream) -> None:
        """Reading paused (the client's buffer is full): resumes once the client drained it."""
        with contextlib.suppress(OSError):  # the client left: seen below
            await downstream.drain()
        if downstream.transport.is_closing():
            self._fail(ClientGone("the client closed its connection"))
            return
        self._reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            if self._mode == _CHUNKED:  # first: it runs for every piece of a stream
                passed = self._chunks.feed(data)
                if passed:
                    self._pass(passed)
                if self._chunks.done:
                    self._complete(self._chunks.rest)
            elif self._mode == _HEAD:
                self._read_head(data)
            elif self._mode == _LENGTH:
                self._read_length(data)
            elif self._mode == _UNTIL_CLOSE:
                self._pass(b"%x\r\n%s\r\n" % (len(data), data) if self._frame_pieces else data)
            else:  # bytes nobody asked for: the connection cannot be trusted with another
                self.close()
        except UpstreamError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost says what that means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_closed is not None:
            self.on_closed(self)
        why = f": {exc}" if exc is not None else ""
        if self._mode == _HEAD:
            self._fail(UpstreamError(f"{_address(self.server)} closed the connection{why}"))
        elif self._mode == _UNTIL_CLOSE and exc is None:
            self._complete(b"")  # the close ends such a body
        elif self._mode in (_LENGTH, _CHUNKED, _UNTIL_CLOSE):
            what = f"{_address(self.server)} closed the connection mid-answer{why}"
            self._fail(UpstreamError(what))

    # reading

    def _read_head(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 and len(self._buffer) <= MAX_HEAD_BYTES:
            return  # the rest of the head comes with the next read
        if end < 0 or end > MAX_HEAD_BYTES:
            raise MalformedAnswer(f"an answer's head longer than {MAX_HEAD_BYTES} bytes")
        head = parse_head(bytes(self._buffer[:end]))
        rest = bytes(self._buffer[end + 4 :])
        self._buffer = bytearray()
        if head.interim:  # 100 Continue and the like: the answer follows
            if rest:
                self._read_head(rest)
            return
        self.head = head
        if head.chunked:
            self._mode, self._chunks = _CHUNKED, ChunkedBody()
        elif head.length is not None:
            self._mode, self._length_left = _LENGTH, head.length
        else:
            self._mode = _UNTIL_CLOSE
        assert self._head_ready is not None
        if not self._head_ready.done():
            self._head_ready.set_result(head)
        if self._mode == _LENGTH and not self._length_left:
            self._complete(rest)
        elif rest:
            self.data_received(rest)

    def _read_length(self, data: bytes) -> None:
        taken = data[: self._length_left]
        self._buffer += taken
        self._length_left -= len(taken)
        if not self._length_left:
            self._complete(data[len(taken) :])

    def _pass(self, data: bytes) -> None:
        """Write body bytes to the client (kept until it is known); pause reading when its
        buffer is full."""
        downstream = self._downstream
        if downstream is None:
            self._pending.append(data)
            return
        client = downstream.transport
        if client.is_closing():
            self._fail(ClientGone("the client closed its connection"))
            return
        client.write(data)
        if client.get_write_buffer_size() > downstream.high_water and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
            self._wake_up()

    def _complete(self, rest: bytes) -> None:
        if rest:  # bytes past the answer's end: the next answer could not be told apart
            self._reusable = False
        self._mode = _COMPLETE
        self._wake_up()

    def _fail(self, failure: BaseException) -> None:
        if self._failure is None:
            self._failure = failure
        self.close()
        if self._head_ready is not None and not self._head_ready.done():
            self._head_ready.set_exception(failure)
        self._wake_up()

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class UpstreamPool:
    """Kept-alive connections to the models' servers, per (host, port).

    A connection goes back to the pool only when its answer was read whole and the server
    keeps it open; the pool keeps at most `idle_kept` per server, each for at most
    `idle_keep_s`. One the server closes while idle is dropped when that is seen; one found
    closed just as a request was to go out on it is replaced by a new one (the request had
    not been sent: nothing is sent twice).
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        idle_keep_s: float = IDLE_KEEP_S,
        idle_kept: int = IDLE_KEPT_PER_SERVER,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_keep_s = idle_keep_s
        self.idle_kept = idle_kept
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}

    async def exchange(
        self, server: tuple[str, int], request: bytes, *, client_chunked: bool = True
    ) -> UpstreamConnection:
        """A connection on which `request` went out and whose answer's head (`.head`) came;
        give it back with `release`. Raises UpstreamError when the server does not answer."""
        connection = self._take_idle(server)
        if connection is not None:
            try:
                await connection.exchange(request, client_chunked=client_chunked)
                return connection
            except StaleConnection:
                pass
            except BaseException:
                connection.close()
                raise
        connection = await self._connect(server)
        try:
            await connection.exchange(request, client_chunked=client_chunked)
        except BaseException:
            connection.close()
            raise
        return connection

    def release(self, connection: UpstreamConnection) -> None:
        """Back to the pool when it can carry another request; closed otherwise."""
        if not connection.reusable:
            connection.close()
            return
        idle = self._idle.setdefault(connection.server, [])
        connection.idle_since = asyncio.get_running_loop().time()
        idle.append(connection)
        if len(idle) > self.idle_kept:
            idle.pop(0).close()

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def _take_idle(self, server: tuple[str, int]) -> UpstreamConnection | None:
        """The most recently used idle connection that is still open and fresh."""
        idle = self._idle.get(server)
        now = asyncio.get_running_loop().time()
        while idle:
            connection = idle.pop()
            if not connection.open:
                continue
            if now - connection.idle_since > self.idle_keep_s:
                connection.close()
                continue
            return connection
        return None

    def _forget(self, connection: UpstreamConnection) -> None:
        """A connection closed: out of the pool if it waited there."""
        idle = self._idle.get(connection.server)
        if idle is not None and connection in idle:
            idle.remove(connection)

    async def _connect(self, server: tuple[str, int]) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        host, port = server
        try:
            transport, connection = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(server), host, port),
                self.connect_timeout_s,
            )
        except asyncio.TimeoutError:  # not TimeoutError before Python 3.11
            raise UpstreamError(
                f"no connection to {_address(server)} in {self.connect_timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {_address(server)}: {exc}") from None
        connection.transport = transport  # uvloop may call connection_made only later
        connection.on_closed = self._forget
        return connection


def _address(server: tuple[str, int]) -> str:
    """HOST:PORT, as in a Host header and in messages ([HOST]:PORT for IPv6)."""
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
