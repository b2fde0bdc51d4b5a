"""The router and an agent as real processes on loopback addresses, with a stand-in for
`vllm serve` (tests/support/standin_vllm.py: same flags, start-up time, SSE) as the models.

What is checked here is the router's own behaviour, fast: one activation for many requests,
eviction, failures with their cause, streaming without buffering, tokens, idle unloads and
crashes. The e2e tests (tests/e2e/test_models.py) run the same with real vLLM on the sandbox.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.remote.serving.catalog import ModelEntry, NodeDevices, ServingConfig

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "support" / "standin_vllm.py"
PORT = 18180
AGENT_PORT = 18181
KEY = "users-key"
TOKEN = "agents-token"


def model(served: str, index: int, *extra: str, pipeline: int = 2, **keys) -> ModelEntry:
    argv = (sys.executable, str(STANDIN), served, "--served-model-name", served, *extra)
    defaults = {"keep_loaded": False, "unload_after_s": None}
    return ModelEntry(served, argv, 1, pipeline, **{**defaults, **keys},
                      api_port=18200 + 2 * index, master_port=18201 + 2 * index)  # fmt: skip


def config(tmp_path: Path, models: tuple[ModelEntry, ...], **keys) -> ServingConfig:
    nodes = (
        NodeDevices("head", "127.0.0.1", (0, 1), head=True),
        NodeDevices("worker", "127.0.0.2", (0,)),
    )
    return ServingConfig(
        cluster="t", accelerator="cpu", models=models, nodes=nodes, port=PORT,
        agent_port=AGENT_PORT, request_wait_s=keys.get("request_wait_s", 20.0),
        start_timeout_s=keys.get("start_timeout_s", 20.0), state_dir=str(tmp_path),
        log_dir=str(tmp_path / "logs"),
    )  # fmt: skip


def write_secrets(state_dir: Path, **files: str) -> None:
    """The secret files `up` writes into a container's state folder (owner-only)."""
    folder = state_dir / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    for name, value in files.items():
        (folder / name.replace("_", "-")).write_text(value)
        (folder / name.replace("_", "-")).chmod(0o400)


class Cluster:
    def __init__(
        self,
        tmp_path: Path,
        serving: ServingConfig,
        roles: tuple[tuple[str, str], ...] = (("agent", "worker"), ("router", "head")),
        api_key: str | None = KEY,
        healthy: int = 200,
    ) -> None:
        path = tmp_path / "serving.json"
        path.write_text(serving.to_json())
        write_secrets(tmp_path, agent_token=TOKEN, **({"api_key": api_key} if api_key else {}))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = open(tmp_path / "router.log", "wb")  # noqa: SIM115 (closed in stop)
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "cluster.remote.serving", role, str(path), node],
                env=env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
            for role, node in roles
        ]
        self.log_path = tmp_path / "router.log"
        self.socket = tmp_path / "router.sock"
        deadline = time.monotonic() + 20
        while request("GET", "/health")[0] != healthy:
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.1)

    def models(self) -> dict[str, dict]:
        status, body = request("GET", "/vcluster/models")
        assert status == 200, body
        return {m["name"]: m for m in body["models"]}

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(timeout=30)
        self.log.close()


def request(
    method: str,
    path: str,
    body: dict | None = None,
    key: str = KEY,
    base: str = f"http://127.0.0.1:{PORT}",
):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(base + path, data, headers, method=method), timeout=60
        ) as reply:
            text = reply.read().decode()
            return reply.status, _json(text)
    except urllib.error.HTTPError as error:
        return error.code, _json(error.read().decode())
    except OSError as error:
        return 0, str(error)


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def chat(served: str, **extra):
    return request("POST", "/v1/chat/completions", {"model": served, "messages": [], **extra})


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    started: list[Cluster] = []

    def run(*models: ModelEntry, api_key: str | None = KEY, **keys) -> Cluster:
        cluster = Cluster(tmp_path, config(tmp_path, models, **keys), api_key=api_key)
        started.append(cluster)
        return cluster

    yield run
    for cluster in started:
        cluster.stop()


def test_many_requests_for_an_unloaded_model_start_it_once_and_all_are_answered(start):
    cluster = start(model("a", 0, "--start-s", "1.5"))
    replies: list = []
    threads = [threading.Thread(target=lambda: replies.append(chat("a"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in replies] == [200] * 8
    assert len({body["pid"] for _, body in replies}) == 1  # one server answered them all
    state = cluster.models()["a"]
    assert (state["activations"], state["requests"], state["state"]) == (1, 8, "loaded")
    assert state["placement"] == [["head", [0]], ["worker", [0]]]


def test_a_model_that_needs_the_devices_of_an_idle_one_evicts_it(start):
    cluster = start(model("a", 0), model("b", 1))
    assert chat("a")[0] == 200
    assert chat("b")[0] == 200
    states = cluster.models()
    assert (states["a"]["state"], states["b"]["state"]) == ("unloaded", "loaded")


def test_a_model_that_fits_beside_another_does_not_evict_it(start):
    cluster = start(model("a", 0), model("small", 1, pipeline=1))
    assert chat("a")[0] == 200
    assert chat("small")[0] == 200
    states = cluster.models()
    assert states["small"]["placement"] == [["head", [1]]]
    assert states["a"]["state"] == "loaded"


def test_a_model_kept_loaded_is_never_evicted_and_the_503_names_it(start):
    cluster = start(model("pinned", 0, keep_loaded=True), model("b", 1))
    deadline = time.monotonic() + 20
    while cluster.models()["pinned"]["state"] != "loaded":  # the router loads it by itself
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status, body = chat("b")
    assert status == 503
    assert "pinned (keep_loaded)" in body["error"]["message"]


def test_a_model_that_fails_to_start_fails_its_requests_with_the_cause(start):
    start(model("bad", 0, "--no-such-flag"))
    status, body = chat("bad")
    assert status == 502
    message = body["error"]["message"]
    assert re.search(r"rank [01] on (head|worker) exited with status 2", message)
    assert "likely cause: a bad vllm serve argument" in message
    assert "unrecognized arguments: --no-such-flag" in message
    again = chat("bad")  # soon after: the same cause at once, no new start
    assert again[0] == 502 and "--no-such-flag" in again[1]["error"]["message"]


def test_a_request_past_the_wait_gets_503_with_retry_after_and_the_start_goes_on(start):
    cluster = start(model("slow", 0, "--start-s", "4"), request_wait_s=1.0)
    request_url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
    data = json.dumps({"model": "slow", "messages": []}).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(urllib.request.Request(request_url, data, headers), timeout=30)
    assert error.value.code == 503
    assert error.value.headers["Retry-After"] == "10"
    deadline = time.monotonic() + 20
    while cluster.models()["slow"]["state"] != "loaded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert chat("slow")[0] == 200


def test_a_stream_passes_through_as_it_is_produced(start):
    start(model("a", 0))
    url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
    data = json.dumps({"model": "a", "messages": [], "stream": True, "delay_s": 0.5}).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    arrivals = []
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=30) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        for line in reply:
            if line.startswith(b"data: "):
                arrivals.append((time.monotonic(), line))
    assert arrivals[-1][1].strip() == b"data: [DONE]"
    # The stand-in waits 0.5 s after each of its three chunks: a buffering proxy would hand
    # them over together at the end.
    assert arrivals[-1][0] - arrivals[0][0] > 1.0


def test_the_endpoint_needs_the_key_and_lists_models_with_their_state(start):
    start(model("a", 0), model("b", 1))
    status, body = request("GET", "/v1/models", key="wrong")
    assert status == 401 and body["error"]["type"] == "AuthenticationError"
    status, body = request("GET", "/v1/models")
    assert status == 200
    assert [(m["id"], m["vcluster"]["state"]) for m in body["data"]] == [
        ("a", "unloaded"), ("b", "unloaded")
    ]  # fmt: skip


def test_an_unknown_model_gets_404_listing_the_known_ones(start):
    start(model("a", 0), model("b", 1))
    status, body = chat("c")
    assert status == 404
    assert body["error"]["message"] == "model 'c' is not served here; known: a, b"


def test_the_agents_and_the_models_own_servers_refuse_requests_without_the_token(start):
    start(model("a", 0))
    assert chat("a")[0] == 200
    agent = f"http://127.0.0.2:{AGENT_PORT}"
    assert request("GET", "/ranks", key="wrong", base=agent)[0] == 401
    assert request("GET", "/ranks", key=KEY, base=agent)[0] == 401  # the users' key is not it
    assert request("GET", "/ranks", key=TOKEN, base=agent)[0] == 200
    backend = "http://127.0.0.1:18200"
    assert request("POST", "/v1/chat/completions", {"model": "a"}, key=KEY, base=backend)[0] == 401


def test_an_idle_model_is_unloaded_after_its_time_and_its_ranks_are_gone(start):
    cluster = start(model("a", 0, unload_after_s=1.0))
    assert chat("a")[0] == 200
    _, ranks = request("GET", "/ranks", key=TOKEN, base=f"http://127.0.0.2:{AGENT_PORT}")
    pid = ranks["a"]["pid"]
    deadline = time.monotonic() + 20
    while cluster.models()["a"]["state"] != "unloaded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists()


def test_a_model_whose_rank_dies_is_started_again_by_the_next_request(start):
    cluster = start(model("a", 0))
    assert chat("a")[0] == 200
    _, ranks = request("GET", "/ranks", key=TOKEN, base=f"http://127.0.0.2:{AGENT_PORT}")
    os.kill(ranks["a"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while cluster.models()["a"]["state"] != "unloaded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "rank 1 on worker killed by SIGKILL" in cluster.models()["a"]["failure"]
    assert chat("a")[0] == 200
    assert cluster.models()["a"]["activations"] == 2


def test_an_agent_asked_to_stop_everything_ends_every_ranks_process(start):
    start(model("a", 0))
    assert chat("a")[0] == 200
    agent = f"http://127.0.0.2:{AGENT_PORT}"
    _, ranks = request("GET", "/ranks", key=TOKEN, base=agent)
    assert request("DELETE", "/ranks", key=TOKEN, base=agent)[0] == 200  # a new router does it
    assert request("GET", "/ranks", key=TOKEN, base=agent)[1] == {}
    assert not Path(f"/proc/{ranks['a']['pid']}").exists()


# --- the endpoint's doors: what passes, what is refused ---------------------------------------

OTHER_ROUTES = (
    "/invocations", "/tokenize", "/detokenize", "/metrics", "/pause", "/resume", "/ping",
    "/version", "/load", "/server_info", "/reset_prefix_cache", "/sleep", "/wake_up",
    "/is_sleeping", "/collective_rpc", "/pooling", "/classify", "/score", "/rerank",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/docs", "/openapi.json",
)  # fmt: skip
"""vLLM's own routes besides the OpenAI API (and some a future vLLM may add)."""
TRAVERSALS = (
    "/v1/../pause", "/v1/%2e%2e/pause", "/v1/%2E%2E/invocations", "/v1%2fmodels",
    "/v1/chat/completions/..", "//invocations", "/v1/./models", "/v1/%5c..%5cpause",
)  # fmt: skip


def raw(method: str, path: str, key: str | None = KEY, headers: dict | None = None):
    """A request whose path goes on the wire exactly as written (no client normalises it)."""
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    body = json.dumps({"model": "a", "messages": []}) if method == "POST" else None
    try:
        connection.request(method, path, body=body, headers=sent)
        reply = connection.getresponse()
        return reply.status, _json(reply.read().decode())
    finally:
        connection.close()


def test_without_the_key_every_route_but_health_is_refused(start):
    start(model("a", 0, keep_loaded=True))
    paths = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
             "/vcluster/models", "/vcluster/load?model=a", "/vcluster/unload?model=a",
             *OTHER_ROUTES, *TRAVERSALS)  # fmt: skip
    assert len(paths) >= 20
    for path in paths:
        for method in ("GET", "POST"):
            status, body = raw(method, path, key=None)
            assert status in (400, 401), (method, path, status, body)
            assert "reached" not in str(body)
    assert raw("GET", "/health", key=None)[0] == 200


def test_with_the_key_only_the_openai_routes_reach_the_model(start):
    start(model("a", 0))
    assert chat("a")[0] == 200
    for path in OTHER_ROUTES:
        for method in ("GET", "POST"):
            status, body = raw(method, path)
            assert status == 404, (method, path, status, body)
    for path in TRAVERSALS:
        for method in ("GET", "POST"):
            status, body = raw(method, path)
            assert status == 400, (method, path, status, body)
            assert body["error"]["message"].startswith("refused path")
    assert raw("GET", "/v1/chat/completions")[0] == 404  # a POST route, asked with GET
    assert raw("POST", "/v1/chat/completions")[0] == 200


def test_the_users_forwarding_headers_do_not_reach_the_model(start):
    # vLLM (uvicorn) may trust X-Forwarded-For for the client's address in its logs
    start(model("a", 0))
    forged = {"X-Forwarded-For": "10.9.8.7", "Forwarded": "for=10.9.8.7", "X-Real-IP": "10.9.8.7"}
    status, body = raw("POST", "/v1/chat/completions", headers={**forged, "X-Kept": "1"})
    assert status == 200
    assert "x-kept" in body["headers"]  # other headers pass on
    assert not {name.lower() for name in forged} & set(body["headers"])


def test_a_malformed_authorization_header_is_a_401_never_a_500(start):
    cluster = start(model("a", 0))
    for value in ("Bearer \xff\xfe", "Basic dXNlcjpwYXNz", "Bearer", "", f"bearer  {KEY}"):
        status, _ = raw("GET", "/v1/models", key=None, headers={"Authorization": value})
        assert status == 401, value
    assert raw("GET", "/v1/models", key=None, headers={"Authorization": f"bearer {KEY}"})[0] == 200
    assert "Traceback" not in cluster.log_path.read_text()


def test_without_a_key_the_endpoint_serves_no_administrative_route_but_the_socket_does(start):
    cluster = start(model("a", 0), api_key=None)
    assert raw("POST", "/vcluster/load?model=a", key=None)[0] == 403
    assert raw("POST", "/vcluster/unload?model=a", key=None)[0] == 403
    assert raw("GET", "/vcluster/models", key=None)[0] == 403
    assert raw("POST", "/v1/chat/completions", key=None)[0] == 200  # anonymous use, as asked
    local = aiohttp_over_socket(cluster.socket, "GET", "/vcluster/models")
    assert local[0] == 200 and local[1]["models"][0]["name"] == "a"


def aiohttp_over_socket(socket_path: Path, method: str, path: str):
    """A request over the router's Unix socket, as `vcluster models` sends through docker exec."""
    connection = http.client.HTTPConnection("localhost", timeout=30)
    connection.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.sock.connect(str(socket_path))
    try:
        connection.request(method, path)
        reply = connection.getresponse()
        return reply.status, _json(reply.read().decode())
    finally:
        connection.close()


# --- one model: the router in front of the vLLM that the supervisor runs ----------------------


def test_the_front_passes_requests_to_the_supervised_model_and_follows_its_health(start_front):
    front, backend = start_front()
    assert request("GET", "/health")[0] == 503  # the model does not serve yet
    status, body = chat("one")
    assert status == 503 and "is starting" in body["error"]["message"]
    backend.start()
    deadline = time.monotonic() + 20
    while request("GET", "/health")[0] != 200:
        assert time.monotonic() < deadline, front.log_path.read_text()
        time.sleep(0.1)
    status, body = chat("one")
    assert status == 200 and body["pid"] == backend.pid
    assert raw("POST", "/invocations")[0] == 404
    assert raw("POST", "/vcluster/unload?model=one")[0] == 409  # the supervisor keeps it
    backend.stop()  # as a crash would: the front says the model is starting again
    deadline = time.monotonic() + 20
    while request("GET", "/health")[0] != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert chat("one")[0] == 503


class Backend:
    """The stand-in as the supervisor would run it: on loopback, with no key."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        argv = [sys.executable, str(STANDIN), "one", "--served-model-name", "one",
                "--port", str(self.port), "--start-s", "0"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
        self.process = subprocess.Popen(argv, env=env)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_front(tmp_path: Path) -> Iterator:
    started: list[tuple[Cluster, Backend]] = []

    def run() -> tuple[Cluster, Backend]:
        entry = ModelEntry("one", (), 1, 1, keep_loaded=True, unload_after_s=None,
                           api_port=18300, master_port=18301, external=True)  # fmt: skip
        serving = config(tmp_path, (entry,), request_wait_s=1.0)
        front = Cluster(tmp_path, serving, roles=(("front", "head"),), healthy=503)
        started.append((front, Backend(entry.api_port)))
        return started[-1]

    yield run
    for front, backend in started:
        backend.stop()
        front.stop()
