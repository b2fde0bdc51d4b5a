"""The stop script `vcluster` runs in every container after a collective check, run for real
with the shell of this machine (dash, as in Debian- and Ubuntu-based images)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from cluster.remote.collective import PID_FILE
from cluster.steps.collective import STOP_SCRIPT


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_it_kills_the_whole_process_group_of_a_check_left_running_and_its_pid_file():
    leader = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300"], start_new_session=True)
    Path(PID_FILE).write_text(str(leader.pid))
    time.sleep(0.2)
    members = [
        int(p) for p in os.listdir("/proc") if p.isdigit() and _group_of(int(p)) == leader.pid
    ]
    assert len(members) >= 2
    done = subprocess.run(["sh", "-c", STOP_SCRIPT], check=False)
    leader.wait(timeout=10)
    time.sleep(0.2)
    assert done.returncode == 0
    assert not any(alive(pid) for pid in members if pid != leader.pid)
    assert not Path(PID_FILE).exists()


def test_without_a_check_left_it_does_nothing_and_succeeds():
    Path(PID_FILE).unlink(missing_ok=True)
    assert subprocess.run(["sh", "-c", STOP_SCRIPT], check=False).returncode == 0


def _group_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None
