"""What the users' endpoint lets through: a path check and an allow-list of OpenAI routes (pure).

vLLM's own API server checks its key only under `/v1` (vllm-project/vllm#58144) and serves
much besides the OpenAI API (`/invocations`, `/tokenize`, `/pause`, `/metrics`, development
routes). The router is the only endpoint users reach: it refuses a path that could mean
another path once decoded or normalised, and passes on only the routes listed here.
"""

from __future__ import annotations

HEALTH = "/health"
MODELS = "/v1/models"
ADMIN_PREFIX = "/vcluster/"

OPENAI_POST_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/score",
        "/v1/rerank",
        "/v1/messages",
    }
)
"""The OpenAI-compatible routes of vLLM whose JSON body names the `model` (routed by it)."""

_FORBIDDEN_ESCAPES = ("%2e", "%2f", "%5c", "%00")


def path_problem(raw_path: str) -> str | None:
    """Why a request's raw path (before `?`) is refused, or None when it is plain.

    Refused: dot segments, encoded dots, slashes, backslashes or NULs, empty segments and
    backslashes; such a path could reach another route once a server decodes or normalises it.
    """
    path = raw_path.split("?", 1)[0]
    if not path.startswith("/"):
        return "the path must start with /"
    lowered = path.lower()
    for escape in _FORBIDDEN_ESCAPES:
        if escape in lowered:
            return f"the path holds an encoded {escape!r}"
    if "\\" in path:
        return "the path holds a backslash"
    segments = path[1:].split("/")
    if any(segment in (".", "..") for segment in segments):
        return "the path holds a dot segment"
    if any(segment == "" for segment in segments[:-1]):
        return "the path holds an empty segment (//)"
    return None


def is_openai_route(method: str, path: str) -> bool:
    """Whether `method path` is one of the OpenAI routes the endpoint passes on."""
    if method == "GET":
        return path == MODELS
    return method == "POST" and path in OPENAI_POST_ROUTES
