"""The Docker daemon on this machine that builds the sandbox's images and runs its nodes.

If a daemon answers on the default socket (`/var/run/docker.sock`) it is used as is. Otherwise
vcluster starts its own `dockerd` (there is no systemd on the machines the sandbox targets) with
a FIXED data root outside any clone, `/var/lib/vcluster/docker`: every run, every clone and CI
on the same machine then find the images built before, which is what makes a second build take
seconds. Its socket, exec root and pidfile live under `/run/vcluster`, its log in
`/var/log/vcluster/dockerd.log`. The daemon is left running on purpose (it is a cache holder,
like the system one); `stop_local_docker` stops one that vcluster started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import VclusterError
from cluster.sandbox.filelock import file_lock

DEFAULT_SOCKET = Path("/var/run/docker.sock")
RUN_DIR = Path("/run/vcluster")
VCLUSTER_SOCKET = RUN_DIR / "docker.sock"
VCLUSTER_EXEC_ROOT = RUN_DIR / "docker-exec"
VCLUSTER_PIDFILE = RUN_DIR / "dockerd.pid"
VCLUSTER_DATA_ROOT = Path("/var/lib/vcluster/docker")
VCLUSTER_LOG = Path("/var/log/vcluster/dockerd.log")

DOCKERD_START_TIMEOUT_S = 60.0
"""How long to wait for a freshly started dockerd to answer `docker info` (it takes ~2 s)."""
DOCKER_INFO_TIMEOUT_S = 10.0
"""How long one `docker info` probe may take before the daemon counts as not answering."""

INSTALL_FIX = "apt-get install -y docker.io"


@dataclass(frozen=True)
class LocalDocker:
    """How to reach the local Docker daemon and where it keeps its data."""

    host: str
    """A DOCKER_HOST value: `unix:///run/vcluster/docker.sock`."""
    data_root: Path | None
    """The daemon's data root, or None when it is a daemon vcluster did not start."""
    started_by_vcluster: bool
    """True when this call (or an earlier vcluster run) started the daemon."""
    log_path: Path | None = None

    def argv(self, *args: str) -> list[str]:
        """The docker CLI argv that talks to this daemon: `docker -H HOST ARGS...`."""
        return ["docker", "--host", self.host, *args]

    def env(self) -> dict[str, str]:
        """An environment for subprocesses (docker CLI, docker-py) pointing at this daemon."""
        return {**os.environ, "DOCKER_HOST": self.host}


def socket_host(socket: Path) -> str:
    """The DOCKER_HOST URL of a unix socket path."""
    return f"unix://{socket}"


def dockerd_argv(
    dockerd: str = "dockerd",
    *,
    data_root: Path = VCLUSTER_DATA_ROOT,
    exec_root: Path = VCLUSTER_EXEC_ROOT,
    socket: Path = VCLUSTER_SOCKET,
    pidfile: Path = VCLUSTER_PIDFILE,
) -> list[str]:
    """The argv that starts vcluster's own dockerd (pure; tested)."""
    return [
        dockerd,
        "--data-root",
        str(data_root),
        "--exec-root",
        str(exec_root),
        "--host",
        socket_host(socket),
        "--pidfile",
        str(pidfile),
    ]


def daemon_answers(host: str, timeout_s: float = DOCKER_INFO_TIMEOUT_S) -> bool:
    """True when `docker info` against `host` succeeds within `timeout_s`."""
    try:
        done = subprocess.run(
            ["docker", "--host", host, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def ensure_local_docker(
    *,
    start_timeout_s: float = DOCKERD_START_TIMEOUT_S,
    default_socket: Path = DEFAULT_SOCKET,
) -> LocalDocker:
    """Return a reachable local Docker daemon, starting vcluster's own dockerd if none answers."""
    _require_binary("docker", fix="install the docker CLI (apt-get install -y docker.io)")
    if default_socket.exists() and daemon_answers(socket_host(default_socket)):
        return LocalDocker(
            host=socket_host(default_socket), data_root=None, started_by_vcluster=False
        )
    own = _own_daemon()
    if daemon_answers(own.host):
        return own
    dockerd = _require_binary("dockerd", fix=INSTALL_FIX)
    with file_lock(RUN_DIR / "dockerd.lock"):  # one start at a time on this machine
        if not daemon_answers(own.host):  # another process may have started it meanwhile
            _start_dockerd(dockerd, own, start_timeout_s)
    return own


def stop_local_docker(timeout_s: float = 30.0) -> bool:
    """Stop the dockerd that vcluster started (SIGTERM, then wait); False if none was running."""
    pid = _read_pid(VCLUSTER_PIDFILE)
    if pid is None or not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


def _own_daemon() -> LocalDocker:
    return LocalDocker(
        host=socket_host(VCLUSTER_SOCKET),
        data_root=VCLUSTER_DATA_ROOT,
        started_by_vcluster=True,
        log_path=VCLUSTER_LOG,
    )


def _require_binary(name: str, *, fix: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise VclusterError(f"`{name}` was not found on PATH", where="localhost", fix=fix)
    return path


def _start_dockerd(dockerd: str, own: LocalDocker, timeout_s: float) -> None:
    """Start dockerd in the background (own session, log to a file) and wait until it answers."""
    for folder in (VCLUSTER_DATA_ROOT, VCLUSTER_EXEC_ROOT, VCLUSTER_LOG.parent):
        folder.mkdir(parents=True, exist_ok=True)
    pid = _read_pid(VCLUSTER_PIDFILE)
    process = None
    if pid is None or not _alive(pid):  # else: a dockerd of ours is still coming up
        with open(VCLUSTER_LOG, "ab") as log:
            process = subprocess.Popen(
                dockerd_argv(dockerd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    _wait_until_answers(own, process, timeout_s)


def _wait_until_answers(
    own: LocalDocker, process: subprocess.Popen[bytes] | None, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon_answers(own.host, timeout_s=min(DOCKER_INFO_TIMEOUT_S, timeout_s)):
            return
        if process is not None and process.poll() is not None:
            raise VclusterError(
                f"dockerd exited with status {process.returncode} before answering: "
                f"{_log_tail(VCLUSTER_LOG)}",
                where="localhost",
                fix=f"read {VCLUSTER_LOG}; another dockerd may already use {VCLUSTER_DATA_ROOT}",
            )
        time.sleep(0.5)
    raise VclusterError(
        f"dockerd did not answer on {own.host} within {timeout_s:.0f} s: {_log_tail(VCLUSTER_LOG)}",
        where="localhost",
        fix=f"read {VCLUSTER_LOG}, or raise the start timeout",
    )


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) if text else "(empty log)"
