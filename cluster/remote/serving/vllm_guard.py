"""A middleware that the API server of every model an agent runs loads (`--middleware`).

vLLM checks its key only under `/v1` (vllm-project/vllm#58144): `/invocations`, `/tokenize` and
the like answer without it, and sleep mode needs vLLM's development routes too
(`VLLM_SERVER_DEV_MODE=1`: `/sleep`, `/wake_up`, `/is_sleeping`, `/collective_rpc` and more). A
model's API server listens on loopback on the head, but on its node's cluster address elsewhere.
This guard lets through, as vLLM would, `/v1/...` (vLLM checks the key there) and the probes
`/health`, `/metrics`, `/ping`, `/version`; every other route needs the key (the agent token,
vLLM's `VLLM_API_KEY`) and a client on this very node: one that connected from the address it
connected to. The node's agent binds its calls so.

Loaded inside vLLM's own Python: the standard library only here; Starlette (vLLM's web
framework) is imported where a refusal is answered.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

OPEN_PATHS = frozenset({"/health", "/metrics", "/ping", "/version"})
"""What vLLM serves without its key today and vcluster reads (health, load)."""
KEY_ENV = "VLLM_API_KEY"
MIDDLEWARE = "cluster.remote.serving.vllm_guard.guard"
"""The import path vLLM's `--middleware` takes."""


def refusal(
    path: str, client_host: str | None, server_host: str | None, authorization: str, key: str
) -> str | None:
    """Why a request must not reach vLLM, or None when it may."""
    if path.startswith("/v1/") or path in OPEN_PATHS:
        return None
    given = authorization.encode("utf-8", "surrogateescape")
    if not key or not hmac.compare_digest(given, f"Bearer {key}".encode()):
        return "this route needs the agent token"
    if client_host is None or client_host != server_host:
        return "this route is served to the node's own agent only"
    return None


async def guard(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
    """Starlette's HTTP middleware: refuses with 403 what `refusal` refuses."""
    server = request.scope.get("server") or (None, None)
    client = request.client.host if request.client is not None else None
    problem = refusal(
        request.url.path,
        client,
        server[0],
        request.headers.get("authorization", ""),
        os.environ.get(KEY_ENV, ""),
    )
    if problem is None:
        return await call_next(request)
    from starlette.responses import JSONResponse  # type: ignore[import-not-found]  # vLLM's

    return JSONResponse({"error": problem}, status_code=403)
