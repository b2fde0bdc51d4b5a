"""The container supervisor's pure parts, on real /proc captures (tests/fixtures/proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cluster.decide.plan import build_plan, supervisor_argv
from cluster.remote.supervisor import (
    BACKOFF_S,
    TCP_CLOSE_WAIT,
    backoff_s,
    exit_cause,
    gone_peers,
    parse_stat,
    parse_tcp_table,
    peer_connections,
)
from tests.unit.test_plan import example, gpu_facts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "proc"


def test_a_stat_line_is_read_after_the_name_whatever_the_name_holds():
    state, parent, session = parse_stat((FIXTURES / "stat-name-with-parens.txt").read_text())
    assert (state, parent, session) == ("R", 25936, 1159)


def test_a_connection_the_peer_closed_shows_as_close_wait_with_its_socket_inode():
    rows = parse_tcp_table((FIXTURES / "net-tcp-close-wait.txt").read_text())
    closed = [row for row in rows if row[4] == TCP_CLOSE_WAIT]
    assert closed == [("127.0.0.1", 34736, "127.0.0.1", 40711, TCP_CLOSE_WAIT, 37535)]


def test_a_peer_that_closed_a_connection_we_hold_is_named():
    rows = parse_tcp_table((FIXTURES / "net-tcp-close-wait.txt").read_text())
    assert peer_connections(rows, {37535}, ["127.0.0.1"]) == (set(), {"127.0.0.1"})
    assert peer_connections(rows, {37535}, ["10.0.0.2"]) == (set(), set())
    assert peer_connections(rows, {1}, ["127.0.0.1"]) == (set(), set())  # not our socket


def test_a_peer_is_gone_when_none_of_the_serving_models_connections_to_it_is_open():
    store, ring = (40001, "10.0.0.2", 29501), (40002, "10.0.0.2", 41000)
    other = (40003, "10.0.0.3", 5555)
    serving = {store, ring, other}
    assert gone_peers(serving, {store, ring, other}) == set()
    assert gone_peers(serving, {ring, other}) == set()  # one closed: not proof enough
    assert gone_peers(serving, {other}) == {"10.0.0.2"}
    # the peer restarted and its new rank reached our stale store: still gone
    assert gone_peers(serving, {other, (40009, "10.0.0.2", 29501)}) == {"10.0.0.2"}
    assert gone_peers(set(), set()) == set()  # before the model serves, nothing is judged


def test_back_off_doubles_up_to_a_minute_and_stays_there():
    assert [backoff_s(n) for n in range(1, 9)] == [2, 4, 8, 16, 32, 60, 60, 60]
    assert max(BACKOFF_S) == 60


def test_exit_causes_name_the_signal_or_the_status():
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    killed.send_signal(signal.SIGKILL)
    _, status = os.waitpid(killed.pid, 0)
    killed.returncode = -9
    assert exit_cause(status) == "killed by SIGKILL"
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    _, status = os.waitpid(failed.pid, 0)
    failed.returncode = 3
    assert exit_cause(status) == "exited with status 3"


def test_the_container_runs_the_supervisor_with_rays_command_and_its_ranks():
    inventory = example("cpu-2.yaml")
    facts = gpu_facts(inventory, gpus=0)
    plan = build_plan(inventory, facts)
    head, worker = plan.head, plan.workers[0]
    argv = supervisor_argv(head.container)
    assert argv[:2] == ["python3", "-c"] and "class Supervisor" in argv[2]
    assert '"ray": ["ray", "start", "--head"' in argv[3]
    assert head.container.supervisor.peers == (worker.facts.address,)
    assert head.container.supervisor.wait_for is None
    assert worker.container.supervisor.peers == (head.facts.address,)
    assert worker.container.supervisor.wait_for == (head.facts.address, 6379)
    assert worker.container.supervisor.serving == (head.facts.address, 8000)
    assert head.container.restart_policy == "unless-stopped"


def test_with_rays_executor_the_supervisor_watches_no_ranks():
    inventory = example("gpu-2x8.yaml")
    plan = build_plan(inventory, gpu_facts(inventory))
    assert {n.container.supervisor.peers for n in plan.nodes} == {()}
