"""The router's upstream side (cluster/remote/serving/upstream.py): an answer's head, the framing of a
chunked body followed over the pieces it arrives in, and the request bytes.

The answers are real ones, captured from uvicorn, the server vLLM's API server runs on
(tests/fixtures/upstream/README.md).
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from cluster.remote.serving import upstream
from cluster.remote.serving.upstream import (
    MAX_CHUNK_LINE_BYTES,
    MAX_HEAD_BYTES,
    MAX_TRAILER_BYTES,
    ChunkedBody,
    MalformedAnswer,
    UpstreamError,
    UpstreamPool,
    parse_head,
    request_bytes,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"
STREAM = (FIXTURES / "uvicorn-sse-stream.http").read_bytes()
WHOLE = (FIXTURES / "uvicorn-json.http").read_bytes()
STREAM_HEAD, _, STREAM_BODY = STREAM.partition(b"\r\n\r\n")
LAST_CHUNK = b"0\r\n\r\n"


def dechunk(body: bytes) -> bytes:
    """A chunked body's data (a plain reading of RFC 9112, to check against)."""
    data, at = b"", 0
    while True:
        line_end = body.index(b"\r\n", at)
        size = int(body[at:line_end].split(b";")[0], 16)
        if size == 0:
            return data
        data += body[line_end + 2 : line_end + 2 + size]
        at = line_end + 4 + size


def feed_in(body: ChunkedBody, pieces: list[bytes]) -> bytes:
    return b"".join(body.feed(piece) for piece in pieces)


# --- the head --------------------------------------------------------------------------------


def test_a_streamed_answer_of_uvicorn_is_chunked_and_keeps_the_connection():
    head = parse_head(STREAM_HEAD)
    assert (head.status, head.reason) == (200, "OK")
    assert (head.chunked, head.length, head.keep_alive) == (True, None, True)
    assert ("content-type", "text/event-stream; charset=utf-8") in head.headers


def test_a_whole_answer_of_uvicorn_has_its_length():
    head = parse_head(WHOLE.partition(b"\r\n\r\n")[0])
    assert (head.chunked, head.length, head.keep_alive) == (False, 119, True)
    assert len(WHOLE.partition(b"\r\n\r\n")[2]) == 119


@pytest.mark.parametrize(
    ("head", "chunked", "length", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", True, None, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5", True, None, True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", False, None, False),  # until the close
        (b"HTTP/1.1 200 OK", False, None, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5", False, 5, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close", False, 5, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5", False, 5, False),
        (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked", False, 0, True),
        (b"HTTP/1.1 304 Not Modified", False, 0, True),
    ],
)
def test_how_the_body_of_an_answer_ends(head, chunked, length, keep_alive):
    parsed = parse_head(head)
    assert (parsed.chunked, parsed.length, parsed.keep_alive) == (chunked, length, keep_alive)


def test_a_status_line_without_a_reason_and_padded_header_values_are_read():
    head = parse_head(b"HTTP/1.1 404\r\nX-Request-Id:  abc \t\r\nEmpty:")
    assert (head.status, head.reason) == (404, "")
    assert head.headers == [("X-Request-Id", "abc"), ("Empty", "")]


def test_a_1xx_answer_is_interim():
    assert parse_head(b"HTTP/1.1 100 Continue").interim
    assert not parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 0").interim


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"HTTP/2 200 OK", "not an HTTP/1.x status line"),
        (b"ICY 200 OK", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 20 OK", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b", "a malformed header line"),
        (b"HTTP/1.1 200 OK\r\nX-Space : a", "a malformed header line"),
        (b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b", "a malformed header line"),
        (b"HTTP/1.1 200 OK\r\nX-Bare-Cr: a\rb", "a malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6", "is not one length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5", "is not one length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0x5", "is not one length"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket", "no protocol switch"),
    ],
)
def test_a_malformed_head_is_refused_saying_why(head, says):
    with pytest.raises(MalformedAnswer, match=says):
        parse_head(head)


# --- a chunked body, piece by piece ----------------------------------------------------------


def test_a_body_read_at_once_passes_whole_but_its_last_chunk():
    body = ChunkedBody()
    passed = body.feed(STREAM_BODY)
    assert STREAM_BODY.endswith(LAST_CHUNK)
    assert passed == STREAM_BODY[: -len(LAST_CHUNK)]
    assert body.done and body.rest == b""
    assert dechunk(passed + LAST_CHUNK).endswith(b"data: [DONE]\n\n")


def test_a_body_cut_anywhere_passes_the_same_bytes_and_ends_at_its_end():
    for cut in range(1, len(STREAM_BODY)):
        body = ChunkedBody()
        passed = feed_in(body, [STREAM_BODY[:cut], STREAM_BODY[cut:]])
        assert passed == STREAM_BODY[: -len(LAST_CHUNK)], cut
        assert body.done, cut


def test_a_body_read_byte_by_byte_passes_each_data_byte_as_it_comes():
    body = ChunkedBody()
    passed = b""
    for at in range(len(STREAM_BODY)):
        passed += body.feed(STREAM_BODY[at : at + 1])
        if at < len(STREAM_BODY) - len(LAST_CHUNK):  # held back: only a size line not yet whole
            assert at + 1 - len(passed) <= len(b"e6\r\n")
    assert passed == STREAM_BODY[: -len(LAST_CHUNK)]
    assert body.done


def test_a_chunk_is_not_done_before_its_last_byte():
    body = ChunkedBody()
    assert body.feed(b"5\r\nhel") == b"5\r\nhel"
    assert body.feed(b"lo\r") == b"lo\r"
    assert body.feed(b"\n0\r\n") == b"\n"
    assert not body.done
    assert body.feed(b"\r\n") == b""
    assert body.done


def test_a_size_with_leading_zeros_is_told_from_the_last_chunk_only_when_its_line_is_whole():
    body = ChunkedBody()
    assert body.feed(b"0") == b""  # "0" may be the last chunk, or "0a"
    assert body.feed(b"a\r") == b""
    assert body.feed(b"\n0123456789\r\n") == b"0a\r\n0123456789\r\n"
    assert body.feed(b"0\r\n\r\n") == b""
    assert body.done


def test_chunk_extensions_pass_unchanged_and_the_last_chunks_trailers_do_not():
    sent = b'5;name=value\r\nhello\r\n6 ; quoted="a;b"\r\n world\r\n0;end\r\nX-Tokens: 2\r\n\r\n'
    for cut in range(1, len(sent)):
        body = ChunkedBody()
        passed = feed_in(body, [sent[:cut], sent[cut:]])
        assert passed == b'5;name=value\r\nhello\r\n6 ; quoted="a;b"\r\n world\r\n', cut
        assert body.done and body.rest == b"", cut


def test_the_body_ends_only_with_the_empty_line_after_the_trailers():
    body = ChunkedBody()
    body.feed(b"0\r\nX-A: 1\r\n")
    assert not body.done
    body.feed(b"X-B: 2\r\n")
    assert not body.done
    body.feed(b"\r\n")
    assert body.done


def test_bytes_after_the_end_are_kept_apart():
    body = ChunkedBody()
    assert body.feed(b"2\r\nhi\r\n0\r\n\r\nHTTP/1.1 200") == b"2\r\nhi\r\n"
    assert body.done and body.rest == b"HTTP/1.1 200"
    assert body.feed(b" OK") == b""
    assert body.rest == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize(
    ("pieces", "says"),
    [
        ([b"0x5\r\nhello\r\n"], "malformed chunk size line"),
        ([b"-5\r\nhello\r\n"], "malformed chunk size line"),
        ([b" 5\r\nhello\r\n"], "malformed chunk size line"),
        ([b"5_0\r\nhello\r\n"], "malformed chunk size line"),
        ([b"g\r\n"], "malformed chunk size line"),
        ([b"5\n"], "malformed chunk size line"),  # a bare LF
        ([b"5;a\x01\r\n"], "malformed chunk size line"),
        ([b"5 x\r\nhello\r\n"], "malformed chunk size line"),
        ([b"11111111111111111\r\n"], "malformed chunk size line"),  # more than 64 bits
        ([b"5\r\nhelloXY"], "does not end with CRLF"),
        ([b"5\r\nhello\rX"], "does not end with CRLF"),
        ([b"5\r\nhel", b"loo\r\n"], "does not end with CRLF"),
        ([b"5\r\nhello", b"\n"], "does not end with CRLF"),
        ([b"1" * (MAX_CHUNK_LINE_BYTES + 1)], "size line longer"),
        ([b"1;" + b"x" * MAX_CHUNK_LINE_BYTES], "size line longer"),
        ([b"0\r\n", b"X: y\r\n" * (MAX_TRAILER_BYTES // 6 + 1)], "trailers longer"),
    ],
)
def test_a_malformed_body_is_refused_saying_why(pieces, says):
    body = ChunkedBody()
    with pytest.raises(MalformedAnswer, match=says):
        for piece in pieces:
            body.feed(piece)


# --- the request -----------------------------------------------------------------------------


def test_a_request_names_the_server_and_its_length_and_keeps_the_headers_given():
    sent = request_bytes("POST", "/v1/chat/completions?x=1", ("10.0.0.2", 8000),
                         [("Content-Type", "application/json"), ("Authorization", "Bearer t")],
                         b'{"model": "a"}')  # fmt: skip
    assert sent == (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 10.0.0.2:8000\r\n"
        b"Content-Length: 14\r\nContent-Type: application/json\r\nAuthorization: Bearer t\r\n"
        b'\r\n{"model": "a"}'
    )


def test_a_request_for_an_http_1_0_client_is_http_1_0_and_ipv6_hosts_are_bracketed():
    sent = request_bytes("POST", "/v1/completions", ("fd00::2", 8000), [], b"", http11=False)
    assert sent.startswith(b"POST /v1/completions HTTP/1.0\r\nHost: [fd00::2]:8000\r\n")


def test_header_bytes_that_are_not_utf_8_go_out_as_they_came():
    # aiohttp's server hands `\xff` over as the surrogate escape U+DCFF
    sent = request_bytes("POST", "/v1/completions", ("h", 1), [("X-Raw", "a\udcffb")], b"")
    assert b"X-Raw: a\xffb\r\n" in sent


@pytest.mark.parametrize("header", [("X-Evil", "a\r\nHost: other"), ("X-Evil\n", "a")])
def test_a_line_break_in_a_header_is_never_sent(header):
    with pytest.raises(ValueError, match="line break"):
        request_bytes("POST", "/v1/completions", ("h", 1), [header], b"")


# --- the connection and the pool, against a server on loopback that answers given bytes ------


def exchange_with(*answers: bytes, close_after: bool = False):
    """Two requests through one pool to a server that answers each with the next of `answers`
    (closing its side after each when `close_after`): the heads, bodies or errors, and how
    many connections the server saw."""

    async def run():
        connections = 0
        left = list(answers)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            while left and await reader.readuntil(b"\r\n\r\n"):
                writer.write(left.pop(0))
                await writer.drain()
                if close_after:
                    break
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        address = ("127.0.0.1", server.sockets[0].getsockname()[1])
        pool, outcomes = UpstreamPool(), []
        for _ in range(2):
            await asyncio.sleep(0.05)  # a close of the server's is seen meanwhile
            try:
                connection = await pool.exchange(
                    address, request_bytes("POST", "/", address, [], b"")
                )
                assert connection.head is not None
                outcomes.append((connection.head.status, await connection.read_body()))
                pool.release(connection)
            except UpstreamError as exc:
                outcomes.append(exc)
        pool.close()
        server.close()
        return outcomes, connections

    return asyncio.run(run())


def test_interim_answers_are_skipped_and_a_kept_connection_is_reused():
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    assert exchange_with(answer, answer) == ([(200, b"hi"), (200, b"hi")], 1)


def test_a_connection_the_server_closed_while_idle_is_replaced():
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    assert exchange_with(answer, answer, close_after=True) == ([(200, b"hi"), (200, b"hi")], 2)


def test_bytes_past_an_answers_end_keep_its_connection_from_reuse():
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi!!"
    assert exchange_with(answer, answer)[1] == 2


def test_a_head_longer_than_the_bound_is_refused():
    (error, _), _ = exchange_with(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES)
    assert isinstance(error, MalformedAnswer)
    assert str(error) == f"an answer's head longer than {MAX_HEAD_BYTES} bytes"


def test_the_module_runs_on_the_images_python_3_8():
    ast.parse(Path(upstream.__file__).read_text(), feature_version=(3, 8))
