"""One `up` or `down` at a time per cluster: an flock held on the head for the run's duration.

The lock is held by a remote `flock ... cat` whose stdin is our SSH channel: closing the channel,
or the controller dying, ends `cat` and releases the lock, so a crashed run never leaves a
stale lock behind.

The lock file lies in a folder only its owner can enter, made (or set back) to mode 0700 each
time: `/var/lib/vcluster/locks` for root, `~/.local/state/vcluster/locks` for another SSH user
(who cannot write /var/lib). A shared folder such as /tmp would let any local user take the
cluster's lock first, or plant a link where the lock file goes.
"""

from __future__ import annotations

import time

import paramiko

from cluster.errors import VclusterError
from cluster.nodes.transport.ssh import SshConnection

BUSY_EXIT_CODE = 75
FOLDER_EXIT_CODE = 76
ACQUIRE_TIMEOUT_S = 15.0
LOCK_DIR = "/var/lib/vcluster/locks"
"""The lock folder when the SSH user is root."""
USER_LOCK_DIR = ".local/state/vcluster/locks"
"""The lock folder under the home of an SSH user who is not root."""
_ACQUIRED = b"vcluster-lock-acquired\n"
# The cluster's name arrives as $0; nothing of the user's is pasted into the script.
_LOCK_SCRIPT = (
    f'if [ "$(id -u)" = 0 ]; then dir={LOCK_DIR}; else dir="${{HOME:?}}/{USER_LOCK_DIR}"; fi; '
    f'mkdir -p -m 700 "$dir" && chmod 700 "$dir" || exit {FOLDER_EXIT_CODE}; '
    f'exec flock --nonblock --conflict-exit-code {BUSY_EXIT_CODE} "$dir/$0.lock" '
    "sh -c 'echo vcluster-lock-acquired; exec cat >/dev/null'"
)


class ClusterBusy(VclusterError):
    """Another vcluster run holds the cluster's lock."""


def lock_path(cluster: str) -> str:
    """The lock file of a cluster, for a root SSH user."""
    return f"{LOCK_DIR}/{cluster}.lock"


class ClusterLock:
    """Hold the cluster's lock on the head while the `with` block runs."""

    def __init__(self, head: SshConnection, cluster: str, command: str) -> None:
        self._head = head
        self._cluster = cluster
        self._command = command
        self._channel: paramiko.Channel | None = None

    def __enter__(self) -> ClusterLock:
        channel = self._head.open_channel(["sh", "-c", _LOCK_SCRIPT, self._cluster])
        received = b""
        deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
        while not received.endswith(b"\n") and time.monotonic() < deadline:
            if channel.recv_ready():
                received += channel.recv(64)
            elif channel.exit_status_ready():
                break
            else:
                time.sleep(0.02)
        if received == _ACQUIRED:
            self._channel = channel
            return self
        status = channel.recv_exit_status() if channel.exit_status_ready() else None
        said = _first_line(channel.recv_stderr(4096) if channel.recv_stderr_ready() else b"")
        channel.close()
        if status == BUSY_EXIT_CODE:
            raise ClusterBusy(
                f"another vcluster up/down is running on cluster {self._cluster}",
                where=self._head.target.label,
                fix=f"wait for it to finish, then run `vcluster {self._command}` again",
            )
        where = f"{LOCK_DIR} (root) or ~/{USER_LOCK_DIR}"
        if status == FOLDER_EXIT_CODE:
            raise VclusterError(
                f"could not make the lock folder {where} owner-only: {said}",
                where=self._head.target.label,
                fix="check that the SSH user owns that folder, and that its disk is writable",
            )
        raise VclusterError(
            f"could not take the cluster lock {self._cluster}.lock in {where} (exit {status})"
            + (f": {said}" if said else ""),
            where=self._head.target.label,
            fix="check that `flock` (util-linux) is installed on the head",
        )

    def __exit__(self, *exc: object) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def _first_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else ""
