"""A node's agent: starts and stops the ranks of the models placed on this node.

It listens on the node's cluster address, and every request needs the cluster's agent token
(the router holds it). It starts only the models of its `ServingConfig`, with argv that
`vcluster up` wrote: a token holder can start and stop the configured models, nothing else.

Each rank runs in its own process group inside the agent's session: a stop ends the whole
group (vLLM's API server, engine core and workers), and when the agent itself dies the
container's supervisor ends the session, ranks included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:  # aiohttp has named it since 3.9; annotations only
    from aiohttp.typedefs import Middleware

from cluster.serving.catalog import AGENT_TOKEN_ENV, API_KEY_ENV, ModelEntry, ServingConfig
from cluster.serving.failures import error_lines, likely_cause
from cluster.serving.placement import Placement

STOP_GRACE_S = 8.0

LOG_TAIL_BYTES = 64 * 1024


def rank_argv(
    config: ServingConfig, model: ModelEntry, placement: Placement, rank: int
) -> list[str]:
    """The model's `vllm serve` argv for one rank of a placement."""
    argv = list(model.argv)
    first = config.node(placement[0][0])
    if len(placement) > 1:
        argv += [
            "--nnodes", str(len(placement)),
            "--node-rank", str(rank),
            "--master-addr", first.address,
            "--master-port", str(model.master_port),
        ]  # fmt: skip
    if rank > 0:
        argv.append("--headless")
    else:
        argv += ["--host", api_host(config, placement), "--port", str(model.api_port)]
    return argv


def api_host(config: ServingConfig, placement: Placement) -> str:
    """Where the model's API server listens: loopback on the head (the router is there),
    else the node's cluster address, with the agent token as its key."""
    first = config.node(placement[0][0])
    return "127.0.0.1" if first.head else first.address


def rank_environment(
    config: ServingConfig, placement: Placement, rank: int, base: dict[str, str]
) -> dict[str, str]:
    """The rank's environment: its GPUs, and the agent token as its API server's key."""
    environment = {k: v for k, v in base.items() if k != AGENT_TOKEN_ENV}
    environment[API_KEY_ENV] = base.get(AGENT_TOKEN_ENV, "")
    node_name, devices = placement[rank]
    if config.accelerator == "nvidia":
        node = config.node(node_name)
        visible = ",".join(str(node.visible_index(d)) for d in devices)
        environment["CUDA_VISIBLE_DEVICES"] = visible
    return environment


def log_path(config: ServingConfig, served: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in served)
    return Path(config.log_dir) / f"model-{safe}.log"


@dataclass
class Rank:
    served: str
    launch: str
    rank: int
    process: subprocess.Popen[bytes]
    log: Path
    started_at: float

    def report(self) -> dict[str, Any]:
        code = self.process.poll()
        report: dict[str, Any] = {
            "launch": self.launch,
            "rank": self.rank,
            "running": code is None,
            "pid": self.process.pid,
            "running_s": round(time.monotonic() - self.started_at, 1),
        }
        if code is not None:
            report["exit"] = _exit_cause(code)
            tail = _read_tail(self.log)
            cause = likely_cause(tail)
            report["cause"] = (
                {"summary": cause.summary, "fix": cause.fix} if cause is not None else None
            )
            report["errors"] = error_lines(tail) or tail.strip().splitlines()[-3:]
        return report


class Agent:
    """The ranks this node runs, by served model name."""

    def __init__(self, config: ServingConfig, node: str, environment: dict[str, str]) -> None:
        self.config = config
        self.node = node
        self.environment = environment
        self.ranks: dict[str, Rank] = {}
        self.lock = threading.Lock()
        """start and stop run in threads while report reads the ranks on the event loop."""

    def start(self, served: str, launch: str, rank: int, placement: Placement) -> Rank:
        model = self.config.model(served)
        if model is None:
            raise KeyError(served)
        if placement[rank][0] != self.node:
            raise ValueError(f"rank {rank} of that placement is on {placement[rank][0]}")
        with self.lock:
            current = self.ranks.get(served)
        if current is not None and current.launch == launch and current.process.poll() is None:
            return current
        self.stop(served)
        path = log_path(self.config, served)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as log:
            log.write(f"\n==== vcluster: rank {rank} of {served}, launch {launch} ====\n".encode())
            log.flush()
            process = _in_own_group(
                rank_argv(self.config, model, placement, rank),
                log,
                rank_environment(self.config, placement, rank, self.environment),
            )
        started = Rank(served, launch, rank, process, path, time.monotonic())
        with self.lock:
            self.ranks[served] = started
        return started

    def stop(self, served: str) -> None:
        """Ends every process of the rank's group: SIGTERM, SIGKILL after the grace time."""
        with self.lock:
            rank = self.ranks.pop(served, None)
        if rank is None:
            return
        group = rank.process.pid
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while _group_alive(group, rank.process) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            rank.process.wait(timeout=5)

    def stop_all(self) -> None:
        with self.lock:
            served = list(self.ranks)
        for name in served:
            self.stop(name)

    def report(self) -> dict[str, Any]:
        with self.lock:
            ranks = list(self.ranks.items())
        return {served: rank.report() for served, rank in ranks}


def _in_own_group(argv: list[str], log: IO[bytes], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a rank as the leader of its own process group, its output into `log`."""
    if sys.version_info >= (3, 11):
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0
        )
    # Popen's process_group came with Python 3.11; the images' Python may be older
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=os.setpgrp,
    )


def _group_alive(group: int, leader: subprocess.Popen[bytes]) -> bool:
    leader.poll()  # reaps the leader; orphans are reaped by the container's first process
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def _exit_cause(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _read_tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_required(token: str) -> Middleware:
    """Middleware: every request carries `Authorization: Bearer TOKEN`."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": "the agent token is required"}, status=401)
        return await handler(request)

    return check


def agent_app(agent: Agent, token: str) -> web.Application:
    """The agent's HTTP API: GET and DELETE /ranks, PUT and DELETE /ranks/{served}."""
    app = web.Application(middlewares=[token_required(token)])

    async def ranks(request: web.Request) -> web.Response:
        return web.json_response(agent.report())

    async def start(request: web.Request) -> web.Response:
        served = request.match_info["served"]
        body = await request.json()
        placement: Placement = tuple(
            (str(n), tuple(int(d) for d in ds)) for n, ds in body["placement"]
        )
        try:
            rank = await asyncio.to_thread(
                agent.start, served, str(body["launch"]), int(body["rank"]), placement
            )
        except KeyError:
            return web.json_response({"error": f"{served} is not configured"}, status=404)
        except (ValueError, OSError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(rank.report())

    async def stop(request: web.Request) -> web.Response:
        await asyncio.to_thread(agent.stop, request.match_info["served"])
        return web.json_response({})

    async def stop_all(request: web.Request) -> web.Response:
        await asyncio.to_thread(agent.stop_all)
        return web.json_response({})

    app.router.add_get("/ranks", ranks)
    app.router.add_put("/ranks/{served}", start)
    app.router.add_delete("/ranks/{served}", stop)
    app.router.add_delete("/ranks", stop_all)
    return app
