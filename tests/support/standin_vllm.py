"""A stand-in for `vllm serve` in the router's unit tests: the same flags, an OpenAI-shaped
reply, an SSE stream, and a start-up time. It is not vLLM: the e2e tests run the real one.

    python3 standin_vllm.py MODEL [--port P] [--host H] [--headless] [--start-s S] [--bad-flag]
                              [--stream-chunks N] [--enable-sleep-mode] [--fail-wake]
                              [--wake-s S] [--sleep-host-mb MB]

`--stream-chunks N` is bench/router's streaming-speed mode: every streamed chat answer is N
chunks shaped like vLLM's (`data: {...chat.completion.chunk...}`, then `data: [DONE]`), one
write each, as fast as the server can (prepared once, no delay; uvloop when installed).

`GET /standin/connections` says how many chat requests came, on how many connections: a
proxy's keep-alive, seen from the server.

`--standin`: it stands in for vLLM inside the sandbox's containers (tests/support/standin_node.py,
the e2e tier's stories about vcluster rather than vLLM). It then takes every flag vcluster gives
`vllm serve`, answers `/v1/models`, `/v1/completions` and `/metrics` as vLLM does, and keeps a
child titled `VLLM::EngineCore`, as vLLM titles its engine (the supervisor watches such children).

Sleep mode as vLLM serves it (docs/models.md): with `VLLM_SERVER_DEV_MODE=1` the development
routes `POST /sleep?level=N`, `POST /wake_up[?tags=...]`, `GET /is_sleeping` and
`POST /collective_rpc` exist (with the key, as vcluster's guard asks of vLLM's); sleeping needs
`--enable-sleep-mode`. Asleep, a chat gets 503. `--fail-wake`: every wake fails (500).
`--wake-s S`: a wake takes S seconds. `--sleep-host-mb MB`: level 1 holds MB of host memory
while asleep (the weights in host RAM). `GET /standin/sleep` counts sleeps, wakes and reloads.
`--middleware MODULE.NAME`: as vLLM, the module is imported (from PYTHONPATH); its `refusal`
(cluster/remote/serving/vllm_guard.py) judges every request, as the guard does inside vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import subprocess
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
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--fail-wake", action="store_true")
    parser.add_argument("--wake-s", type=float, default=0.0)
    parser.add_argument("--sleep-host-mb", type=int, default=0)
    parser.add_argument("--middleware", action="append", default=[])
    parser.add_argument("--standin", action="store_true")
    for flag in (
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
        "--served-model-name",
        "--tensor-parallel-size",
        "--pipeline-parallel-size",
        "--distributed-executor-backend",
        "--dtype",
        "--max-model-len",
    ):
        parser.add_argument(flag)
    args = parser.parse_args()  # an unknown flag: exit 2 with "unrecognized arguments", as vLLM
    if args.standin:  # /bin/sleep under vLLM's engine title, in this process's session
        subprocess.Popen(["VLLM::EngineCore", "infinity"], executable="/bin/sleep")
    time.sleep(args.start_s)
    if args.headless:
        while True:
            time.sleep(3600)
    key = os.environ.get("VLLM_API_KEY")
    fast = vllm_chunks(args.served_model_name or args.model, args.stream_chunks)
    peers: set[object] = set()  # the connections chat requests came on (their peer address)
    chats = [0]

    sleep = {"level": 0, "sleeps": 0, "wakes": 0, "reloads": 0, "held": b""}

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    def unauthorized(request: web.Request) -> web.Response | None:
        if key and request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return None

    async def put_to_sleep(request: web.Request) -> web.Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        if not args.enable_sleep_mode:
            return web.json_response({"error": "sleep mode is not enabled"}, status=500)
        level = int(request.query.get("level", "1"))
        sleep.update(level=level, sleeps=sleep["sleeps"] + 1)
        if level == 1 and args.sleep_host_mb:
            sleep["held"] = bytearray(args.sleep_host_mb * 1024 * 1024)  # touched: resident
        return web.Response()  # vLLM 0.26 answers an empty 200

    async def wake_up(request: web.Request) -> web.Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        await asyncio.sleep(args.wake_s)
        if args.fail_wake:
            return web.json_response({"error": "CUDA error: out of memory"}, status=500)
        tags = request.query.getall("tags", [])
        if not tags or "kv_cache" in tags:
            sleep.update(level=0, wakes=sleep["wakes"] + 1, held=b"")
        return web.Response()

    async def is_sleeping(request: web.Request) -> web.Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        return web.json_response({"is_sleeping": sleep["level"] > 0})

    async def collective_rpc(request: web.Request) -> web.Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        if (await request.json()).get("method") == "reload_weights":
            sleep["reloads"] += 1
        return web.Response()

    async def sleep_counts(request: web.Request) -> web.Response:
        return web.json_response({k: v for k, v in sleep.items() if k != "held"})

    async def chat(request: web.Request) -> web.StreamResponse:
        if (refused := unauthorized(request)) is not None:
            return refused
        if sleep["level"]:
            return web.json_response({"error": "asleep"}, status=503)
        body = await request.json()
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        chats[0] += 1
        if not body.get("stream"):
            return web.json_response(
                {"object": "chat.completion", "model": body["model"], "pid": os.getpid(),
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                 "headers": sorted(name.lower() for name in request.headers)}
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

    served = args.served_model_name or args.model

    async def models(request: web.Request) -> web.Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        return web.json_response(
            {"object": "list", "data": [{"id": served, "object": "model", "owned_by": "vllm"}]}
        )

    async def completion(request: web.Request) -> web.Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        return web.json_response(
            {"object": "text_completion", "model": served, "usage": usage,
             "choices": [{"index": 0, "text": " hi", "finish_reason": "length"}]}
        )  # fmt: skip

    async def metrics(request: web.Request) -> web.Response:
        """The load figures vLLM exports (`vcluster status` reads them)."""
        names = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
        lines = [f"# TYPE vllm:{name} gauge\nvllm:{name}{{model_name=\"{served}\"}} 0.0"
                 for name in names]  # fmt: skip
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    if fast:
        with contextlib.suppress(ImportError):  # as the router: vLLM's images have uvloop
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = web.Application(middlewares=[guarded(name, key or "") for name in args.middleware])
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/standin/connections", connections)
    if args.standin:
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/completions", completion)
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/standin/sleep", sleep_counts)
    if os.environ.get("VLLM_SERVER_DEV_MODE") == "1":  # as vLLM: development routes only then
        app.router.add_post("/sleep", put_to_sleep)
        app.router.add_post("/wake_up", wake_up)
        app.router.add_get("/is_sleeping", is_sleeping)
        app.router.add_post("/collective_rpc", collective_rpc)
    # vLLM serves many routes besides the OpenAI API (/invocations, /tokenize, /pause, ...):
    # any path that reaches this server says so, so a test sees what a proxy let through.
    app.router.add_route("*", "/{tail:.*}", reached)
    web.run_app(app, host=args.host, port=args.port, print=None)


def guarded(middleware: str, key: str):
    """The guard named as vLLM's `--middleware` names it, judging as it would inside vLLM."""
    module = importlib.import_module(middleware.rsplit(".", 1)[0])

    @web.middleware
    async def check(request: web.Request, handler):
        transport = request.transport
        client = transport.get_extra_info("peername") if transport else None
        server = transport.get_extra_info("sockname") if transport else None
        problem = module.refusal(
            request.path,
            client[0] if client else None,
            server[0] if server else None,
            request.headers.get("Authorization", ""),
            key,
        )
        if problem is not None:
            return web.json_response({"error": problem}, status=403)
        return await handler(request)

    return check


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
