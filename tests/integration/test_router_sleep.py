"""vLLM's sleep mode under the router, with the stand-in server (tests/support/standin_vllm.py
learns the development routes): a model that gives way sleeps, a request wakes it once, and a
wake that fails falls back to a cold start that says why. The real vLLM is proven on a GPU
(docs/performance.md); the CPU platform has no sleep mode.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from tests.integration.test_router import TOKEN, chat, model, request, start

__all__ = ["start"]


def standin_counts(api_port: int, host: str = "127.0.0.1") -> dict:
    """What the model's own server counted: sleeps, wakes, weight reloads, its level now
    (asked as its node's agent asks: with the token, from the address it listens on)."""
    url = f"http://{host}:{api_port}/standin/sleep"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as reply:
        return json.loads(reply.read())


def wait_for(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(0.2)


def test_a_model_that_gives_way_sleeps_and_the_next_request_wakes_the_same_process(start):
    cluster = start(model("a", 0, sleep=1), model("b", 1, sleep=1))
    first = chat("a")
    assert first[0] == 200
    assert chat("b")[0] == 200
    states = cluster.models()
    assert (states["a"]["state"], states["a"]["sleep_level"]) == ("sleeping", 1)
    assert states["b"]["state"] == "loaded"
    assert standin_counts(18200)["sleeps"] == 1

    again = chat("a")
    assert again[0] == 200
    assert again[1]["pid"] == first[1]["pid"]  # woken, not started again
    states = cluster.models()
    assert (states["a"]["state"], states["a"]["activations"], states["a"]["wakes"]) == (
        "loaded",
        1,
        1,
    )
    assert states["a"]["last_wake_s"] is not None and states["a"]["last_wake_at"] is not None
    assert (states["b"]["state"], states["b"]["sleep_level"]) == ("sleeping", 1)


def test_concurrent_requests_for_a_sleeping_model_wake_it_once(start):
    cluster = start(model("a", 0, "--wake-s", "1.5", sleep=1), model("b", 1, sleep=1))
    assert chat("a")[0] == 200 and chat("b")[0] == 200
    replies: list = []
    threads = [threading.Thread(target=lambda: replies.append(chat("a"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in replies] == [200] * 8
    assert standin_counts(18200)["wakes"] == 1
    assert cluster.models()["a"]["wakes"] == 1


def test_a_wake_that_fails_falls_back_to_a_cold_start_and_says_why(start):
    cluster = start(model("a", 0, "--fail-wake", sleep=1), model("b", 1, sleep=1))
    first = chat("a")
    assert first[0] == 200 and chat("b")[0] == 200
    again = chat("a")
    assert again[0] == 200
    assert again[1]["pid"] != first[1]["pid"]  # a new process: started cold
    state = cluster.models()["a"]
    assert (state["state"], state["activations"], state["wakes"]) == ("loaded", 2, 0)
    assert "CUDA error: out of memory" in state["wake_failure"]
    assert "the wake failed" in cluster.log_path.read_text()


def test_a_level_2_sleeper_reads_its_weights_again_when_it_wakes(start):
    cluster = start(model("a", 0, sleep=2), model("b", 1, sleep=2))
    assert chat("a")[0] == 200 and chat("b")[0] == 200
    assert cluster.models()["a"]["sleep_level"] == 2
    assert chat("a")[0] == 200
    counts = standin_counts(18200)
    assert (counts["sleeps"], counts["wakes"], counts["reloads"]) == (1, 1, 1)


def test_a_level_1_sleeper_shows_the_host_memory_it_holds(start):
    cluster = start(model("a", 0, "--sleep-host-mb", "64", sleep=1), model("b", 1, sleep=1))
    assert chat("a")[0] == 200 and chat("b")[0] == 200
    wait_for(
        lambda: (cluster.models()["a"]["host_memory_bytes"] or 0) >= 64 * 1024**2,
        "holding 64 MiB",
    )


def test_a_model_without_sleep_mode_is_stopped_as_before(start):
    cluster = start(model("a", 0), model("b", 1, sleep=1))
    assert chat("a")[0] == 200 and chat("b")[0] == 200
    states = cluster.models()
    assert (states["a"]["state"], states["a"]["sleep_level"]) == ("unloaded", None)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/sleep?level=1"),
        ("POST", "/wake_up"),
        ("GET", "/is_sleeping"),
        ("POST", "/collective_rpc"),
        ("POST", "/v1/../sleep"),
        ("POST", "/%2e%2e/sleep"),
    ],
)
def test_the_users_endpoint_never_passes_vllms_sleep_routes(start, method, path):
    cluster = start(model("a", 0, sleep=1))
    assert chat("a")[0] == 200
    status, _ = request(method, path, {"method": "reload_weights"})
    assert status in (400, 404)
    assert standin_counts(18200)["sleeps"] == 0
    assert cluster.models()["a"]["state"] == "loaded"


def test_only_the_agent_with_its_token_sleeps_a_model(start):
    cluster = start(model("a", 0, sleep=1))
    assert chat("a")[0] == 200
    agent = "http://127.0.0.1:18181"
    assert request("POST", "/sleep/a", key="wrong", base=agent)[0] == 401
    assert standin_counts(18200)["sleeps"] == 0
    status, body = request("POST", "/sleep/a", key=TOKEN, base=agent)
    assert status == 200 and body["asleep"] == 1
    assert standin_counts(18200)["sleeps"] == 1
    status, body = request("POST", "/wake/a", key=TOKEN, base=agent)
    assert status == 200 and body["asleep"] is None and body["wake_s"] >= 0
    assert cluster.models()["a"]["state"] == "loaded"


def test_off_the_head_the_development_routes_answer_the_nodes_own_agent_only(start):
    cluster = start(model("a", 0, sleep=1), model("w", 1, pipeline=1, sleep=1))
    assert chat("w")[0] == 200
    assert cluster.models()["w"]["placement"] == [["worker", [0]]]  # its API on 127.0.0.2
    base = "http://127.0.0.2:18202"
    for path in ("/sleep?level=1", "/wake_up", "/collective_rpc", "/invocations"):
        status, body = request("POST", path, {"method": "x"}, key=TOKEN, base=base)
        assert status == 403 and "own agent only" in body["error"], path
    status, body = request("GET", "/is_sleeping", key="wrong", base=base)
    assert status == 403 and "agent token" in body["error"]
    assert chat("a")[0] == 200  # a takes the worker's GPU: w sleeps, through its node's agent
    assert cluster.models()["w"]["state"] == "sleeping"
    assert chat("w")[0] == 200
    assert cluster.models()["w"]["wakes"] == 1


def test_a_sleeper_is_unloaded_by_hand_or_after_its_idle_time_and_its_ranks_end(start):
    cluster = start(model("a", 0, sleep=1, unload_after_s=4.0), model("b", 1, sleep=1))
    assert chat("a")[0] == 200 and chat("b")[0] == 200
    assert cluster.models()["a"]["state"] == "sleeping"
    wait_for(lambda: cluster.models()["a"]["state"] == "unloaded", "unloaded when idle")
    assert request("GET", "/ranks", key=TOKEN, base="http://127.0.0.1:18181")[1].keys() == {"b"}
    assert chat("a")[0] == 200  # b sleeps now; unloaded by hand
    status, body = request("POST", "/vcluster/unload?model=b")
    assert (status, body["state"], body["sleep_level"]) == (200, "unloaded", None)
    assert "b" not in request("GET", "/ranks", key=TOKEN, base="http://127.0.0.1:18181")[1]
