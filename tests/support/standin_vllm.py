"""A stand-in for `vllm serve` in the router's unit tests: the same flags, an OpenAI-shaped
reply, an SSE stream, and a start-up time. It is not vLLM: the e2e tests run the real one.

    python3 standin_vllm.py MODEL [--port P] [--host H] [--headless] [--start-s S] [--bad-flag]
"""

from __future__ import annotations

import argparse
import asyncio
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

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def chat(request: web.Request) -> web.StreamResponse:
        if key and request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": "unauthorized"}, status=401)
        body = await request.json()
        if not body.get("stream"):
            return web.json_response(
                {"object": "chat.completion", "model": body["model"], "pid": os.getpid(),
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
            )  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": str(i)}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(float(body.get("delay_s", 0)))
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    sys.exit(main())
