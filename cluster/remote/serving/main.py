"""The entry point in the containers: `python3 serving.pyz router|agent|front CONFIG NODE`.

`router` (the head, several models) serves the endpoint and runs the head's agent; `agent`
(every other node) runs the node's agent only; both stop every rank they started when they are
stopped. `front` (the head, one model) serves the endpoint in front of the vLLM that the
container's supervisor runs on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
from pathlib import Path

from aiohttp import web

from cluster.remote.serving.agent import Agent, agent_app, in_thread
from cluster.remote.serving.catalog import (
    AGENT_TOKEN_ENV,
    AGENT_TOKEN_FILE,
    API_KEY_FILE,
    ROUTER_SOCKET,
    SECRETS_DIR,
    ServingConfig,
    read_secret,
)
from cluster.remote.serving.router import Router, router_app


async def serve(role: str, config: ServingConfig, node: str) -> None:
    runners = []
    agent = None
    token = read_secret(config.state_dir, AGENT_TOKEN_FILE) or ""
    if role in ("router", "agent"):
        if not token:
            raise SystemExit(f"no {SECRETS_DIR}/{AGENT_TOKEN_FILE}: the agents would be open")
        agent = Agent(config, node, {**os.environ, AGENT_TOKEN_ENV: token})
        agent_runner = web.AppRunner(agent_app(agent, token), access_log=None)
        await agent_runner.setup()
        runners.append(agent_runner)
        await web.TCPSite(agent_runner, config.node(node).address, config.agent_port).start()
    router = None
    if role in ("router", "front"):
        router = Router(config, token)
        await router.start()
        api_key = read_secret(config.state_dir, API_KEY_FILE)
        public = web.AppRunner(router_app(router, api_key), access_log=None)
        local = web.AppRunner(router_app(router, None, local=True), access_log=None)
        for runner in (public, local):
            await runner.setup()
            runners.append(runner)
        # the endpoint, on the head's cluster address (it is the users' only door)
        await web.TCPSite(public, config.node(node).address, config.port).start()
        socket_path = Path(config.state_dir) / ROUTER_SOCKET
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        await web.UnixSite(local, str(socket_path)).start()
        os.chmod(socket_path, stat.S_IRUSR | stat.S_IWUSR)
    logging.getLogger("vcluster").info("%s on %s ready", role, node)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        if router is not None:
            await router.close()
        for runner in runners:
            await runner.cleanup()
        if agent is not None:
            await in_thread(agent.stop_all)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("router", "agent", "front"):
        print("usage: serving.pyz router|agent|front CONFIG_PATH NODE_NAME", file=sys.stderr)
        return 2
    role, config_path, node = argv
    logging.basicConfig(
        level=logging.INFO, format=f"vcluster-{role}: %(asctime)s %(levelname)s %(message)s"
    )
    config = ServingConfig.from_json(Path(config_path).read_text())
    with contextlib.suppress(ImportError):  # vLLM's images have uvloop: less CPU per request
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(role, config, node))
    return 0
