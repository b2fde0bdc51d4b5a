"""A node's agent: starts and stops the ranks of the models placed on this node.

It listens on the node's cluster address, and every request needs the cluster's agent token
(the router holds it). It starts only the models of its `ServingConfig`, with argv that
`vcluster up` wrote: a token holder can start and stop the configured models, nothing else.

Each rank runs in its own process group inside the agent's session: a stop ends the whole
group (vLLM's API server, engine core and workers), and when the agent itself dies the
container's supervisor ends the session, ranks included.

A model with sleep mode (`ModelEntry.sleep`) is put to sleep and woken through the agent of its
rank 0: vLLM's development routes (`/sleep`, `/wake_up`, `/is_sleeping`, `/collective_rpc`)
are called by the agent alone, with the token; the router's users never reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from aiohttp import web

if TYPE_CHECKING:  # aiohttp has named it since 3.9; annotations only
    from aiohttp.typedefs import Middleware

from cluster.remote.serving.auth import bearer_matches
from cluster.remote.serving.catalog import AGENT_TOKEN_ENV, API_KEY_ENV, ModelEntry, ServingConfig
from cluster.remote.serving.failures import error_lines, likely_cause
from cluster.remote.serving.placement import Placement
from cluster.remote.serving.vllm_guard import MIDDLEWARE

STOP_GRACE_S = 8.0
SLEEP_TIMEOUT_S = 300.0
"""Longest a sleep may take: level 1 copies the weights to host memory (GPU to RAM)."""
WAKE_TIMEOUT_S = 600.0
"""Longest a wake may take: level 2 reads the weights from disk again."""
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
"""vLLM serves its development routes (sleep and wake among them) only with this set to 1."""
SLEEP_MODE_FLAG = "--enable-sleep-mode"
PACKAGE_ROOT = os.path.dirname(next(iter(sys.modules["cluster"].__path__)))
"""Where the package `cluster` is imported from (`serving.pyz` in the containers): vLLM
imports the guard (`vllm_guard`) from there."""

LOG_TAIL_BYTES = 64 * 1024

Result = TypeVar("Result")


async def in_thread(function: Callable[..., Result], *args: Any) -> Result:
    """`asyncio.to_thread`, which came with Python 3.9 (the images' Python may be 3.8)."""
    call = functools.partial(contextvars.copy_context().run, function, *args)
    return await asyncio.get_running_loop().run_in_executor(None, call)


def rank_argv(
    config: ServingConfig, model: ModelEntry, placement: Placement, rank: int
) -> list[str]:
    """The model's `vllm serve` argv for one rank of a placement."""
    argv = list(model.argv)
    first = config.node(placement[0][0])
    if len(placement) > 1:
        argv += ["--nnodes", str(len(placement)), "--node-rank", str(rank)]
        argv += ["--master-addr", first.address, "--master-port", str(model.master_port)]
    if model.sleep is not None:  # every rank: each node's workers allocate for sleep mode
        argv.append(SLEEP_MODE_FLAG)
    if rank > 0:
        argv.append("--headless")
    else:
        # vLLM checks its key only under /v1 (vllm#58144): the guard closes every other route
        # but the probes to all but the node's agent (the development routes of sleep mode too)
        argv += ["--middleware", MIDDLEWARE]
        argv += ["--host", api_host(config, placement), "--port", str(model.api_port)]
    return argv


def api_host(config: ServingConfig, placement: Placement) -> str:
    """Where the model's API server listens: loopback on the head (the router is there),
    else the node's cluster address, with the agent token as its key."""
    first = config.node(placement[0][0])
    return "127.0.0.1" if first.head else first.address


def rank_environment(
    config: ServingConfig,
    placement: Placement,
    rank: int,
    base: dict[str, str],
    model: ModelEntry | None = None,
) -> dict[str, str]:
    """The rank's environment: its GPUs, the agent token as its API server's key, the guard's
    package on its path, and for a model with sleep mode vLLM's development routes."""
    environment = {k: v for k, v in base.items() if k not in (AGENT_TOKEN_ENV, DEV_MODE_ENV)}
    environment[API_KEY_ENV] = base.get(AGENT_TOKEN_ENV, "")
    paths = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join([*paths, PACKAGE_ROOT])
    if model is not None and model.sleep is not None:
        environment[DEV_MODE_ENV] = "1"
    node_name, devices = placement[rank]
    if config.accelerator == "nvidia":
        node = config.node(node_name)
        visible = ",".join(str(node.visible_index(d)) for d in devices)
        environment["CUDA_VISIBLE_DEVICES"] = visible
    return environment


def placement_problem(
    config: ServingConfig, model: ModelEntry, node: str, rank: int, placement: Placement
) -> str | None:
    """Why this node's agent must not start `rank` of `placement` for `model`, or None.

    Checked before anything that runs is stopped: a request the agent cannot carry out
    leaves the node as it was.
    """
    if len(placement) != model.pipeline_parallel:
        return (
            f"{model.served} has {model.pipeline_parallel} rank(s), the placement {len(placement)}"
        )
    if not 0 <= rank < len(placement):
        return f"rank {rank} is not in the placement (ranks 0 to {len(placement) - 1})"
    nodes = {n.name: n for n in config.nodes}
    seen: set[str] = set()
    for index, (name, devices) in enumerate(placement):
        if name not in nodes:
            return f"rank {index} names node {name!r}, which is not in the cluster"
        if name in seen:
            return f"rank {index} is on {name} too: one rank per node"
        seen.add(name)
        if len(devices) != model.tensor_parallel or len(set(devices)) != len(devices):
            return (
                f"rank {index} needs {model.tensor_parallel} distinct device(s), "
                f"the placement gives {list(devices)}"
            )
        missing = sorted(set(devices) - set(nodes[name].devices))
        if missing:
            return f"rank {index}: {name} has no device(s) {missing}"
    if placement[rank][0] != node:
        return f"rank {rank} of that placement is on {placement[rank][0]}, not on {node}"
    return None


def parse_start(body: object) -> tuple[str, int, Placement]:
    """The launch id, rank and placement of a start request; ValueError when malformed."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object with launch, rank and placement")
    launch, rank, raw = body.get("launch"), body.get("rank"), body.get("placement")
    if not isinstance(launch, str) or not launch:
        raise ValueError("launch must be a non-empty string")
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise ValueError("rank must be an integer")
    if not isinstance(raw, list) or not raw or not all(map(_is_rank_item, raw)):
        raise ValueError("placement must be a non-empty list of [node, [devices]]")
    return launch, rank, tuple((node, tuple(devices)) for node, devices in raw)


def _is_rank_item(item: object) -> bool:
    """`[node name, [device, ...]]`, as the router sends it."""
    if not (isinstance(item, list) and len(item) == 2):
        return False
    node, devices = item
    return (
        isinstance(node, str)
        and isinstance(devices, list)
        and all(isinstance(d, int) and not isinstance(d, bool) for d in devices)
    )


def log_path(config: ServingConfig, served: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in served)
    return Path(config.log_dir) / f"model-{safe}.log"


class SleepError(Exception):
    """vLLM did not sleep or wake as asked: the message says what it answered."""


@dataclass
class Rank:
    served: str
    launch: str
    rank: int
    process: subprocess.Popen[bytes]
    log: Path
    started_at: float
    placement: Placement = ()
    asleep: int | None = None
    """The sleep level vLLM was put to (known on rank 0's node), or None when awake."""

    def report(self, memory: bool = False) -> dict[str, Any]:
        code = self.process.poll()
        report: dict[str, Any] = {
            "launch": self.launch,
            "rank": self.rank,
            "running": code is None,
            "pid": self.process.pid,
            "running_s": round(time.monotonic() - self.started_at, 1),
            "asleep": self.asleep,
        }
        if memory and code is None:
            report["host_memory_bytes"] = group_resident_bytes(self.process.pid)
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
        problem = placement_problem(self.config, model, self.node, rank, placement)
        if problem is not None:
            raise ValueError(problem)
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
                rank_environment(self.config, placement, rank, self.environment, model),
            )
        started = Rank(served, launch, rank, process, path, time.monotonic(), placement)
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

    def report(self, memory: bool = False) -> dict[str, Any]:
        with self.lock:
            ranks = list(self.ranks.items())
        return {served: rank.report(memory) for served, rank in ranks}

    def sleep(self, served: str) -> dict[str, Any]:
        """Puts the model to its configured sleep level through its rank 0 on this node."""
        model, rank = self._rank_zero(served)
        level = model.sleep
        assert level is not None
        self._vllm(model, rank, "POST", f"/sleep?level={level}", timeout=SLEEP_TIMEOUT_S)
        if not self._is_sleeping(model, rank):
            raise SleepError(f"vLLM answered the sleep of {served} but says it is awake")
        rank.asleep = level
        return rank.report(memory=True)

    def wake(self, served: str) -> dict[str, Any]:
        """Wakes the model; at level 2 its weights are read from disk again between the two
        halves of the wake (vLLM's sequence: weights, `reload_weights`, KV cache)."""
        model, rank = self._rank_zero(served)
        started = time.monotonic()
        if rank.asleep == 2:
            self._vllm(model, rank, "POST", "/wake_up?tags=weights", timeout=WAKE_TIMEOUT_S)
            self._vllm(
                model,
                rank,
                "POST",
                "/collective_rpc",
                {"method": "reload_weights"},
                timeout=WAKE_TIMEOUT_S,
            )
            self._vllm(model, rank, "POST", "/wake_up?tags=kv_cache", timeout=WAKE_TIMEOUT_S)
        else:
            self._vllm(model, rank, "POST", "/wake_up", timeout=WAKE_TIMEOUT_S)
        if self._is_sleeping(model, rank):
            raise SleepError(f"vLLM answered the wake of {served} but says it still sleeps")
        rank.asleep = None
        report = rank.report()
        report["wake_s"] = round(time.monotonic() - started, 3)
        return report

    def _rank_zero(self, served: str) -> tuple[ModelEntry, Rank]:
        model = self.config.model(served)
        if model is None:
            raise KeyError(served)
        if model.sleep is None:
            raise SleepError(f"{served} runs without sleep mode (sleep: off)")
        with self.lock:
            rank = self.ranks.get(served)
        if rank is None or rank.process.poll() is not None:
            raise SleepError(f"{served} does not run on {self.node}")
        if rank.rank != 0:
            raise SleepError(f"{served} has rank {rank.rank} on {self.node}; rank 0 sleeps it")
        return model, rank

    def _is_sleeping(self, model: ModelEntry, rank: Rank) -> bool:
        answer = self._vllm(model, rank, "GET", "/is_sleeping", timeout=30.0)
        if not isinstance(answer, dict) or not isinstance(answer.get("is_sleeping"), bool):
            raise SleepError(f"/is_sleeping answered {answer!r}")
        return answer["is_sleeping"]

    def _vllm(
        self,
        model: ModelEntry,
        rank: Rank,
        method: str,
        path: str,
        body: object | None = None,
        *,
        timeout: float,
    ) -> object:
        """One call to a development route of the model's API server, with the agent token,
        from the address it listens on (the guard serves those routes to this node only); its
        JSON answer (None when empty). A refusal or an error is a SleepError."""
        host = api_host(self.config, rank.placement)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.environment.get(AGENT_TOKEN_ENV, '')}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        name = path.split("?", 1)[0]
        connection = http.client.HTTPConnection(
            host, model.api_port, timeout=timeout, source_address=(host, 0)
        )
        try:
            connection.request(method, path, data, headers)
            reply = connection.getresponse()
            text = reply.read().decode(errors="replace")
        except OSError as error:
            raise SleepError(f"{name} did not answer: {error}") from None
        finally:
            connection.close()
        if reply.status != 200:
            raise SleepError(f"{name} answered {reply.status}: {text.strip()[:300]}")
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            return text


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


def group_resident_bytes(group: int) -> int:
    """The resident memory of a process group's processes (Linux /proc; 0 elsewhere): what
    a sleeping model holds in host memory (its weights at level 1)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
            # the fields after the command name, which may hold spaces and parentheses
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != group:
                continue
            with open(f"/proc/{entry}/statm", encoding="ascii") as handle:
                total += int(handle.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
    return total


def _read_tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


if TYPE_CHECKING:  # annotations only: `Callable[...]` at run time needs Python 3.9
    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_required(token: str) -> Middleware:
    """Middleware: every request carries `Authorization: Bearer TOKEN`; anything else, a
    malformed header included, is a 401."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not bearer_matches(request.headers.get("Authorization", ""), token):
            return web.json_response({"error": "the agent token is required"}, status=401)
        return await handler(request)

    return check


def agent_app(agent: Agent, token: str) -> web.Application:
    """The agent's HTTP API: GET and DELETE /ranks, PUT and DELETE /ranks/{served}, and
    POST /sleep/{served} and /wake/{served} (the node of the model's rank 0).

    `served` is the model's served name, percent-encoded by the router (it may hold `/`); it
    is looked up as is among the configured models, so no name reaches anything else.
    """
    app = web.Application(middlewares=[token_required(token)])

    def unknown(served: str) -> web.Response:
        return web.json_response({"error": f"{served!r} is not configured"}, status=404)

    async def ranks(request: web.Request) -> web.Response:
        memory = request.query.get("memory") == "1"  # reads /proc: asked for sleepers only
        if memory:
            return web.json_response(await in_thread(agent.report, True))
        return web.json_response(agent.report())

    def sleep_route(action: Callable[[str], dict[str, Any]]) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            served = request.match_info["served"]
            if agent.config.model(served) is None:
                return unknown(served)
            try:
                return web.json_response(await in_thread(action, served))
            except KeyError:
                return unknown(served)
            except SleepError as exc:
                return web.json_response({"error": str(exc)}, status=502)

        return handle

    async def start(request: web.Request) -> web.Response:
        served = request.match_info["served"]
        if agent.config.model(served) is None:
            return unknown(served)
        try:
            launch, rank, placement = parse_start(json.loads(await request.read()))
        except (ValueError, RecursionError) as exc:  # JSON, UTF-8 and nesting errors too
            return web.json_response({"error": f"a bad start request: {exc}"}, status=400)
        try:
            started = await in_thread(agent.start, served, launch, rank, placement)
        except KeyError:
            return unknown(served)
        except (ValueError, OSError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(started.report())

    async def stop(request: web.Request) -> web.Response:
        served = request.match_info["served"]
        if agent.config.model(served) is None:
            return unknown(served)
        await in_thread(agent.stop, served)
        return web.json_response({})

    async def stop_all(request: web.Request) -> web.Response:
        await in_thread(agent.stop_all)
        return web.json_response({})

    app.router.add_get("/ranks", ranks)
    # `.+`: a served name with `/` (a Hugging Face id) matches whether or not it was encoded
    app.router.add_put("/ranks/{served:.+}", start)
    app.router.add_delete("/ranks/{served:.+}", stop)
    app.router.add_delete("/ranks", stop_all)
    app.router.add_post("/sleep/{served:.+}", sleep_route(agent.sleep))
    app.router.add_post("/wake/{served:.+}", sleep_route(agent.wake))
    return app
