"""The container supervisor run for real, as a local process: a stand-in Ray (`sleep`) and a
stand-in vLLM (a shell whose child is titled `VLLM::EngineCore`, as vLLM titles its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.decide.plan import supervisor_source
from cluster.remote.supervisor import SERVE_FILE, STATE_FILE, session_members

# The stand-in vLLM: a leader that outlives its child titled like vLLM's engine core (as vLLM's
# API server can outlive its engine core).
FAKE_VLLM = ["bash", "-c", "(exec -a VLLM::EngineCore sleep 600) & exec sleep 600"]


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    config = {"ray": ["sleep", "600"], "state_dir": str(tmp_path), "peers": [], "wait_for": None}
    process = subprocess.Popen([sys.executable, "-c", supervisor_source(), json.dumps(config)])
    yield process, tmp_path
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def report(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def wait_for(condition, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def ask(state_dir: Path, spec_id: str, launch: str = "1") -> None:
    request = {"spec_id": spec_id, "launch": launch, "argv": FAKE_VLLM,
               "log": str(state_dir / "vllm.log")}  # fmt: skip
    (state_dir / SERVE_FILE).write_text(json.dumps(request))


def engine_core(leader: int) -> int:
    members = session_members(leader)
    return next(pid for pid, cmdline in members.items() if cmdline.startswith("VLLM::"))


def test_a_dead_engine_core_restarts_the_whole_vllm_after_a_back_off(supervisor):
    _, state_dir = supervisor
    ask(state_dir, "spec-a")
    first = wait_for(lambda: report(state_dir).get("state") == "running" and report(state_dir))
    engine = wait_for(lambda: engine_core(first["pid"]))
    time.sleep(1.5)  # the supervisor sees the titled process before it dies
    os.kill(engine, signal.SIGKILL)
    after = wait_for(lambda: report(state_dir).get("restarts") == 1 and report(state_dir))
    assert after["last_exit"]["cause"].startswith("VLLM::EngineCore")
    assert session_members(first["pid"]) == {}  # the leader went with it
    second = wait_for(
        lambda: report(state_dir).get("state") == "running" and report(state_dir), timeout_s=15
    )
    assert second["pid"] != first["pid"]
    assert "vcluster: vLLM start" in (state_dir / "vllm.log").read_text()


def test_a_withdrawn_request_stops_every_process_of_vllm_without_counting(supervisor):
    _, state_dir = supervisor
    ask(state_dir, "spec-a")
    running = wait_for(lambda: report(state_dir).get("state") == "running" and report(state_dir))
    wait_for(lambda: engine_core(running["pid"]))
    (state_dir / SERVE_FILE).unlink()
    stopped = wait_for(lambda: report(state_dir).get("state") == "stopped" and report(state_dir))
    assert stopped["restarts"] == 0
    assert session_members(running["pid"]) == {}


def test_a_new_request_with_the_same_spec_restarts_vllm(supervisor):
    _, state_dir = supervisor
    ask(state_dir, "spec-a", launch="1")
    first = wait_for(lambda: report(state_dir).get("state") == "running" and report(state_dir))
    ask(state_dir, "spec-a", launch="2")
    second = wait_for(lambda: report(state_dir).get("launch") == "2" and report(state_dir))
    assert second["pid"] != first["pid"] and second["restarts"] == 0


def test_sigterm_stops_vllm_and_ray_and_the_supervisor_exits_cleanly(supervisor):
    process, state_dir = supervisor
    ask(state_dir, "spec-a")
    running = wait_for(lambda: report(state_dir).get("state") == "running" and report(state_dir))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert session_members(running["pid"]) == {}


def test_an_image_without_ray_is_said_in_one_line(tmp_path: Path):
    config = {"ray": ["no-such-ray"], "state_dir": str(tmp_path), "peers": [], "wait_for": None}
    done = subprocess.run(
        [sys.executable, "-c", supervisor_source(), json.dumps(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 127
    assert "`no-such-ray` is not in this image" in done.stdout
    assert "Traceback" not in done.stderr


def test_without_ray_the_supervisor_keeps_vllm_running_and_stops_it_on_sigterm(tmp_path: Path):
    config = {"ray": None, "state_dir": str(tmp_path), "peers": [], "wait_for": None}
    process = subprocess.Popen([sys.executable, "-c", supervisor_source(), json.dumps(config)])
    try:
        ask(tmp_path, "spec-a")
        running = wait_for(lambda: report(tmp_path).get("state") == "running" and report(tmp_path))
        engine = wait_for(lambda: engine_core(running["pid"]))
        time.sleep(1.5)  # the supervisor sees the titled process before it dies
        os.kill(engine, signal.SIGKILL)
        wait_for(lambda: report(tmp_path).get("restarts") == 1)
        again = wait_for(
            lambda: report(tmp_path).get("state") == "running" and report(tmp_path), timeout_s=15
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert session_members(again["pid"]) == {}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


FRONT = ["bash", "-c", "exec -a vcluster-front-standin sleep 600"]


def front_pids() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if cmdline.startswith(b"vcluster-front-standin") and stat.split(") ")[1][0] != "Z":
            found.append(int(entry))
    return found


def test_the_front_runs_beside_vllm_is_restarted_when_it_dies_and_stops_with_the_request(
    supervisor,
):
    _, state_dir = supervisor
    request = {"spec_id": "spec-f", "launch": "1", "argv": FAKE_VLLM,
               "log": str(state_dir / "vllm.log"),
               "front": {"argv": FRONT, "log": str(state_dir / "front.log")}}  # fmt: skip
    (state_dir / SERVE_FILE).write_text(json.dumps(request))
    [first] = wait_for(front_pids)
    vllm = wait_for(lambda: report(state_dir).get("state") == "running" and report(state_dir))
    os.kill(first, signal.SIGKILL)  # the front dies: it comes back, vLLM is not touched
    [second] = wait_for(lambda: [p for p in front_pids() if p != first])
    assert report(state_dir)["pid"] == vllm["pid"] and report(state_dir)["restarts"] == 0
    (state_dir / SERVE_FILE).unlink()  # `down` or a new request: the front stops too
    wait_for(lambda: not front_pids())
    assert "vcluster: the front start" in (state_dir / "front.log").read_text()
    assert second != first
