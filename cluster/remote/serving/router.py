"""The router: one OpenAI endpoint for every configured model, each loaded when asked for.

It routes by the request's `model`. A request for a model that is not loaded starts it (one
activation, however many requests ask meanwhile) and waits for it, up to `request_wait_s`;
past that it gets a 503 with Retry-After while the start goes on. Placement and eviction are
`cluster.remote.serving.placement`'s; the ranks are started by each node's agent. Responses, SSE
streams included, pass through chunk by chunk as vLLM produces them.

A model with sleep mode (`ModelEntry.sleep`) gives way by sleeping, through the agent of its
rank 0, and a request for it wakes it (one wake, however many requests ask). A wake that fails
stops the model and starts it cold; the reason stays in `wake_failure` and the log.

It is the users' only endpoint, with one model too: then the model is `external` (its vLLM is
started and restarted by the head container's supervisor, on loopback) and the router only
watches whether it serves. The users' API key is checked here, on every route but /health; only
the OpenAI routes of `cluster.remote.serving.routes` pass, and a path that could mean another one once
decoded is refused before routing. The models' own API servers take the cluster's agent token
(or, on loopback, nothing), so they are not usable from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from aiohttp import HttpVersion11, web

if TYPE_CHECKING:  # aiohttp has named it since 3.9; annotations only
    from aiohttp.typedefs import Middleware

from cluster.remote.serving.agent import api_host
from cluster.remote.serving.auth import bearer_matches
from cluster.remote.serving.catalog import ModelEntry, ServingConfig
from cluster.remote.serving.placement import Activation, Placement, Resident, plan_activation
from cluster.remote.serving.routes import (
    ADMIN_PREFIX,
    HEALTH,
    MODELS,
    is_openai_route,
    path_problem,
)
from cluster.remote.serving.upstream import (
    ClientGone,
    Downstream,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    request_bytes,
)

log = logging.getLogger("vcluster.router")

POLL_S = 1.0
START_POLL_S = 0.2
"""While a model starts: how often its API server is asked whether it serves (each poll
also asks its agents whether every rank still runs)."""
RETRY_FAILED_AFTER_S = 30.0
"""A model whose start failed is tried again by a request only after this (a load at once)."""
RETRY_AFTER_S = 10
AGENT_TIMEOUT_S = 30.0
AGENT_CONNECT_WAIT_S = 60.0
"""How long a start waits for an agent that does not accept connections yet."""
AGENT_MISSES_ALLOWED = 3
"""An agent that does not answer this many polls in a row counts as gone with its ranks."""
SLEEP_TIMEOUT_S = 330.0
WAKE_TIMEOUT_S = 630.0
"""How long the router waits for an agent's sleep or wake: the agent's own limits
(`agent.SLEEP_TIMEOUT_S`, `agent.WAKE_TIMEOUT_S`) and some."""
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "authorization",
    # a user's claims of a client address: the model's server must not log or trust them
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
}

UNLOADED, LOADING, LOADED, FAILED, UNLOADING, SLEEPING, WAKING = (
    "unloaded",
    "loading",
    "loaded",
    "failed",
    "unloading",
    "sleeping",
    "waking",
)


class Unavailable(Exception):
    """A request cannot be served now: its status, message and headers."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass
class ModelState:
    entry: ModelEntry
    state: str = UNLOADED
    placement: Placement | None = None
    launch: str | None = None
    last_used: float = 0.0
    in_flight: int = 0
    requests: int = 0
    activations: int = 0
    last_activation_s: float | None = None
    failure: str | None = None
    failed_at: float = 0.0
    started_at: float = 0.0
    ready: asyncio.Future[None] | None = None
    asleep: int | None = None
    """The level it sleeps at now."""
    wakes: int = 0
    last_wake_s: float | None = None
    last_wake_at: float = 0.0
    wake_failure: str | None = None
    """Why the last wake failed (it was started cold instead); cleared by a wake that works."""
    host_memory_bytes: int | None = None
    """What its ranks hold in host memory while it sleeps (its weights, at level 1)."""

    def resident(self) -> Resident | None:
        holding = (LOADING, LOADED, UNLOADING, SLEEPING, WAKING)
        if self.placement is None or self.state not in holding:
            return None
        return Resident(
            self.entry.served,
            self.placement,
            self.last_used,
            self.in_flight,
            self.entry.keep_loaded,
            loading=self.state not in (LOADED, SLEEPING),
            asleep=self.state == SLEEPING,
            can_sleep=self.entry.sleep is not None,
        )

    def report(self) -> dict[str, Any]:
        return {
            "name": self.entry.served,
            "state": self.state,
            "placement": [[n, list(d)] for n, d in self.placement] if self.placement else None,
            "tensor_parallel": self.entry.tensor_parallel,
            "pipeline_parallel": self.entry.pipeline_parallel,
            "keep_loaded": self.entry.keep_loaded,
            "unload_after_s": self.entry.unload_after_s,
            "last_used": _wall(self.last_used) if self.last_used else None,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "activations": self.activations,
            "last_activation_s": self.last_activation_s,
            "failure": self.failure,
            "sleep": self.entry.sleep,
            "sleep_level": self.asleep,
            "host_memory_bytes": self.host_memory_bytes,
            "wakes": self.wakes,
            "last_wake_s": self.last_wake_s,
            "last_wake_at": _wall(self.last_wake_at) if self.last_wake_at else None,
            "wake_failure": self.wake_failure,
        }


def _wall(monotonic: float) -> float:
    return round(time.time() - (time.monotonic() - monotonic), 3)


class Router:
    """The models' states and the decisions on them; HTTP is in `router_app`."""

    def __init__(self, config: ServingConfig, agent_token: str) -> None:
        self.config = config
        self.agent_token = agent_token
        self.models = {m.served: ModelState(m) for m in config.models}
        self.placing = asyncio.Lock()
        self.http: aiohttp.ClientSession | None = None
        self.upstream = UpstreamPool()
        """The proxied requests' connections; `http` is for health checks and agents."""
        self.agent_misses: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def front_only(self) -> bool:
        """One model whose vLLM the supervisor runs: no agents, nothing to start or stop."""
        return all(m.entry.external for m in self.models.values())

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self.http = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            auto_decompress=False,  # the bytes pass as the model's server sent them
        )
        if not self.front_only:
            # A restarted router starts from a clean slate: no rank of an earlier run survives.
            await asyncio.gather(
                *(self._agent("DELETE", n.name, "/ranks") for n in self.config.nodes),
                return_exceptions=True,
            )
        self._spawn(self._watch())
        for model in self.models.values():
            if model.entry.external:
                model.state = LOADING
                self._spawn(self._watch_external(model))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.http is not None:
            await self.http.close()
        self.upstream.close()

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # activation

    async def ensure_loaded(self, served: str, wait_s: float) -> ModelState:
        """The model, loaded: started if need be, waited for up to `wait_s`."""
        model = self.models[served]
        if model.state == LOADED:
            return model
        if model.entry.external:
            return await self._wait_external(model, wait_s)
        if model.state == FAILED and time.monotonic() - model.failed_at < RETRY_FAILED_AFTER_S:
            raise Unavailable(502, f"model {served!r} failed to start: {model.failure}")
        ready = self.activate(model)
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout=wait_s)
        except asyncio.TimeoutError:  # not TimeoutError before Python 3.11
            raise Unavailable(
                503, f"model {served!r} is still loading after {wait_s:g} s", RETRY_AFTER_S
            ) from None
        return model

    async def _wait_external(self, model: ModelState, wait_s: float) -> ModelState:
        """Until the supervisor's vLLM serves (the watch sees it), up to `wait_s`."""
        deadline = time.monotonic() + wait_s
        while model.state != LOADED:
            if time.monotonic() > deadline:
                raise Unavailable(
                    503,
                    f"model {model.entry.served!r} is starting: its vLLM does not serve yet",
                    RETRY_AFTER_S,
                )
            await asyncio.sleep(START_POLL_S)
        return model

    async def _watch_external(self, model: ModelState) -> None:
        """Follows whether the supervisor's vLLM serves; it is started and healed elsewhere."""
        while True:
            serves = await self._serves(model)
            if serves and model.state != LOADED:
                model.state, model.failure = LOADED, None
                model.activations += 1
                model.last_used = time.monotonic()
                log.info("%s serves", model.entry.served)
            elif not serves and model.state == LOADED:
                model.state = LOADING
                model.failure = "its vLLM stopped answering; the supervisor restarts it"
                log.warning("%s: %s", model.entry.served, model.failure)
            await asyncio.sleep(POLL_S if model.state == LOADED else START_POLL_S)

    def activate(self, model: ModelState) -> asyncio.Future[None]:
        """The future of the model's start: the running one, or a new one."""
        if model.ready is None or model.ready.done():
            if model.state == LOADED:
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                done.set_result(None)
                return done
            model.ready = asyncio.get_running_loop().create_future()
            model.ready.add_done_callback(_retrieve)
            self._spawn(self._load(model, model.ready))
        return model.ready

    async def _load(self, model: ModelState, ready: asyncio.Future[None]) -> None:
        entry = model.entry
        async with self.placing:
            waking = model.state == SLEEPING and model.placement is not None
            others = [m for m in self.models.values() if m is not model]
            decision = plan_activation(
                self.config.nodes,
                [r for m in others if (r := m.resident()) is not None],
                entry.tensor_parallel,
                entry.pipeline_parallel,
                asleep_at=model.placement if waking else None,
            )
            if not isinstance(decision, Activation):
                message = f"no room for model {entry.served!r}: {decision.reason}"
                ready.set_exception(Unavailable(503, message, RETRY_AFTER_S))
                return
            why = f"to make room for {entry.served}"
            for served in decision.sleep:
                await self.put_to_sleep(self.models[served], why=why)
            for served in decision.evict:
                await self.unload(self.models[served], why=why)
            if waking:
                model.state = WAKING
            else:
                model.state, model.placement = LOADING, decision.placement
                model.launch = uuid.uuid4().hex[:12]
            model.started_at = time.monotonic()
            model.failure = None
        if waking:
            if await self._wake(model):
                ready.set_result(None)
                return
            async with self.placing:  # a failed wake: stopped, then started cold
                await self._stop_ranks(model)
                model.state, model.placement, model.asleep = UNLOADED, None, None
                model.host_memory_bytes = None
            await self._load(model, ready)
            return
        log.info("loading %s on %s", entry.served, _where(decision.placement))
        try:
            await self._start_ranks(model)
            await self._wait_serving(model)
        except Unavailable as exc:
            failure = exc
        except Exception as exc:  # an agent's or the network's: the model did not start
            failure = Unavailable(502, f"{type(exc).__name__}: {exc}")
        else:
            model.state = LOADED
            model.activations += 1
            model.last_activation_s = round(time.monotonic() - model.started_at, 2)
            model.last_used = time.monotonic()
            log.info("%s serves (started in %.1f s)", entry.served, model.last_activation_s)
            ready.set_result(None)
            return
        await self._stop_ranks(model)
        model.state, model.placement = FAILED, None
        model.failure, model.failed_at = failure.message, time.monotonic()
        log.warning("%s failed to start: %s", entry.served, failure.message)
        message = f"model {entry.served!r} failed to start: {failure.message}"
        ready.set_exception(Unavailable(failure.status, message))

    async def _start_ranks(self, model: ModelState) -> None:
        assert model.placement is not None
        placement = [[n, list(d)] for n, d in model.placement]

        async def start(rank: int, node: str) -> None:
            body = {"launch": model.launch, "rank": rank, "placement": placement}
            deadline = time.monotonic() + AGENT_CONNECT_WAIT_S
            while True:  # an agent may still be starting (its container starts after ours)
                try:
                    reply = await self._agent("PUT", node, _ranks_path(model), body)
                    break
                except aiohttp.ClientConnectorError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(POLL_S)
            if reply[0] != 200:
                raise Unavailable(502, f"the agent on {node} refused rank {rank}: {reply[1]}")

        # every start ends (or fails) before a failure is raised: none runs on untracked
        outcomes = await asyncio.gather(
            *(start(r, n) for r, (n, _) in enumerate(model.placement)), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _wait_serving(self, model: ModelState) -> None:
        """Until the model's API server answers, a rank dies, or the start timeout passes."""
        assert model.placement is not None
        deadline = model.started_at + self.config.start_timeout_s
        while True:
            death = await self._rank_death(model)
            if death is not None:
                raise Unavailable(502, death)
            if await self._serves(model):
                return
            if time.monotonic() > deadline:
                limit = self.config.start_timeout_s
                raise Unavailable(503, f"not serving after {limit:g} s (router.start_timeout_s)")
            await asyncio.sleep(START_POLL_S)

    async def _serves(self, model: ModelState) -> bool:
        assert self.http is not None
        url = f"{self._backend(model)}/health"
        try:
            async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as reply:
                return reply.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _rank_death(self, model: ModelState, *, memory: bool = False) -> str | None:
        """Why a rank of the model is gone, or None while all run. `memory`: the ranks' host
        memory is read too, into `host_memory_bytes`."""
        assert model.placement is not None
        held = 0
        for rank, (node, _) in enumerate(model.placement):
            try:
                path = "/ranks?memory=1" if memory else "/ranks"
                status, reports = await self._agent("GET", node, path)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                misses = self.agent_misses[node] = self.agent_misses.get(node, 0) + 1
                if misses >= AGENT_MISSES_ALLOWED:
                    return f"the agent on {node} does not answer ({str(exc) or type(exc).__name__})"
                continue
            self.agent_misses[node] = 0
            if status != 200:  # the agent is in trouble, not necessarily the rank
                misses = self.agent_misses[node] = self.agent_misses.get(node, 0) + 1
                if misses >= AGENT_MISSES_ALLOWED:
                    return f"the agent on {node} answers {status}: {reports}"
                continue
            report = reports.get(model.entry.served)
            if report is None or report.get("launch") != model.launch:
                return f"rank {rank} on {node} is not running"
            if not report["running"]:
                cause = report.get("cause")
                likely = f"; likely cause: {cause['summary']}; fix: {cause['fix']}" if cause else ""
                errors = " | ".join(report.get("errors") or []) or "(empty log)"
                return f"rank {rank} on {node} {report['exit']}{likely}; errors: {errors}"
            held += report.get("host_memory_bytes") or 0
        if memory:
            model.host_memory_bytes = held
        return None

    async def unload(self, model: ModelState, *, why: str) -> None:
        if model.entry.external:
            raise Unavailable(409, f"model {model.entry.served!r} is always served on this cluster")
        if model.state in (UNLOADED, FAILED) and model.placement is None:
            return
        log.info("unloading %s: %s", model.entry.served, why)
        model.state = UNLOADING
        await self._stop_ranks(model)
        model.state, model.placement, model.launch = UNLOADED, None, None
        model.asleep, model.host_memory_bytes = None, None

    async def put_to_sleep(self, model: ModelState, *, why: str) -> None:
        """Sleeps the model at its level through its rank 0's agent; a model that does not
        fall asleep is stopped (its GPU memory must be free either way)."""
        level = model.entry.sleep
        assert model.placement is not None and level is not None
        log.info("putting %s to sleep (level %d): %s", model.entry.served, level, why)
        model.state = UNLOADING  # neither serving nor waking while it falls asleep
        node = model.placement[0][0]
        try:
            status, reply = await self._agent(
                "POST", node, _sleep_path("sleep", model), timeout=SLEEP_TIMEOUT_S
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            status, reply = 0, str(exc) or type(exc).__name__
        if status != 200:
            problem = _error_of(reply)
            log.warning("%s did not fall asleep (%s): stopping it", model.entry.served, problem)
            await self.unload(model, why=f"its sleep failed: {problem}")
            return
        model.state, model.asleep = SLEEPING, level
        model.host_memory_bytes = (
            reply.get("host_memory_bytes") if isinstance(reply, dict) else None
        )

    async def _wake(self, model: ModelState) -> bool:
        """Wakes the sleeping model on its devices; False (the reason kept in `wake_failure`
        and logged) when the wake fails."""
        assert model.placement is not None
        served, node = model.entry.served, model.placement[0][0]
        log.info("waking %s (level %s) on %s", served, model.asleep, _where(model.placement))
        try:
            status, reply = await self._agent(
                "POST", node, _sleep_path("wake", model), timeout=WAKE_TIMEOUT_S
            )
            problem = None if status == 200 else _error_of(reply)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            problem = f"the agent on {node} did not answer ({str(exc) or type(exc).__name__})"
        if problem is None:
            problem = await self._rank_death(model)  # a wake that killed a rank
        if problem is not None:
            model.wake_failure = problem
            log.warning("%s: the wake failed: %s; starting it cold", served, problem)
            return False
        now = time.monotonic()
        model.state, model.asleep, model.host_memory_bytes = LOADED, None, None
        model.wakes += 1
        model.last_wake_s = round(now - model.started_at, 3)
        model.last_wake_at = model.last_used = now
        model.wake_failure = None
        log.info("%s serves (woken in %.2f s)", served, model.last_wake_s)
        return True

    async def _stop_ranks(self, model: ModelState) -> None:
        if model.placement is None:
            return
        nodes = {n for n, _ in model.placement}
        await asyncio.gather(
            *(self._agent("DELETE", n, _ranks_path(model)) for n in nodes),
            return_exceptions=True,
        )

    # the watch: idle unloads, dead ranks, models kept loaded

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            for model in list(self.models.values()):
                if model.entry.external:
                    continue
                try:
                    await self._watch_one(model)
                except Exception:  # one model's trouble must not stop the watch
                    log.exception("watching %s", model.entry.served)

    async def _watch_one(self, model: ModelState) -> None:
        entry, now = model.entry, time.monotonic()
        if model.state == LOADED:
            idle = now - model.last_used
            if (
                entry.unload_after_s is not None
                and not model.in_flight
                and idle > entry.unload_after_s
            ):
                async with self.placing:  # no start or eviction decides on it meanwhile
                    if model.state == LOADED and not model.in_flight:
                        await self.unload(model, why=f"idle for {idle:.0f} s")
                return
            death = await self._rank_death(model)
            if death is not None:
                async with self.placing:
                    if model.state == LOADED:
                        log.warning("%s went down: %s", entry.served, death)
                        await self._stop_ranks(model)
                        model.state, model.placement = UNLOADED, None
                        model.failure = death  # the next request starts it again
        elif model.state == SLEEPING:
            await self._watch_sleeper(model, now)
        retry = model.state == UNLOADED or (
            model.state == FAILED and now - model.failed_at > RETRY_FAILED_AFTER_S
        )
        if entry.keep_loaded and retry:
            self.activate(model)

    async def _watch_sleeper(self, model: ModelState, now: float) -> None:
        """A sleeper idle past `unload_after_s` is stopped; one whose rank died is forgotten
        (the next request starts it cold); its host memory is read for `vcluster models`."""
        entry = model.entry
        idle = now - model.last_used
        if entry.unload_after_s is not None and idle > entry.unload_after_s:
            async with self.placing:
                if model.state == SLEEPING:
                    await self.unload(model, why=f"asleep and idle for {idle:.0f} s")
            return
        death = await self._rank_death(model, memory=True)
        if death is not None:
            async with self.placing:
                if model.state == SLEEPING:
                    log.warning("%s went down while asleep: %s", entry.served, death)
                    await self._stop_ranks(model)
                    model.state, model.placement, model.asleep = UNLOADED, None, None
                    model.failure = death

    # proxying

    def _backend(self, model: ModelState) -> str:
        host, port = self._api_server(model)
        return f"http://{host}:{port}"

    def _api_server(self, model: ModelState) -> tuple[str, int]:
        if model.entry.external:
            return "127.0.0.1", model.entry.api_port
        assert model.placement is not None
        return api_host(self.config, model.placement), model.entry.api_port

    async def forward(
        self, request: web.Request, model: ModelState, body: bytes
    ) -> web.StreamResponse:
        """Pass the request to the model's API server and its answer back as it comes.

        The request goes over a kept-alive connection of `cluster.remote.serving.upstream`; a
        streamed (chunked) answer passes to the client's connection as it is read, its chunks
        as the server framed them (see `_stream`).
        """
        if model.state != LOADED or (model.placement is None and not model.entry.external):
            # unloaded while the request woke
            raise Unavailable(503, f"model {model.entry.served!r} was just unloaded", RETRY_AFTER_S)
        server = self._api_server(model)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        if not model.entry.external:  # on loopback, the supervisor's vLLM has no key
            headers.append(("Authorization", f"Bearer {self.agent_token}"))
        # a client of HTTP/1.0 takes no chunks: the server is asked in HTTP/1.0 too
        chunked = request.version >= HttpVersion11
        # the raw path, checked by `path_problem` before routing: what the client sent, as sent
        message = request_bytes(
            request.method, request.raw_path, server, headers, body, http11=chunked
        )
        model.in_flight += 1
        model.requests += 1
        model.last_used = time.monotonic()
        try:
            try:
                answer = await self.upstream.exchange(server, message, client_chunked=chunked)
            except UpstreamError as exc:
                raise Unavailable(
                    502, f"model {model.entry.served!r} did not answer: {exc}"
                ) from None
            try:
                return await self._pass_answer(request, model, answer)
            finally:
                self.upstream.release(answer)  # kept for another request if read whole
        finally:
            model.in_flight -= 1
            model.last_used = time.monotonic()

    async def _pass_answer(
        self, request: web.Request, model: ModelState, answer: UpstreamConnection
    ) -> web.StreamResponse:
        """The answer whose head came: whole when it has a length, else streamed."""
        head = answer.head
        assert head is not None
        passed = [(name, value) for name, value in head.headers if name.lower() not in HOP_BY_HOP]
        if head.length is not None:  # a whole answer: one write costs less than chunk by chunk
            try:
                body = await answer.read_body()
            except UpstreamError as exc:
                raise Unavailable(
                    502, f"model {model.entry.served!r} answered in part: {exc}"
                ) from None
            whole = web.Response(status=head.status, reason=head.reason or None, body=body)
            whole.headers.extend(passed)
            return whole
        if head.chunked and request.version < HttpVersion11:
            raise Unavailable(502, f"model {model.entry.served!r} answered HTTP/1.0 with chunks")
        streaming = web.StreamResponse(status=head.status, reason=head.reason or None)
        streaming.headers.extend(passed)
        return await self._stream(request, model, answer, streaming)

    async def _stream(
        self,
        request: web.Request,
        model: ModelState,
        answer: UpstreamConnection,
        streaming: web.StreamResponse,
    ) -> web.StreamResponse:
        """Stream the body to the client's transport, bypassing aiohttp's writer.

        aiohttp writes the head (`prepare`) and the last chunk (`write_eof`); in between, the
        server's chunks go to the client's transport as they are read, framing and all (the
        client's answer is chunked too), with back-pressure through the writer's `drain`.
        All of it public aiohttp API (3.9 to 3.14: `prepare` returns the writer, and a
        StreamResponse's head is out once `write` has been called).
        """
        writer = await streaming.prepare(request)
        await streaming.write(b"")  # the head out now, on every aiohttp 3.x
        client = request.transport
        if writer is None or client is None or client.is_closing():
            return streaming  # the client left already; `release` closes the connection
        try:
            await answer.stream_to(Downstream(client, writer.drain))
        except UpstreamError as exc:
            # The answer has begun: it ends here, cut, as it is (no last chunk, so the client
            # can tell; no second status line inside it).
            log.warning("%s: a stream was cut: %s", model.entry.served, exc)
            client.close()
            return streaming
        except ClientGone:  # its connection to the server is closed: vLLM stops generating
            log.info("%s: the client left mid-stream", model.entry.served)
            return streaming
        with contextlib.suppress(ConnectionError):  # the client left after the last chunk
            await streaming.write_eof()
        return streaming

    # agents

    async def _agent(
        self,
        method: str,
        node: str,
        path: str,
        body: object | None = None,
        *,
        timeout: float = AGENT_TIMEOUT_S,
    ) -> tuple[int, Any]:
        assert self.http is not None
        address = self.config.node(node).address
        url = f"http://{address}:{self.config.agent_port}{path}"
        headers = {"Authorization": f"Bearer {self.agent_token}"}
        async with self.http.request(
            method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as reply:
            text = await reply.text()
            try:
                return reply.status, json.loads(text)
            except ValueError:
                return reply.status, text

    def report(self) -> list[dict[str, Any]]:
        return [m.report() for m in self.models.values()]


def _retrieve(future: asyncio.Future[None]) -> None:
    """Marks a start's failure as seen when no request waited for it (no asyncio warning)."""
    if not future.cancelled():
        future.exception()


def _ranks_path(model: ModelState) -> str:
    """The agent's route for a model's ranks: the name quoted whole, `/` included."""
    return f"/ranks/{quote(model.entry.served, safe='')}"


def _sleep_path(action: str, model: ModelState) -> str:
    """The agent's route that sleeps or wakes a model: `/sleep/NAME` or `/wake/NAME`."""
    return f"/{action}/{quote(model.entry.served, safe='')}"


def _error_of(reply: Any) -> str:
    """The `error` of an agent's JSON answer, else the answer as text."""
    if isinstance(reply, dict) and "error" in reply:
        return str(reply["error"])
    return str(reply)[:300]


def _where(placement: Placement) -> str:
    return ", ".join(f"{n} [{','.join(map(str, d))}]" for n, d in placement)


def openai_error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    kinds = {
        400: "BadRequestError",
        401: "AuthenticationError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        409: "ConflictError",
        502: "BadGatewayError",
    }
    response = web.json_response(
        {
            "error": {
                "message": message,
                "type": kinds.get(status, "ServiceUnavailableError"),
                "param": None,
                "code": status,
            }
        },
        status=status,
    )
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


if TYPE_CHECKING:  # annotations only: Callable[...] at run time needs Python 3.9
    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def path_checked() -> Middleware:
    """Middleware: a path that could mean another once decoded or normalised gets 400, before
    the key is checked or any route is matched."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        problem = path_problem(request.raw_path)
        if problem is not None:
            return openai_error(400, f"refused path: {problem}")
        return await handler(request)

    return check


def api_key_required(api_key: str) -> Middleware:
    """Middleware: every path but /health needs `Authorization: Bearer KEY` (constant time)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != HEALTH and not bearer_matches(
            request.headers.get("Authorization", ""), api_key
        ):
            return openai_error(401, "a valid API key is required (Authorization: Bearer KEY)")
        return await handler(request)

    return check


def router_app(router: Router, api_key: str | None, *, local: bool = False) -> web.Application:
    """The endpoint: the allowed OpenAI routes, /health, and the administrative /vcluster/ routes.

    The public endpoint (`local` False) checks `api_key` on every route but /health; without a
    key (`router.allow_anonymous`) it serves no administrative route. The local one (the Unix
    socket, reached by `docker exec` in the head container) needs no key.
    """
    middlewares = [path_checked()]
    if api_key and not local:
        middlewares.append(api_key_required(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=256 * 1024**2)
    config = router.config
    admin = local or bool(api_key)

    async def health(request: web.Request) -> web.Response:
        if router.front_only and any(m.state != LOADED for m in router.models.values()):
            return web.Response(status=503, text="the model is starting")
        return web.Response(text="ok")

    async def list_models(request: web.Request) -> web.Response:
        created = int(time.time())
        data = [
            {
                "id": m["name"],
                "object": "model",
                "created": created,
                "owned_by": "vcluster",
                "vcluster": {"state": m["state"], "failure": m["failure"]},
            }
            for m in router.report()
        ]
        return web.json_response({"object": "list", "data": data})

    async def openai_call(request: web.Request) -> web.StreamResponse:
        if not is_openai_route(request.method, request.path):
            return not_found(request)
        body = await request.read()
        try:
            served = json.loads(body)["model"]
        except (ValueError, KeyError, TypeError):
            return openai_error(400, "the request needs a JSON body with a `model`")
        if not isinstance(served, str) or served not in router.models:
            known = ", ".join(m.served for m in config.models)
            return openai_error(404, f"model {served!r} is not served here; known: {known}")
        try:
            model = await router.ensure_loaded(served, config.request_wait_s)
            return await router.forward(request, model, body)
        except Unavailable as exc:
            return openai_error(exc.status, exc.message, exc.retry_after)

    def not_found(request: web.Request) -> web.Response:
        if request.path.startswith(ADMIN_PREFIX) and not admin:
            return openai_error(
                403,
                "administrative routes need the API key (secrets.api_key) or the router's socket",
            )
        return openai_error(404, f"no route {request.method} {request.path}")

    async def fallback(request: web.Request) -> web.Response:
        return not_found(request)

    async def models_report(request: web.Request) -> web.Response:
        return web.json_response({"models": router.report()})

    def named(request: web.Request) -> ModelState | None:
        return router.models.get(request.query.get("model", ""))

    async def load(request: web.Request) -> web.Response:
        model = named(request)
        if model is None:
            return openai_error(404, f"no model {request.query.get('model')!r}")
        model.failed_at = 0.0  # asked for by a person: no waiting after a failure
        try:
            wait = float(request.query.get("wait", config.request_wait_s))
        except ValueError:
            return openai_error(400, "wait must be a number of seconds")
        try:
            await router.ensure_loaded(model.entry.served, wait)
        except Unavailable as exc:
            return openai_error(exc.status, exc.message, exc.retry_after)
        return web.json_response(model.report())

    async def unload(request: web.Request) -> web.Response:
        model = named(request)
        if model is None:
            return openai_error(404, f"no model {request.query.get('model')!r}")
        try:
            async with router.placing:
                await router.unload(model, why="asked for")
        except Unavailable as exc:
            return openai_error(exc.status, exc.message, exc.retry_after)
        return web.json_response(model.report())

    app.router.add_get(HEALTH, health)
    app.router.add_get(MODELS, list_models)
    app.router.add_post("/v1/{tail:.*}", openai_call)
    if admin:
        app.router.add_get(f"{ADMIN_PREFIX}models", models_report)
        app.router.add_post(f"{ADMIN_PREFIX}load", load)  # ?model=NAME[&wait=SECONDS]
        app.router.add_post(f"{ADMIN_PREFIX}unload", unload)  # ?model=NAME
    app.router.add_route("*", "/{tail:.*}", fallback)
    return app
