"""One `up` or `down` at a time per cluster: an flock held on the head for the run's duration.

The lock is held by a remote `flock ... cat` whose stdin is our SSH channel: closing the channel,
or the controller dying, ends `cat` and releases the lock, so a crashed run never leaves a
stale lock behind.
"""

from __future__ import annotations

import time

import paramiko

from cluster.errors import VclusterError
from cluster.transport.ssh import SshConnection

BUSY_EXIT_CODE = 75
ACQUIRE_TIMEOUT_S = 15.0
_ACQUIRED = b"vcluster-lock-acquired\n"
# The path arrives as $0; nothing of the user's is pasted into the script.
_LOCK_SCRIPT = (
    f'exec flock --nonblock --conflict-exit-code {BUSY_EXIT_CODE} "$0" '
    "sh -c 'echo vcluster-lock-acquired; exec cat >/dev/null'"
)


class ClusterBusy(VclusterError):
    """Another vcluster run holds the cluster's lock."""


def lock_path(cluster: str) -> str:
    return f"/tmp/vcluster-{cluster}.lock"


class ClusterLock:
    """Hold the cluster's lock on the head while the `with` block runs."""

    def __init__(self, head: SshConnection, cluster: str, command: str) -> None:
        self._head = head
        self._cluster = cluster
        self._command = command
        self._channel: paramiko.Channel | None = None

    def __enter__(self) -> ClusterLock:
        channel = self._head.open_channel(["sh", "-c", _LOCK_SCRIPT, lock_path(self._cluster)])
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
        channel.close()
        if status == BUSY_EXIT_CODE:
            raise ClusterBusy(
                f"another vcluster up/down is running on cluster {self._cluster}",
                where=self._head.target.label,
                fix=f"wait for it to finish, then run `vcluster {self._command}` again",
            )
        raise VclusterError(
            f"could not take the cluster lock {lock_path(self._cluster)} (exit {status})",
            where=self._head.target.label,
            fix="check that `flock` (util-linux) is installed on the head",
        )

    def __exit__(self, *exc: object) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
