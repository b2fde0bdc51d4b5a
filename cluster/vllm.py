"""vLLM in a node's container: how it is launched, how it is checked, what its failures mean.

Launch and liveness are argv for `docker exec`; the HTTP endpoint is read over a channel of the
head's SSH connection (so a head behind a bastion is reachable) and parsed by pure functions.
"""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass

import paramiko
from prometheus_client.parser import text_string_to_metric_families

from cluster.plan import ServeSpec
from cluster.transport.ssh import SshConnection

PID_PATH = "/tmp/vcluster-vllm.pid"
SPEC_PATH = "/tmp/vcluster-vllm.spec"
HTTP_TIMEOUT_S = 10.0

# Constant scripts; every value reaches them as a positional argument ("$0", "$1", "$@").
_LAUNCH = 'echo $$ >"$0"; printf %s "$1" >"$2"; log=$3; shift 3; exec "$@" >"$log" 2>&1'
_ALIVE = 'kill -0 "$(cat "$0" 2>/dev/null)" 2>/dev/null && cat "$1"'
_STOP = 'pid=$(cat "$0" 2>/dev/null) && kill "$pid" 2>/dev/null; rm -f "$0" "$1"; true'


def launch_argv(serve: ServeSpec, spec_id: str) -> list[str]:
    """`vllm serve`, detached by the caller, its output in the log and its pid recorded."""
    return ["sh", "-c", _LAUNCH, PID_PATH, spec_id, SPEC_PATH, serve.log_path, *serve.argv]


def running_spec_argv() -> list[str]:
    """Prints the spec id of the running vLLM and exits 0, or exits 1 when none runs."""
    return ["sh", "-c", _ALIVE, PID_PATH, SPEC_PATH]


def stop_argv() -> list[str]:
    return ["sh", "-c", _STOP, PID_PATH, SPEC_PATH]


def log_tail_argv(serve: ServeSpec, lines: int) -> list[str]:
    return ["tail", "-n", str(lines), serve.log_path]


_CAUSES = [
    (
        re.compile(
            r"out of memory|OutOfMemoryError|Insufficient space in /dev/shm|Cannot allocate memory",
            re.I,
        ),
        "out of memory (GPU, host or /dev/shm)",
        "lower --max-model-len or --gpu-memory-utilization, use more GPUs, or give the node more shared memory",
    ),
    (
        re.compile(
            r"Repository Not Found|is not a local folder and is not a valid model|does not appear to have a file named|"
            r"HFValidationError|No such file or directory: .*config\.json|Can't load the configuration",
            re.I,
        ),
        "the model was not found",
        "check model.name, that the model is in model_cache on every node, or set secrets.hf_token",
    ),
    (
        re.compile(
            r"unrecognized arguments|invalid choice|error: argument|ValueError: .*argument", re.I
        ),
        "a bad vllm serve argument",
        "fix model.args in the inventory (see `vllm serve --help`)",
    ),
    (
        re.compile(r"cannot open shared object file", re.I),
        "a shared library is missing in the image",
        "use an image with every library vLLM needs (the message names it)",
    ),
    (
        re.compile(r"No working C\+\+ compiler|Python\.h: No such file", re.I),
        "torch.compile needs a C++ compiler and Python headers that the image lacks",
        "use an image with g++ and python3-dev, or add --enforce-eager to model.args",
    ),
    (
        re.compile(r"Address already in use", re.I),
        "a port is already in use",
        "free the port on the node, or change ports: in the inventory",
    ),
]


_ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b[:(]|error:")
_LOG_PREFIX = re.compile(r"^\(\S+ pid=\d+\)\s+(ERROR|WARNING|INFO)\s+\S+ \S+ \[[^]]+\]\s*")


def error_lines(log: str, limit: int = 3) -> list[str]:
    """The last distinct error lines of a log, without vLLM's process/time prefixes."""
    found: list[str] = []
    for line in log.splitlines():
        text = _LOG_PREFIX.sub("", line).strip()
        if _ERROR_LINE.search(text) and text not in found and not text.startswith("raise "):
            found.append(text)
    return found[-limit:]


@dataclass(frozen=True)
class FailureCause:
    summary: str
    fix: str


def likely_cause(log_tail: str) -> FailureCause | None:
    """The most likely reason vLLM exited, read from the end of its log."""
    for pattern, summary, fix in _CAUSES:
        if pattern.search(log_tail):
            return FailureCause(summary, fix)
    return None


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
