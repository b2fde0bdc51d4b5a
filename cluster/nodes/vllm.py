"""vLLM in a node's container: how it is asked for, how it is checked, what its failures mean.

vLLM is run by the container's supervisor (cluster/remote/supervisor.py) while the supervisor's
`serve.json` asks for it; requests and reports are argv for `docker exec`. The HTTP endpoint is read over a channel of the
head's SSH connection (so a head behind a bastion is reachable) and parsed by pure functions.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass

import paramiko
from prometheus_client.parser import text_string_to_metric_families

from cluster.decide.plan import ServeSpec
from cluster.nodes.transport.ssh import SshConnection
from cluster.remote.supervisor import SERVE_FILE, STATE_FILE

HTTP_TIMEOUT_S = 10.0

# Constant scripts; every value reaches them as a positional argument ("$0", "$1").
_WRITE = 'mkdir -p "${0%/*}" && printf %s "$1" >"$0.partial" && mv "$0.partial" "$0"'


def desired_path(state_dir: str) -> str:
    return f"{state_dir}/{SERVE_FILE}"


def serve_request(serve: ServeSpec, spec_id: str, launch: str) -> str:
    """What the supervisor is asked to run (JSON); it holds no secret (those are files).

    `launch` names this request: a new one restarts vLLM even with the same spec, so that the
    ranks of a model start together.
    """
    request = {
        "spec_id": spec_id,
        "launch": launch,
        "argv": list(serve.argv),
        "log": serve.log_path,
        "watch_titled": serve.watch_titled,
    }
    if serve.front is not None:
        request["front"] = {"argv": list(serve.front), "log": serve.front_log_path}
    return json.dumps(request)


def request_serve_argv(state_dir: str, serve: ServeSpec, spec_id: str, launch: str) -> list[str]:
    """Asks the node's supervisor to run `serve` (and to restart it whenever it dies)."""
    return ["sh", "-c", _WRITE, desired_path(state_dir), serve_request(serve, spec_id, launch)]


def request_stop_argv(state_dir: str) -> list[str]:
    """Asks the node's supervisor to stop vLLM, every process of it, and not restart it."""
    return ["rm", "-f", desired_path(state_dir)]


def supervisor_state_argv(state_dir: str) -> list[str]:
    return ["cat", f"{state_dir}/{STATE_FILE}"]


@dataclass(frozen=True)
class SupervisedVllm:
    """What a node's supervisor reports of vLLM (`vllm.json` in its state folder)."""

    state: str  # running | backoff | stopped | waiting for ADDRESS
    spec_id: str | None
    launch: str | None
    restarts: int
    last_exit_cause: str | None
    last_exit_at: float | None

    @property
    def running(self) -> bool:
        return self.state == "running"


def parse_supervisor_state(text: str) -> SupervisedVllm | None:
    """The supervisor's report, or None when there is none yet (or it is not JSON)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or "state" not in data:
        return None
    last = data.get("last_exit") or {}
    return SupervisedVllm(
        state=str(data["state"]),
        spec_id=data.get("spec_id"),
        launch=data.get("launch"),
        restarts=int(data.get("restarts") or 0),
        last_exit_cause=last.get("cause"),
        last_exit_at=last.get("at"),
    )


def log_tail_argv(serve: ServeSpec, lines: int) -> list[str]:
    return ["tail", "-n", str(lines), serve.log_path]


class _ChannelHTTPConnection(http.client.HTTPConnection):
    """HTTP over a `direct-tcpip` channel of an SSH connection."""

    def __init__(self, ssh: SshConnection, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ssh = ssh

    def connect(self) -> None:
        self.sock = self._ssh.transport.open_channel(
            "direct-tcpip", (self.host, self.port), ("127.0.0.1", 0), timeout=self.timeout
        )
        self.sock.settimeout(self.timeout)


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: str


def http_get(
    ssh: SshConnection,
    host: str,
    port: int,
    path: str,
    *,
    api_key: str | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> HttpReply:
    """GET `path` from `host:port` as seen from the SSH host; raises OSError when unreachable."""
    connection = _ChannelHTTPConnection(ssh, host, port, timeout_s)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return HttpReply(response.status, response.read().decode(errors="replace"))
    except (http.client.HTTPException, EOFError) as exc:
        raise OSError(str(exc)) from None
    except paramiko.ChannelException:
        raise OSError(f"nothing accepts connections on {host}:{port}") from None
    except paramiko.SSHException as exc:  # not an OSError
        raise OSError(str(exc)) from None
    finally:
        connection.close()


def served_models(body: str) -> list[str]:
    """Model ids from a `/v1/models` reply."""
    return [entry["id"] for entry in json.loads(body).get("data", [])]


@dataclass(frozen=True)
class ServingMetrics:
    requests_running: float | None
    requests_waiting: float | None
    kv_cache_usage: float | None  # 0..1


_METRIC_NAMES = {
    "vllm:num_requests_running": "requests_running",
    "vllm:num_requests_waiting": "requests_waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",  # older vLLM
}


def parse_serving_metrics(text: str) -> ServingMetrics:
    """The load figures `status` shows, from vLLM's Prometheus `/metrics` text."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        field = _METRIC_NAMES.get(family.name)
        if field is None:
            continue
        samples = [s.value for s in family.samples if s.name == family.name]
        if samples:
            values[field] = values.get(field, 0.0) + sum(samples)
    return ServingMetrics(
        requests_running=values.get("requests_running"),
        requests_waiting=values.get("requests_waiting"),
        kv_cache_usage=values.get("kv_cache_usage"),
    )
