"""The load generator of `bench/router --standin`: closed-loop streamed chat requests over
HTTP/1.1 keep-alive connections, one connection per client.

It speaks HTTP through a bare asyncio Protocol instead of an HTTP library: the cores are
shared with the server and the proxy, and an aiohttp client spends more per chunk than the
proxy under test. Every answer is still checked whole: status 200, chunked, every SSE chunk
and `data: [DONE]`. uvloop when installed.

    python3 standin_load.py < CONFIG_JSON   (one JSON document on stdout; keys in the config,
                                            never on a command line)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

END = b"\r\n0\r\n\r\n"
"""The last chunk of a chunked body: a size line "0" can only be the terminator."""
CHUNK = b"data: {"
DONE = b"data: [DONE]"
TICKS = os.sysconf("SC_CLK_TCK")
WARM_UP_REQUESTS = 2
"""Per connection, before the clock starts: the proxies open their upstream connections."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; `exchange` sends a request and returns the whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head_end = -1
        self.reply: asyncio.Future[bytes] | None = None
        self.made = asyncio.get_running_loop().create_future()
        """uvloop calls connection_made after create_connection has returned."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head_end < 0:
            self.head_end = self.buffer.find(b"\r\n\r\n")
            if self.head_end >= 0:
                head = bytes(self.buffer[: self.head_end]).lower()
                if not head.startswith(b"http/1.1 200") or b"chunked" not in head:
                    self._end(RuntimeError(bytes(self.buffer[:600]).decode(errors="replace")))
                    return
        if self.head_end >= 0 and self.buffer.endswith(END):
            self._end(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(ConnectionError(f"connection closed mid-answer ({exc})"))

    def _end(self, error: Exception | None) -> None:
        if self.reply is None or self.reply.done():
            return
        if error is not None:
            self.reply.set_exception(error)
        else:
            self.reply.set_result(bytes(self.buffer[self.head_end + 4 :]))

    async def exchange(self, request: bytes) -> bytes:
        assert self.transport is not None
        self.buffer, self.head_end = bytearray(), -1
        self.reply = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.reply


def dechunk(body: bytes) -> bytes:
    """A chunked body decoded (the slow path, when a proxy re-chunked inside an SSE chunk)."""
    parts: list[bytes] = []
    at = 0
    while True:
        line_end = body.index(b"\r\n", at)
        size = int(body[at:line_end].split(b";")[0], 16)
        if size == 0:
            return b"".join(parts)
        parts.append(body[line_end + 2 : line_end + 2 + size])
        at = line_end + 4 + size


def check(body: bytes, chunks: int, name: str) -> None:
    """Every SSE chunk and [DONE] arrived (counted in the raw body first: cheap, usually right)."""
    if body.count(CHUNK) == chunks and DONE in body:
        return
    data = dechunk(body)
    if data.count(CHUNK) != chunks or DONE not in data:
        raise SystemExit(
            f"{name}: an answer with {data.count(CHUNK)} chunks (expected {chunks}), "
            f"[DONE] {'present' if DONE in data else 'missing'}"
        )


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (/proc/PID/stat), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def request_bytes(target: dict[str, Any], model: str, chunks: int) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}],
                       "stream": True, "max_tokens": chunks}).encode()  # fmt: skip
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{target['port']}\r\n"
        f"Authorization: Bearer {target['key']}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run_clients(
    target: dict[str, Any], concurrency: int, seconds: float, model: str, chunks: int
) -> tuple[list[float], float, dict[str, float]]:
    """`concurrency` clients for `seconds`, each sending its next request when the last ended:
    every request's duration, the seconds until the last answer ended, and the CPU seconds
    that the target's processes (`cpu_pids`: the stand-in, the proxy) spent meanwhile."""
    loop = asyncio.get_running_loop()
    request = request_bytes(target, model, chunks)
    connections = []
    for _ in range(concurrency):
        _, connection = await loop.create_connection(Connection, "127.0.0.1", target["port"])
        await connection.made
        connections.append(connection)
    try:
        for _ in range(WARM_UP_REQUESTS):
            for body in await asyncio.gather(*(c.exchange(request) for c in connections)):
                check(body, chunks, target["name"])
        durations: list[float] = []
        pids = target["cpu_pids"]
        cpu = {role: cpu_seconds(pid) for role, pid in pids.items()}
        started = time.perf_counter()
        deadline = started + seconds

        async def client(connection: Connection) -> None:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                body = await connection.exchange(request)
                durations.append(time.perf_counter() - sent)
                check(body, chunks, target["name"])

        await asyncio.gather(*(client(c) for c in connections))
        elapsed = time.perf_counter() - started
        return durations, elapsed, {r: cpu_seconds(pid) - cpu[r] for r, pid in pids.items()}
    finally:
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()


def summary(
    durations: list[float], seconds: float, cpu: dict[str, float], chunks: int
) -> dict[str, Any]:
    durations = sorted(durations)
    count = len(durations) * chunks
    return {
        "chunks_per_s": count / seconds,
        "cpu_us_per_chunk": {role: used / count * 1e6 for role, used in cpu.items()},
        "requests": len(durations),
        "seconds": seconds,
        "p50_ms": statistics.median(durations) * 1000,
        "p90_ms": durations[int(len(durations) * 0.9)] * 1000,
    }


async def main(config: dict[str, Any]) -> None:
    """Per concurrency, `rounds` rounds of every target in turn (so that drift hits each alike);
    a figure sums its rounds."""
    figures: dict[str, dict[str, Any]] = {}
    chunks = config["chunks"]
    for concurrency in config["concurrency"]:
        totals: dict[str, tuple[list[float], float, dict[str, float]]] = {
            t["name"]: ([], 0.0, dict.fromkeys(t["cpu_pids"], 0.0)) for t in config["targets"]
        }
        for _ in range(config["rounds"]):
            for target in config["targets"]:
                durations, seconds, cpu = await run_clients(
                    target, concurrency, config["seconds"], config["model"], chunks
                )
                print(f"  concurrency {concurrency:>2}, {target['name']:<6}: "
                      f"{len(durations) * chunks / seconds:9,.0f} chunks/s", file=sys.stderr)  # fmt: skip
                so_far, total_s, total_cpu = totals[target["name"]]
                total_cpu = {role: used + cpu[role] for role, used in total_cpu.items()}
                totals[target["name"]] = (so_far + durations, total_s + seconds, total_cpu)
        figures[str(concurrency)] = {
            name: summary(durations, seconds, cpu, chunks)
            for name, (durations, seconds, cpu) in totals.items()
        }
    print(json.dumps({"figures": figures, "uvloop": "uvloop" in sys.modules}))


if __name__ == "__main__":
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(json.loads(sys.stdin.read())))
