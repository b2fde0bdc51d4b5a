"""How the router passes answers on (cluster/remote/serving/upstream.py), against real servers.

The model is either the stand-in (tests/support/standin_vllm.py: many streams at once, kept-alive
connections, a client that leaves) or a tiny raw-socket server started by the test, which
answers exactly the bytes the test needs: chunk extensions and trailers, size lines and CRLFs
cut between reads, streams cut midway, idle connections closed, Content-Length answers. The
router is the real one (`python -m cluster.remote.serving`), as in tests/integration/test_router.py,
whose harness this reuses.
"""

# ruff: noqa: F811 (`start`, a fixture of test_router.py, is imported, then taken as an argument)

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.remote.serving.catalog import ModelEntry
from tests.integration.test_router import (
    KEY,
    PORT,
    TOKEN,
    Cluster,
    chat,
    config,
    model,
    request,
    start,  # noqa: F401 (a fixture)
)

RAW_PORT = 18300
LAST_CHUNK = b"0\r\n\r\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)

Answer = Callable[[socket.socket, bytes], bool]
"""Writes a raw server's answer to one POST (given its head); False: close the connection."""


class RawModel:
    """A model's server on 127.0.0.1:RAW_PORT that answers each POST as `answer` writes it;
    GET /health gets 200. It counts the POSTs and the connections they came on."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.connections: set[int] = set()
        self.listener = socket.create_server(("127.0.0.1", RAW_PORT))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        number = 0
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # stopped
            number += 1
            threading.Thread(target=self._serve, args=(connection, number), daemon=True).start()

    def _serve(self, connection: socket.socket, number: int) -> None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        with connection:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = connection.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(dict(_fields(head)).get("content-length", "0"))
                while len(buffer) < length:
                    buffer += connection.recv(65536)
                buffer = buffer[length:]
                if head.startswith(b"GET /health "):
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    continue
                self.heads.append(head)
                self.connections.add(number)
                if not self.answer(connection, head):
                    return

    def stop(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone would not)
        self.listener.close()


def _fields(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines)]


@pytest.fixture
def front_of(tmp_path: Path) -> Iterator[Callable[[Answer], tuple[Cluster, RawModel]]]:
    """The router in front of one model (the `front` role), the model a RawModel."""
    started: list[tuple[Cluster, RawModel]] = []

    def run(answer: Answer) -> tuple[Cluster, RawModel]:
        raw_model = RawModel(answer)
        entry = ModelEntry("one", (), 1, 1, keep_loaded=True, unload_after_s=None,
                           api_port=RAW_PORT, master_port=RAW_PORT + 1, external=True)  # fmt: skip
        serving = config(tmp_path, (entry,), request_wait_s=10.0)
        try:
            front = Cluster(tmp_path, serving, roles=(("front", "head"),), healthy=200)
        except BaseException:
            raw_model.stop()
            raise
        started.append((front, raw_model))
        return front, raw_model

    yield run
    for front, raw_model in started:
        try:
            front.stop()
        finally:
            raw_model.stop()


def post(body: dict, *, version: str = "1.1", headers: str = "") -> socket.socket:
    """A chat request to the router on a socket of its own, the bytes exactly as written."""
    data = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/{version}\r\nHost: 127.0.0.1:{PORT}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(data)}\r\n\r\n")  # fmt: skip
    client = socket.create_connection(("127.0.0.1", PORT), timeout=15)
    client.sendall(head.encode() + data)
    return client


def read_until(client: socket.socket, end: bytes | None = LAST_CHUNK) -> tuple[bytes, bool]:
    """What the router sent, until `end` came (None: until the close); and whether it closed."""
    got = b""
    while end is None or end not in got:
        data = client.recv(65536)
        if not data:
            return got, True
        got += data
    return got, False


def stream_chat(served: str) -> tuple[int, bytes]:
    """A streamed chat request through the router, its body decoded by http.client."""
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    body = json.dumps({"model": served, "messages": [], "stream": True})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def standin_connections(index: int = 0) -> dict:
    """The stand-in's own count of chat requests and the connections they came on."""
    status, body = request("GET", "/standin/connections", key=TOKEN,
                           base=f"http://127.0.0.1:{18200 + 2 * index}")  # fmt: skip
    assert status == 200, body
    return body


def events(body: bytes) -> list[bytes]:
    return [line for line in body.split(b"\n\n") if line]


# --- the stand-in as the model ---------------------------------------------------------------


def test_many_streams_at_once_all_arrive_whole(start):
    start(model("a", 0, "--stream-chunks", "200"))
    assert chat("a")[0] == 200  # loaded
    replies: list[tuple[int, bytes]] = []
    threads = [
        threading.Thread(target=lambda: replies.extend(stream_chat("a") for _ in range(3)))
        for _ in range(24)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(replies) == 72
    for status, body in replies:
        assert status == 200
        sent = events(body)
        assert len(sent) == 201 and sent[-1] == b"data: [DONE]"
        assert all(json.loads(e[len(b"data: ") :])["object"] == "chat.completion.chunk"
                   for e in sent[:-1])  # fmt: skip


def test_requests_one_after_another_share_one_kept_alive_connection(start):
    start(model("a", 0))
    for i in range(10):
        assert chat("a")[0] == 200
        assert stream_chat("a")[0] == 200, i
    seen = standin_connections()
    assert seen["requests"] == 20
    assert seen["connections"] <= 2  # one, unless a pause passed the pool's 4 s of idleness


def test_a_client_that_leaves_mid_stream_closes_its_connection_to_the_model(start):
    cluster = start(model("a", 0))
    assert chat("a")[0] == 200
    client = post({"model": "a", "messages": [], "stream": True, "delay_s": 0.5})
    read_until(client, b"\r\n\r\n")  # the head
    client.close()  # gone, while the stand-in waits before its next chunk
    deadline = time.monotonic() + 5
    while "the client left mid-stream" not in cluster.log_path.read_text():
        assert time.monotonic() < deadline, cluster.log_path.read_text()
        time.sleep(0.1)
    time.sleep(2)  # the stand-in's stream would have ended by now
    assert chat("a")[0] == 200
    # the stream's connection was closed, not kept: the last request needed a new one
    assert standin_connections() == {"requests": 3, "connections": 2}


# --- a raw server as the model ---------------------------------------------------------------


def test_chunk_extensions_pass_unchanged_trailers_stay_and_the_connection_is_kept(front_of):
    def answer(connection: socket.socket, head: bytes) -> bool:
        # size lines, data and CRLFs cut between writes, as a network may cut them
        pieces = [SSE_HEAD + b"5;name=value\r\nhel", b"lo\r", b"\n0", b"6 ; q=\"a;b\"\r\n",
                  b" world\r\n0;end\r\nX-Tok", b"ens: 2\r\n", b"\r\n"]  # fmt: skip
        for piece in pieces:
            connection.sendall(piece)
            time.sleep(0.05)
        return True

    _, raw_model = front_of(answer)
    for _ in range(2):
        client = post({"model": "one", "stream": True})
        got, closed = read_until(client)
        client.close()
        assert not closed
        head, _, body = got.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        assert body == b'5;name=value\r\nhello\r\n06 ; q="a;b"\r\n world\r\n' + LAST_CHUNK
    assert len(raw_model.heads) == 2
    assert len(raw_model.connections) == 1  # the end was found: the connection was kept


def test_a_stream_cut_midway_by_the_model_ends_as_it_is(front_of):
    def answer(connection: socket.socket, head: bytes) -> bool:
        if b"x-cut" not in head.lower():
            connection.sendall(SSE_HEAD + b"e\r\ndata: [DONE]\n\n\r\n" + LAST_CHUNK)
            return True
        connection.sendall(SSE_HEAD + b"9\r\ndata: 1\n\n\r\n")
        time.sleep(0.3)
        connection.sendall(b"9\r\ndata: 2\n\n\r\n9\r\ndata:")  # and the rest never comes
        time.sleep(0.3)
        return False

    front, _ = front_of(answer)
    client = post({"model": "one", "stream": True}, headers="X-Cut: yes\r\n")
    got, closed = read_until(client, None)
    client.close()
    assert closed
    body = got.partition(b"\r\n\r\n")[2]
    # what came passes as it came; no last chunk follows, so the client can tell it was cut
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n9\r\ndata:"
    assert "a stream was cut" in front.log_path.read_text()
    assert "Traceback" not in front.log_path.read_text()
    assert stream_chat("one") == (200, b"data: [DONE]\n\n")  # and the router serves on


def test_a_connection_the_model_closed_while_idle_is_replaced(front_of):
    def answer(connection: socket.socket, head: bytes) -> bool:
        connection.sendall(SSE_HEAD + b"e\r\ndata: [DONE]\n\n\r\n" + LAST_CHUNK)
        if b"x-linger" in head.lower():
            time.sleep(0.2)
        return False  # closed while idle in the router's pool, without a Connection: close

    front, raw_model = front_of(answer)
    for _ in range(2):
        assert stream_chat("one") == (200, b"data: [DONE]\n\n")  # closed at once
    for _ in range(2):
        client = post({"model": "one", "stream": True}, headers="X-Linger: 1\r\n")
        assert read_until(client)[0].endswith(b"data: [DONE]\n\n\r\n" + LAST_CHUNK)
        client.close()
        time.sleep(0.5)  # closed 0.2 s after the answer, while the router keeps it
    assert len(raw_model.connections) == 4
    assert "did not answer" not in front.log_path.read_text()


def test_a_request_the_model_took_and_dropped_unanswered_is_not_sent_again(front_of):
    def answer(connection: socket.socket, head: bytes) -> bool:
        if b"x-drop" in head.lower():
            return False  # as a server that closes a kept-alive connection as a request comes
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        return True

    _, raw_model = front_of(answer)
    assert chat("one")[0] == 200
    client = post({"model": "one"}, headers="X-Drop: 1\r\n")
    got, _ = read_until(client, b"}}")
    client.close()
    assert got.startswith(b"HTTP/1.1 502")
    assert b"did not answer: 127.0.0.1:18300 closed the connection" in got
    assert len(raw_model.heads) == 2  # a POST may have been acted on: it is not repeated
    assert chat("one")[0] == 200


def test_content_length_answers_pass_whole_with_their_status_and_headers(front_of):
    big = json.dumps({"data": [{"embedding": [0.125] * 1000}] * 100}).encode()
    error = b'{"error": {"message": "bad request", "code": 400}}'

    def answer(connection: socket.socket, head: bytes) -> bool:
        wanted = dict(_fields(head)).get("x-want")
        status, body = (b"200 OK", big) if wanted == "big" else (b"400 Bad Request", error)
        whole = (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                 b"X-Request-Id: r1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        for at in range(0, len(whole), 100_000):  # in pieces
            connection.sendall(whole[at : at + 100_000])
            time.sleep(0.01)
        return True

    _, raw_model = front_of(answer)
    for wanted, status, body in (("big", 200, big), ("error", 400, error), ("big", 200, big)):
        connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        connection.request("POST", "/v1/embeddings", body=json.dumps({"model": "one"}),
                           headers={"Authorization": f"Bearer {KEY}", "X-Want": wanted})  # fmt: skip
        reply = connection.getresponse()
        assert (reply.status, reply.read()) == (status, body)
        assert reply.headers["Content-Length"] == str(len(body))
        assert reply.headers["X-Request-Id"] == "r1"
        connection.close()
    assert len(raw_model.connections) == 1


def test_an_answer_that_ends_with_the_close_streams_as_chunks(front_of):
    def answer(connection: socket.socket, head: bytes) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        for i in range(3):
            connection.sendall(b"data: %d\n\n" % i)
            time.sleep(0.05)
        return False

    _, raw_model = front_of(answer)
    assert stream_chat("one") == (200, b"data: 0\n\ndata: 1\n\ndata: 2\n\n")
    assert stream_chat("one") == (200, b"data: 0\n\ndata: 1\n\ndata: 2\n\n")
    assert len(raw_model.connections) == 2


def test_an_http_1_0_client_gets_the_stream_unchunked_until_the_close(front_of):
    def answer(connection: socket.socket, head: bytes) -> bool:
        connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        connection.sendall(b"data: 1\n\ndata: [DONE]\n\n")
        return False

    _, raw_model = front_of(answer)
    client = post({"model": "one", "stream": True}, version="1.0")
    got, closed = read_until(client, None)
    client.close()
    assert raw_model.heads[0].split(b"\r\n")[0].endswith(b" HTTP/1.0")  # asked in kind
    head, _, body = got.partition(b"\r\n\r\n")
    assert closed and head.startswith(b"HTTP/1.0 200")
    assert b"chunked" not in head.lower()
    assert body == b"data: 1\n\ndata: [DONE]\n\n"


def test_the_model_gets_its_own_host_no_key_and_no_hop_by_hop_header(front_of):
    def answer(connection: socket.socket, head: bytes) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        return True

    _, raw_model = front_of(answer)
    client = post({"model": "one"}, headers="Connection: keep-alive, X-Hop\r\nTE: trailers\r\n"
                  "Keep-Alive: timeout=5\r\nX-Custom: kept\r\n")  # fmt: skip
    got, _ = read_until(client, b"{}")
    client.close()
    assert got.startswith(b"HTTP/1.1 200")
    fields = dict(_fields(raw_model.heads[0]))
    assert fields["host"] == f"127.0.0.1:{RAW_PORT}"
    assert fields["x-custom"] == "kept"
    assert fields["content-length"] == str(len(json.dumps({"model": "one"})))
    assert not {"authorization", "connection", "te", "keep-alive"} & set(fields)


def test_a_model_that_closes_without_answering_gets_a_502_naming_it(front_of):
    def answer(connection: socket.socket, head: bytes) -> bool:
        return False

    front_of(answer)
    status, body = chat("one")
    assert status == 502
    assert body["error"]["message"].startswith("model 'one' did not answer: 127.0.0.1:18300 closed")


def test_a_client_that_leaves_stops_the_models_stream_at_once(front_of):
    closed_by_router = threading.Event()

    def answer(connection: socket.socket, head: bytes) -> bool:
        connection.sendall(SSE_HEAD)
        for _ in range(100):
            connection.sendall(b"9\r\ndata: x\n\n\r\n")
            readable, _, _ = select.select([connection], [], [], 0.1)
            if readable and connection.recv(1) == b"":
                closed_by_router.set()
                return False
        connection.sendall(LAST_CHUNK)
        return True

    front_of(answer)
    client = post({"model": "one", "stream": True})
    read_until(client, b"data: x\n\n\r\n")
    client.close()
    assert closed_by_router.wait(5)  # the model stops producing for nobody


def test_a_slow_client_slows_the_model_down_instead_of_filling_the_routers_memory(front_of):
    piece = b"x" * 16384
    frame = b"4000\r\n" + piece + b"\r\n"
    pieces = 4096  # 64 MiB: more than the kernel's socket buffers on the way can hold
    sent_all = threading.Event()

    def answer(connection: socket.socket, head: bytes) -> bool:
        connection.sendall(SSE_HEAD)
        for _ in range(pieces // 16):
            connection.sendall(frame * 16)
        connection.sendall(LAST_CHUNK)
        sent_all.set()
        return True

    front_of(answer)
    client = post({"model": "one", "stream": True})
    got, read_when_sent = bytearray(), None
    while not got.endswith(LAST_CHUNK):
        data = client.recv(65536)
        assert data, "the router closed the stream"
        got += data
        if read_when_sent is None and sent_all.is_set():
            read_when_sent = len(got)
        time.sleep(0.0005)  # a slow reader: about 100 MB/s at most
    client.close()
    whole = bytes(got.partition(b"\r\n\r\n")[2]) == frame * pieces + LAST_CHUNK
    assert whole  # (a bool: no 64 MiB in the report)
    # the model could send its last byte only once the client had read most of the stream
    assert read_when_sent is not None
    assert read_when_sent > len(frame) * pieces // 2
