"""A node's agent as a real process on a loopback address, asked by HTTP as the router asks it,
and by requests the router never sends: unknown nodes, path tricks, malformed headers.

The ranks are the stand-in for `vllm serve` (tests/support/standin_vllm.py); rank 1 of a
two-node placement is headless, so the agent on `worker` runs a process that only waits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from cluster.remote.serving.catalog import (
    AGENT_TOKEN_FILE,
    SECRETS_DIR,
    ModelEntry,
    NodeDevices,
    ServingConfig,
)

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "support" / "standin_vllm.py"
ADDRESS = "127.0.0.2"
AGENT_PORT = 18381
TOKEN = "agents-token"
BASE = f"http://{ADDRESS}:{AGENT_PORT}"
PLACEMENT = [["head", [0]], ["worker", [0]]]


def model(served: str, index: int) -> ModelEntry:
    argv = (sys.executable, str(STANDIN), served, "--served-model-name", served)
    return ModelEntry(served, argv, 1, 2, keep_loaded=False, unload_after_s=None,
                      api_port=18400 + 2 * index, master_port=18401 + 2 * index)  # fmt: skip


def serving_config(tmp_path: Path) -> ServingConfig:
    nodes = (
        NodeDevices("head", "127.0.0.1", (0, 1), head=True),
        NodeDevices("worker", ADDRESS, (0,)),
    )
    return ServingConfig(
        cluster="t", accelerator="cpu", models=(model("a", 0), model("org/model-b", 1)),
        nodes=nodes, port=18380, agent_port=AGENT_PORT, request_wait_s=20.0,
        start_timeout_s=20.0, state_dir=str(tmp_path), log_dir=str(tmp_path / "logs"),
    )  # fmt: skip


def call(method: str, path: str, body: object = None, token: str = TOKEN) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(BASE + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, text


def raw_request(lines: list[bytes]) -> bytes:
    """Send a request exactly as written (headers a client library would refuse to send)."""
    with socket.create_connection((ADDRESS, AGENT_PORT), timeout=10) as connection:
        connection.sendall(b"\r\n".join([*lines, b"Connection: close", b"", b""]))
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    return reply


def start_rank(served: str, launch: str = "l1", placement: object = PLACEMENT, rank: int = 1):
    body = {"launch": launch, "rank": rank, "placement": placement}
    return call("PUT", f"/ranks/{quote(served, safe='')}", body)


class AgentProcess:
    def __init__(self, tmp_path: Path) -> None:
        path = tmp_path / "agent.json"
        path.write_text(serving_config(tmp_path).to_json())
        (tmp_path / SECRETS_DIR).mkdir(mode=0o700)
        (tmp_path / SECRETS_DIR / AGENT_TOKEN_FILE).write_text(TOKEN)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log_path = tmp_path / "agent.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.remote.serving", "agent", str(path), "worker"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                if call("GET", "/ranks")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.1)

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.log.close()
        return self.log_path.read_text()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path)
    yield process
    process.stop()


def running_pid(served: str) -> int:
    status, ranks = call("GET", "/ranks")
    assert status == 200 and isinstance(ranks, dict)
    assert ranks[served]["running"], ranks
    return int(ranks[served]["pid"])


@pytest.mark.parametrize(
    ("placement", "rank", "why"),
    [
        ([["head", [0]], ["nowhere", [0]]], 1, "rank 1 names node 'nowhere', which is not in"),
        ([["head", [0]], ["worker", [7]]], 1, "rank 1: worker has no device(s) [7]"),
        (PLACEMENT, 2, "rank 2 is not in the placement (ranks 0 to 1)"),
        (PLACEMENT, -1, "rank -1 is not in the placement"),
        ([["worker", [0]]], 0, "a has 2 rank(s), the placement 1"),
        ([["worker", [0]], ["worker", [0]]], 1, "rank 1 is on worker too"),
        (PLACEMENT, 0, "rank 0 of that placement is on head, not on worker"),
    ],
)
def test_a_placement_the_node_cannot_run_is_refused_and_the_running_rank_keeps_running(
    agent, placement, rank, why
):
    assert start_rank("a")[0] == 200
    pid = running_pid("a")
    status, body = start_rank("a", launch="l2", placement=placement, rank=rank)
    assert status == 400
    assert isinstance(body, dict) and why in body["error"]
    assert running_pid("a") == pid


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        {"launch": "l1", "rank": "1", "placement": PLACEMENT},
        {"launch": "l1", "rank": 1, "placement": [["worker", ["0"]]]},
        {"launch": "l1", "rank": 1, "placement": [["worker"]]},
        {"rank": 1, "placement": PLACEMENT},
        [1, 2],
    ],
)
def test_a_malformed_start_request_is_a_400(agent, body):
    data = body if isinstance(body, str) else json.dumps(body)
    request = urllib.request.Request(
        f"{BASE}/ranks/a", data.encode(), {"Authorization": f"Bearer {TOKEN}"}, method="PUT"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    assert call("GET", "/ranks") == (200, {})
    assert "Traceback" not in agent.stop()


def test_a_served_name_with_a_slash_is_started_and_stopped_by_its_encoded_name(agent):
    assert start_rank("org/model-b")[0] == 200
    pid = running_pid("org/model-b")
    assert call("DELETE", f"/ranks/{quote('org/model-b', safe='')}") == (200, {})
    assert call("GET", "/ranks") == (200, {})
    assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(
    "path",
    [
        "/ranks/x%2F..%2F..%2Franks",
        "/ranks/a%2F..",
        "/ranks/a/",
        "/ranks/A",
        "/ranks/%61%2F",
        "/ranks/org%2Fmodel-b%2F..%2F..%2Fa",
    ],
)
def test_an_unknown_served_name_is_a_404_and_stops_nothing(agent, path):
    assert start_rank("a")[0] == 200
    pid = running_pid("a")
    status, body = call("DELETE", path)
    assert status == 404, body
    assert running_pid("a") == pid


def test_a_traversal_in_the_raw_path_stops_nothing(agent):
    assert start_rank("a")[0] == 200
    pid = running_pid("a")
    for target in (b"/ranks/x/../../ranks", b"/ranks/a/../", b"/ranks/x/..%2F..%2Franks"):
        reply = raw_request(
            [b"DELETE " + target + b" HTTP/1.1", f"Host: {ADDRESS}".encode(),
             f"Authorization: Bearer {TOKEN}".encode()]
        )  # fmt: skip
        assert reply.split(b"\r\n", 1)[0] == b"HTTP/1.1 404 Not Found", (target, reply)
        assert running_pid("a") == pid


@pytest.mark.parametrize(
    "header",
    [
        b"Authorization: Bearer \xff\xfe",
        b"Authorization: Bearer \xc3\xa9" + TOKEN.encode()[2:],  # a non-ASCII token, same length
        b"Authorization: bearer \xed\xa0\x80",  # an encoded surrogate
        b"Authorization: Basic YWdlbnQ6dG9rZW4=",
        b"Authorization: Bearer",
        b"Authorization: " + TOKEN.encode(),
        b"Authorization:",
        b"X-No-Authorization: yes",
    ],
)
def test_a_malformed_or_wrong_authorization_header_is_a_401_without_a_traceback(agent, header):
    reply = raw_request([b"GET /ranks HTTP/1.1", f"Host: {ADDRESS}".encode(), header])
    assert reply.split(b"\r\n", 1)[0] == b"HTTP/1.1 401 Unauthorized", reply
    assert "Traceback" not in agent.stop()


def test_the_scheme_is_matched_without_regard_to_case(agent):
    reply = raw_request(
        [b"GET /ranks HTTP/1.1", f"Host: {ADDRESS}".encode(), f"authorization: BEARER {TOKEN}".encode()]
    )  # fmt: skip
    assert reply.split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK", reply
