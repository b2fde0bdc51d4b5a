"""A stand-in for `vllm serve` in the router's unit tests: the same flags, an OpenAI-shaped
reply, an SSE stream, and a start-up time. It is not vLLM: the e2e tests run the real one.

    python3 standin_vllm.py MODEL [--port P] [--host H] [--headless] [--start-s S] [--bad-flag]
                              [--stream-chunks N]

`--stream-chunks N` is bench/router's streaming-speed mode: every streamed chat answer is N
chunks shaped like vLLM's (`data: {...chat.completion.chunk...}`, then `data: [DONE]`), one
write each, as fast as the server can (prepared once, no delay; uvloop when installed).

`GET /standin/connections` says how many chat requests came, on how many connections: a
proxy's keep-alive, seen from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--headless", action="store_true")
    parser.add_argument("--start-s", type=float, default=0.2)
    parser.add_argument("--stream-chunks", type=int, default=0)
    for flag in (
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
        "--served-model-name",
    ):
        parser.add_argument(flag)
    args = parser.parse_args()  # an unknown flag: exit 2 with "unrecognized arguments", as vLLM
    time.sleep(args.start_s)
    if args.headless:
        while True:
            time.sleep(3600)
    key = os.environ.get("VLLM_API_KEY")
    fast = vllm_chunks(args.served_model_name or args.model, args.stream_chunks)
    peers: set[object] = set()  # the connections chat requests came on (their peer address)
    chats = [0]

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def chat(request: web.Request) -> web.StreamResponse:
        if key and request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": "unauthorized"}, status=401)
        body = await request.json()
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        chats[0] += 1
        if not body.get("stream"):
            return web.json_response(
                {"object": "chat.completion", "model": body["model"], "pid": os.getpid(),
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
            )  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if fast:
            for chunk_bytes in fast:
                await response.write(chunk_bytes)
            return response
        for i in range(3):
            chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": str(i)}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(float(body.get("delay_s", 0)))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def connections(request: web.Request) -> web.Response:
        """How many chat requests came, on how many connections (keep-alive seen from here)."""
        return web.json_response({"requests": chats[0], "connections": len(peers)})

    if fast:
        with contextlib.suppress(ImportError):  # as the router: vLLM's images have uvloop
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/standin/connections", connections)
    # vLLM serves many routes besides the OpenAI API (/invocations, /tokenize, /pause, ...):
    # any path that reaches this server says so, so a test sees what a proxy let through.
    app.router.add_route("*", "/{tail:.*}", reached)
    web.run_app(app, host=args.host, port=args.port, print=None)


async def reached(request: web.Request) -> web.Response:
    return web.json_response({"reached": request.path, "method": request.method})


def vllm_chunks(model: str, count: int) -> list[bytes]:
    """`count` SSE chunks as vLLM streams a chat completion (role first, finish_reason last),
    then `data: [DONE]`; empty for count 0."""
    if count <= 0:
        return []
    created = int(time.time())
    chunks = []
    for i in range(count):
        delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f" tok{i}"}
        finish = "length" if i == count - 1 else None
        chunk = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}]}  # fmt: skip
        chunks.append(f"data: {json.dumps(chunk)}\n\n".encode())
    return [*chunks, b"data: [DONE]\n\n"]


if __name__ == "__main__":
    sys.exit(main())
