"""The first process of every vcluster container: it runs Ray, keeps vLLM running, reaps orphans.

This file is sent to the nodes as it is: the container runs `python3 -c <this source> CONFIG`.
It therefore uses the standard library only and runs on the Python of any vLLM image.

- Ray (`ray start --block`) is its child, when the cluster has Ray. When Ray exits the supervisor
  stops vLLM and exits with Ray's status, and Docker's restart policy starts the container again
  (it rejoins Ray). Without Ray (vLLM's own multi-node mode) it only keeps vLLM running.
- vLLM runs while `serve.json` in the state folder asks for it; `vcluster up` writes that file.
  The file lives in the container's own file system, so it survives a restart of the container
  or of the host, and vLLM comes back with it.
- vLLM runs in its own session. When any of its processes dies (the API server, the engine
  core, a worker) or a peer rank goes away (a TCP connection of ours that the other node closed),
  every process of that session is stopped and vLLM starts again after a back-off.
- As PID 1 it reaps every orphan, so killed processes never linger as zombies.
- On the head of a one-model cluster, `serve.json` also names the front: vcluster's router, the
  users' endpoint, in front of vLLM (which listens on loopback). The front runs in its own
  session beside vLLM, whatever vLLM's state, and is restarted a second after it exits.

The state it reports (`vllm.json`: state, restarts, last exit cause) is what `vcluster status`
shows. The pure parts (parsing /proc, the back-off) are tested in tests/unit/test_supervisor.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

SERVE_FILE = "serve.json"
STATE_FILE = "vllm.json"
POLL_S = 1.0
STOP_GRACE_S = 8.0
"""SIGTERM, then SIGKILL after this: within Docker's 10 s for `docker stop`."""
BACKOFF_S = (2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
HEALTHY_RUN_S = 300.0
"""A run this long resets the back-off: the next failure is a new incident, not a crash loop."""
PEER_WAIT_LOG_S = 30.0
FRONT_RESTART_S = 1.0
TITLE_PREFIX = "VLLM::"
"""vLLM names its long-lived processes (`VLLM::EngineCore`, `VLLM::Worker_PP0`, ...)."""
TCP_ESTABLISHED = "01"
TCP_CLOSE_WAIT = "08"
TCP_LISTEN = "0A"


# --- pure parts ---------------------------------------------------------------------------------


def backoff_s(failures_in_a_row: int) -> float:
    """The wait before the next start after `failures_in_a_row` (>= 1) failed runs."""
    return BACKOFF_S[min(failures_in_a_row, len(BACKOFF_S)) - 1]


def parse_stat(text: str) -> tuple[str, int, int]:
    """(state, parent pid, session id) from a /proc/PID/stat line (the name may hold spaces)."""
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[3])


def parse_tcp_table(text: str) -> list[tuple[str, int, str, int, str, int]]:
    """(local address, port, remote address, port, state, inode) of each /proc/net/tcp{,6} row."""
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, remote = _endpoint(fields[1]), _endpoint(fields[2])
        rows.append((local[0], local[1], remote[0], remote[1], fields[3], int(fields[9])))
    return rows


def _endpoint(hex_text: str) -> tuple[str, int]:
    address, port = hex_text.split(":")
    raw = bytes.fromhex(address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    text = socket.inet_ntop(socket.AF_INET6, words)
    return (text[7:] if text.startswith("::ffff:") else text), int(port, 16)


def exit_cause(status: int) -> str:
    """A waitpid status in words: `exited with status 1`, `killed by SIGKILL`."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exited with status {os.WEXITSTATUS(status)}"


# --- the machine's processes --------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def session_members(session: int) -> dict[int, str]:
    """{pid: command line} of every live (not zombie) process of a session."""
    members = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if not stat:
            continue
        state, _, sid = parse_stat(stat)
        if sid == session and state != "Z":
            cmdline = _read(f"/proc/{entry}/cmdline").replace("\0", " ").strip()
            members[int(entry)] = cmdline
    return members


def socket_inodes(pids: list[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


if TYPE_CHECKING:  # annotations only: `tuple[...]` at run time needs Python 3.9
    PeerConnection = tuple[int, str, int]
    """(local port, peer address, peer port) of a TCP connection to another rank's node."""


def peer_connections(
    rows: list[tuple[str, int, str, int, str, int]], inodes: set[int], peers: list[str]
) -> tuple[set[PeerConnection], set[str]]:
    """The open connections of these sockets to peer addresses, and the peers that closed one
    (CLOSE_WAIT: the other side is gone, ours still holds the socket)."""
    open_now: set[PeerConnection] = set()
    closed: set[str] = set()
    for _, local_port, remote, remote_port, state, inode in rows:
        if inode not in inodes or remote not in peers:
            continue
        if state == TCP_CLOSE_WAIT:
            closed.add(remote)
        elif state == TCP_ESTABLISHED:
            open_now.add((local_port, remote, remote_port))
    return open_now, closed


def gone_peers(serving: set[PeerConnection], open_now: set[PeerConnection]) -> set[str]:
    """Peers none of whose connections of the serving model is still open.

    `serving` is what our vLLM held once the model served. Start-up opens and closes
    connections (the rendezvous), so only the serving set counts; and a peer's new connections
    do not make up for the old ones: a restarted peer rank meets a stale one of ours otherwise.
    """
    return {
        peer
        for peer in {connection[1] for connection in serving}
        if not any(c[1] == peer and c in open_now for c in serving)
    }


def reachable(address: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def serves(address: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether the endpoint's /health answers 200: the router in front of vLLM listens before
    the model serves, so an open port alone says nothing."""
    connection = http.client.HTTPConnection(address, port, timeout=timeout_s)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


# --- the supervisor -----------------------------------------------------------------------------


@dataclass
class VllmRun:
    spec_id: str
    watch_titled: bool
    """Whether a `VLLM::` process of the run that dies ends the run (not for the router)."""
    launch: str | None
    """Which request of `vcluster up` started it: a new one restarts vLLM with the same spec."""
    process: subprocess.Popen[bytes]
    started_at: float
    titled: dict[int, str] = field(default_factory=dict)
    """The VLLM:: processes seen in this run: each must live as long as the run."""
    serving_connections: set[PeerConnection] | None = None
    """The connections to peer ranks held when the model first served (None before that)."""


@dataclass
class FrontRun:
    """The router in front of vLLM (one-model clusters' head)."""

    argv: list[str]
    process: subprocess.Popen[bytes]


class Supervisor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.ray_argv: list[str] | None = config["ray"]
        self.state_dir = Path(config["state_dir"])
        self.peers: list[str] = config["peers"]
        wait_for = config.get("wait_for")
        self.wait_for = (str(wait_for[0]), int(wait_for[1])) if wait_for else None
        # The model's endpoint: once it answers, the ranks have met and the model serves.
        serving = config.get("serving")
        self.serving_address = (str(serving[0]), int(serving[1])) if serving else None
        self.ray: subprocess.Popen[bytes] | None = None
        self.vllm: VllmRun | None = None
        self.front: FrontRun | None = None
        self.front_next_start = 0.0
        self.exits: dict[int, int] = {}
        self.restarts = 0
        self.failures_in_a_row = 0
        self.next_start = 0.0
        self.last_exit: dict[str, Any] | None = None
        self.state = "stopped"
        self.stopping = False
        self.last_peer_log = 0.0

    # the loop

    def run(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._load_counters()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        if self.ray_argv:
            try:
                self.ray = subprocess.Popen(self.ray_argv, start_new_session=True)
            except FileNotFoundError:
                self._log(
                    f"`{self.ray_argv[0]}` is not in this image: vLLM's images have no Ray from "
                    "vLLM 0.19.1 on; run `vcluster up` again: it derives a Ray-ready image"
                )
                return 127
        while not self.stopping:
            self._reap()
            if self.ray is not None and self.ray.pid in self.exits:
                cause = exit_cause(self.exits[self.ray.pid])
                self.ray.returncode = 1
                self._log(f"Ray {cause}; stopping vLLM, the container restarts")
                self._stop_vllm(f"Ray {cause}", count=False)
                return 1
            self._supervise_vllm()
            self._supervise_front()
            self._write_state()
            time.sleep(POLL_S)
        self._stop_vllm("the container is stopping", count=False)
        self._stop_front("the container is stopping")
        if self.ray is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.ray.pid, signal.SIGTERM)
        return 0

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _supervise_vllm(self) -> None:
        desired = self._desired()
        run = self.vllm
        if run is not None:
            if desired is None or (desired["spec_id"], desired.get("launch")) != (
                run.spec_id,
                run.launch,
            ):
                self._stop_vllm("stopped by vcluster (a new request, or none)", count=False)
                self.failures_in_a_row = 0
                self.next_start = 0.0
                return
            death = self._death(run)
            if death is not None:
                self._stop_vllm(death, count=True)
            return
        if desired is None:
            self.state = "stopped"
            return
        if time.monotonic() < self.next_start:
            self.state = "backoff"
            return
        if self.wait_for is not None and not reachable(*self.wait_for):
            self.state = f"waiting for {self.wait_for[0]}"
            if time.monotonic() - self.last_peer_log > PEER_WAIT_LOG_S:
                self._log(f"vLLM waits: {self.wait_for[0]}:{self.wait_for[1]} is not reachable")
                self.last_peer_log = time.monotonic()
            return
        self._start_vllm(desired)

    def _death(self, run: VllmRun) -> str | None:
        """Why this run of vLLM must be restarted, or None while every part of it lives."""
        members = session_members(run.process.pid)
        for pid, cmdline in members.items():
            if not run.watch_titled:
                break
            if cmdline.startswith(TITLE_PREFIX) and pid not in run.titled:
                run.titled[pid] = cmdline.split()[0]
        # Everything found dead at this poll is named: which went first is not known here.
        dead = [
            f"{title} (pid {pid}) {exit_cause(self.exits[pid]) if pid in self.exits else 'ended'}"
            for pid, title in run.titled.items()
            if pid not in members
        ]
        if run.process.pid in self.exits:
            run.process.returncode = 1
            dead.insert(0, f"vllm serve {exit_cause(self.exits[run.process.pid])}")
        if dead:
            return "; ".join(dead)
        if not self.peers:
            return None
        rows = parse_tcp_table(_read("/proc/net/tcp")) + parse_tcp_table(_read("/proc/net/tcp6"))
        open_now, closed = peer_connections(rows, socket_inodes(list(members)), self.peers)
        if (
            run.serving_connections is None
            and self.serving_address is not None
            and serves(*self.serving_address)  # probed only until the model first serves
        ):
            run.serving_connections = open_now
        gone = closed | gone_peers(run.serving_connections or set(), open_now)
        if gone:
            return f"a peer rank went away ({', '.join(sorted(gone))} closed its connection)"
        return None

    def _supervise_front(self) -> None:
        desired = self._desired()
        wanted = desired.get("front") if desired is not None else None
        run = self.front
        if run is not None:
            if wanted is None or wanted["argv"] != run.argv:
                self._stop_front("stopped by vcluster (a new request, or none)")
            elif run.process.pid in self.exits:
                run.process.returncode = 1
                self._log(f"the front {exit_cause(self.exits.pop(run.process.pid))}; restarting")
                self._end_session(run.process.pid)
                self.front = None
                self.front_next_start = time.monotonic() + FRONT_RESTART_S
            return
        if wanted is None or time.monotonic() < self.front_next_start:
            return
        process = _spawn(wanted["argv"], wanted["log"], "the front")
        self.front = FrontRun(list(wanted["argv"]), process)
        self._log(f"front started (pid {process.pid})")

    def _stop_front(self, cause: str) -> None:
        run = self.front
        if run is None:
            return
        self._log(f"stopping the front: {cause}")
        self._end_session(run.process.pid)
        run.process.returncode = run.process.returncode or 0
        self.front = None

    # vLLM's life

    def _start_vllm(self, desired: dict[str, Any]) -> None:
        process = _spawn(desired["argv"], desired["log"], "vLLM")
        self.vllm = VllmRun(
            desired["spec_id"],
            bool(desired.get("watch_titled", True)),
            desired.get("launch"),
            process,
            time.monotonic(),
        )
        kept = {self.ray.pid if self.ray else None, self.front.process.pid if self.front else None}
        self.exits = {pid: s for pid, s in self.exits.items() if pid in kept}  # old news
        self.state = "running"
        self._log(f"vLLM started (pid {process.pid}, spec {desired['spec_id']})")

    def _stop_vllm(self, cause: str, *, count: bool) -> None:
        run = self.vllm
        if run is None:
            return
        self._log(f"stopping vLLM: {cause}")
        self._end_session(run.process.pid)
        run.process.returncode = run.process.returncode or 0
        self.vllm = None
        if not count:
            self.state = "stopped"
            return
        ran_s = time.monotonic() - run.started_at
        self.failures_in_a_row = 1 if ran_s > HEALTHY_RUN_S else self.failures_in_a_row + 1
        self.restarts += 1
        delay = backoff_s(self.failures_in_a_row)
        self.next_start = time.monotonic() + delay
        self.last_exit = {"cause": cause, "at": time.time(), "ran_s": round(ran_s, 1)}
        self.state = "backoff"
        self._log(f"vLLM restarts in {delay:g} s (restart {self.restarts})")

    def _end_session(self, session: int) -> None:
        """SIGTERM every process of the session, SIGKILL what remains after the grace time."""
        deadline = time.monotonic() + STOP_GRACE_S
        sent_kill = False
        while True:
            members = session_members(session)
            if not members:
                return
            if time.monotonic() > deadline and not sent_kill:
                sent_kill = True
                for pid in members:
                    _signal(pid, signal.SIGKILL)
            elif not sent_kill:
                for pid in members:
                    _signal(pid, signal.SIGTERM)
            self._reap()
            time.sleep(0.2)

    # files and bookkeeping

    def _desired(self) -> dict[str, Any] | None:
        try:
            desired = json.loads((self.state_dir / SERVE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return desired if isinstance(desired, dict) and "spec_id" in desired else None

    def _load_counters(self) -> None:
        """Restarts and the last exit survive a restart of the container."""
        try:
            saved = json.loads((self.state_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return
        self.restarts = int(saved.get("restarts", 0))
        self.last_exit = saved.get("last_exit")

    def _write_state(self) -> None:
        run = self.vllm
        state = {
            "state": self.state,
            "spec_id": run.spec_id if run else None,
            "launch": run.launch if run else None,
            "pid": run.process.pid if run else None,
            "running_s": round(time.monotonic() - run.started_at, 1) if run else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }
        path = self.state_dir / STATE_FILE
        partial = path.with_name(STATE_FILE + ".partial")
        partial.write_text(json.dumps(state))
        os.replace(partial, path)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exits[pid] = status

    def _log(self, text: str) -> None:
        print(f"vcluster-supervisor: {text}", flush=True)


def _spawn(argv: list[str], log_path: str, what: str) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own, its output appended to `log_path`."""
    with open(log_path, "ab") as log:
        log.write(f"\n==== vcluster: {what} start at {time.ctime()} ====\n".encode())
        log.flush()
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


if __name__ == "__main__":
    sys.exit(Supervisor(json.loads(sys.argv[1])).run())
