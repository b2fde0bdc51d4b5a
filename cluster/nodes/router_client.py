"""Talking to the head's router from the controller: `docker exec` of a constant program that
speaks HTTP to the router's Unix socket in the head container (no API key: only who may
`docker exec` on the head reaches it). Requests and replies are pure functions here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlencode

from cluster.remote.serving.catalog import ROUTER_SOCKET

# Constant; the socket, method, path and timeout reach it as arguments.
ROUTER_CALL_SCRIPT = """\
import http.client, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(sys.argv[1])
try:
    connection = Unix("localhost", timeout=float(sys.argv[4]))
    connection.request(sys.argv[2], sys.argv[3])
    reply = connection.getresponse()
    print(reply.status)
    print(reply.read().decode(errors="replace"))
except OSError as error:
    print(0)
    print(error)
"""


@dataclass(frozen=True)
class RouterReply:
    status: int  # 0: the router did not answer
    data: Any  # the JSON reply, or its text

    @property
    def message(self) -> str:
        """The error message of an OpenAI-shaped error reply, or the text."""
        if isinstance(self.data, dict) and isinstance(self.data.get("error"), dict):
            return str(self.data["error"].get("message"))
        return str(self.data)


def router_path(action: str, **query: str | float) -> str:
    """`/vcluster/ACTION?...`, the query quoted (served names hold `/`)."""
    return f"/vcluster/{action}" + (f"?{urlencode(query)}" if query else "")


def call_router(
    container: Any, state_dir: str, method: str, path: str, timeout_s: float = 30.0
) -> RouterReply:
    """One request to the router, through `docker exec` in the head container."""
    result = container.exec_run(router_call_argv(state_dir, method, path, timeout_s))
    return parse_router_reply(result.output.decode(errors="replace"))


def router_call_argv(state_dir: str, method: str, path: str, timeout_s: float = 30.0) -> list[str]:
    """argv for `docker exec` in the head container: one request to the router."""
    socket_path = str(PurePosixPath(state_dir) / ROUTER_SOCKET)
    return ["python3", "-c", ROUTER_CALL_SCRIPT, socket_path, method, path, str(timeout_s)]


def parse_router_reply(output: str) -> RouterReply:
    status_line, _, body = output.partition("\n")
    try:
        status = int(status_line.strip())
    except ValueError:
        return RouterReply(0, output.strip())
    try:
        return RouterReply(status, json.loads(body))
    except ValueError:
        return RouterReply(status, body.strip())


@dataclass(frozen=True)
class ModelStatus:
    """One model as the router reports it (`vcluster models`, `status`, the exporter)."""

    name: str
    state: str  # unloaded | loading | loaded | failed | unloading | sleeping | waking
    placement: tuple[tuple[str, tuple[int, ...]], ...]
    tensor_parallel: int
    pipeline_parallel: int
    keep_loaded: bool
    last_used: float | None
    in_flight: int
    requests: int
    activations: int
    last_activation_s: float | None
    failure: str | None
    sleep_level: int | None = None
    """The vLLM sleep level it sleeps at now (None: not asleep)."""
    host_memory_bytes: int | None = None
    """What its ranks hold in host memory while it sleeps."""
    wakes: int = 0
    last_wake_s: float | None = None
    last_wake_at: float | None = None
    wake_failure: str | None = None
    """Why its last wake failed (it was started cold instead)."""

    @property
    def shown_state(self) -> str:
        """`sleeping (level N)` for a sleeper, else the state."""
        if self.state == "sleeping" and self.sleep_level is not None:
            return f"sleeping (level {self.sleep_level})"
        return self.state

    @property
    def where(self) -> str:
        """`head [0,1], node-2 [0,1]`, or `-` when it holds no device."""
        return ", ".join(f"{n} [{','.join(map(str, d))}]" for n, d in self.placement) or "-"


def parse_models_report(data: Any) -> tuple[ModelStatus, ...]:
    """The router's `/vcluster/models` reply as `ModelStatus`es."""
    return tuple(
        ModelStatus(
            name=str(m["name"]),
            state=str(m["state"]),
            placement=tuple((str(n), tuple(int(d) for d in ds)) for n, ds in m["placement"] or ()),
            tensor_parallel=int(m["tensor_parallel"]),
            pipeline_parallel=int(m["pipeline_parallel"]),
            keep_loaded=bool(m["keep_loaded"]),
            last_used=m.get("last_used"),
            in_flight=int(m["in_flight"]),
            requests=int(m["requests"]),
            activations=int(m["activations"]),
            last_activation_s=m.get("last_activation_s"),
            failure=m.get("failure"),
            sleep_level=m.get("sleep_level"),
            host_memory_bytes=m.get("host_memory_bytes"),
            wakes=int(m.get("wakes") or 0),
            last_wake_s=m.get("last_wake_s"),
            last_wake_at=m.get("last_wake_at"),
            wake_failure=m.get("wake_failure"),
        )
        for m in data["models"]
    )
