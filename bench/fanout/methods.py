"""The three ways of running one command on every host that the benchmark compares.

Each method opens its connections (`connect`), runs one command per host over them (`run`)
and closes them (`close`); `cpu_seconds` is the controller CPU it has used so far, so a phase
costs the difference of two readings.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from cluster.nodes.transport.fanout import fan_out
from cluster.nodes.transport.ssh import SshConnection, SshTarget, SshTimeouts, connect
from tests.support.ssh_lab import LabHost, SshLab

OPENSSH_TIMEOUT_S = 300.0
"""How long one OpenSSH step (all hosts) may take before the benchmark gives up."""
MASTER_EXIT_TIMEOUT_S = 10.0
"""How long the ControlMaster processes may take to exit after `ssh -O exit`."""
POLL_INTERVAL_S = 0.02

# `%n` is the host name as given (node01...). A ControlPath must fit a Unix socket path
# (108 bytes), so the sockets live in a short directory under /tmp, not in the lab's workdir.
CONTROL_PATH_TEMPLATE = "{directory}/%n"
CONTROL_DIR_PREFIX = "vcb-"


class BenchError(RuntimeError):
    """A method did not do what the benchmark asked; the message says which and why."""


class Method(Protocol):
    """One way of running a command on every host."""

    label: str

    def connect(self) -> None: ...

    def run(self, argv_by_host: Mapping[str, Sequence[str]]) -> list[str]:
        """Run each host's argv on it at once (or in turn); return every line of output."""
        ...

    def close(self) -> None: ...

    def cpu_seconds(self) -> float: ...


def _children_cpu_seconds() -> float:
    """CPU of every child process this process has waited for (and of their waited children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _process_cpu_seconds(pid: int) -> float:
    """CPU time of a live process, to the nanosecond (the first field of /proc/PID/schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (FileNotFoundError, ProcessLookupError):
        raise BenchError(f"ControlMaster process {pid} has exited") from None


def _pids_whose_command_line_contains(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, UnicodeDecodeError):
            continue
        if text in command_line:
            found.append(int(entry.name))
    return found


def _check_plain(argv: Sequence[str]) -> None:
    """xargs splits lines on blanks and OpenSSH joins argv with spaces: keep words plain."""
    for word in argv:
        if not re.fullmatch(r"[A-Za-z0-9_./=:-]+", word):
            raise ValueError(f"benchmark commands must be plain words, got {word!r}")


class OpenSsh:
    """The OpenSSH client with one ControlMaster per host, run serially or through `xargs -P`.

    Connecting starts the masters (`ssh -f -N -o ControlMaster=yes`, which returns once the
    master is authenticated and in the background); every command then goes through its host's
    master. Controller CPU is that of the `ssh` and `xargs` processes this process waited for
    plus that of the masters, which run on in the background.
    """

    def __init__(self, lab: SshLab, hosts: Sequence[LabHost], *, parallel: bool) -> None:
        self.lab = lab
        self.hosts = list(hosts)
        self.parallel = parallel
        self.label = "parallel OpenSSH" if parallel else "serial OpenSSH"
        self._control_dir: Path | None = None
        self._masters: list[int] = []

    def _ssh(self, *options: str) -> list[str]:
        assert self._control_dir is not None
        control_path = CONTROL_PATH_TEMPLATE.format(directory=self._control_dir)
        return [
            "ssh",
            "-F",
            str(self.lab.ssh_config),
            "-o",
            f"ControlPath={control_path}",
            *options,
        ]

    def _on_every_host(self, ssh_argv: Sequence[str], lines: Sequence[str]) -> str:
        """Run `ssh_argv + line.split()` once per line, all at once or one after another."""
        if self.parallel:
            return self._checked(
                ["xargs", "-P", str(len(lines)), "-L", "1", *ssh_argv], "\n".join(lines) + "\n"
            )
        return "".join(self._checked([*ssh_argv, *line.split()], None) for line in lines)

    def _checked(self, argv: Sequence[str], input_text: str | None) -> str:
        result = subprocess.run(
            list(argv),
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=OPENSSH_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise BenchError(
                f"{self.label}: `{shlex.join(argv)}` exited {result.returncode}: "
                f"{result.stderr.strip()[-500:]}"
            )
        return result.stdout

    def connect(self) -> None:
        self._control_dir = Path(tempfile.mkdtemp(prefix=CONTROL_DIR_PREFIX, dir="/tmp"))
        master = self._ssh("-o", "ControlMaster=yes", "-o", "ControlPersist=yes", "-f", "-N")
        self._on_every_host(master, [host.name for host in self.hosts])

    def _find_masters(self) -> list[int]:
        assert self._control_dir is not None
        masters = _pids_whose_command_line_contains(f"ControlPath={self._control_dir}/")
        if len(masters) != len(self.hosts):
            raise BenchError(
                f"{self.label}: {len(masters)} ControlMaster processes for {len(self.hosts)} hosts"
            )
        return masters

    def run(self, argv_by_host: Mapping[str, Sequence[str]]) -> list[str]:
        for argv in argv_by_host.values():
            _check_plain(argv)
        # Without public key authentication a command that missed its master would fail rather
        # than quietly open a connection of its own and skew the timing.
        client = self._ssh("-o", "ControlMaster=no", "-o", "PubkeyAuthentication=no")
        lines = [f"{host} {' '.join(argv)}" for host, argv in argv_by_host.items()]
        return self._on_every_host(client, lines).splitlines()

    def close(self) -> None:
        if self._control_dir is None:
            return
        masters = self._masters or _pids_whose_command_line_contains(
            f"ControlPath={self._control_dir}/"
        )
        try:
            subprocess.run(
                ["xargs", "-P", str(len(self.hosts)), "-n", "1", *self._ssh("-O", "exit")],
                input="\n".join(host.name for host in self.hosts) + "\n",
                capture_output=True,
                text=True,
                timeout=OPENSSH_TIMEOUT_S,
                check=False,
            )
            _wait_until_gone(masters, MASTER_EXIT_TIMEOUT_S)
        finally:
            shutil.rmtree(self._control_dir, ignore_errors=True)
            self._control_dir = None
            self._masters = []

    def cpu_seconds(self) -> float:
        total = _children_cpu_seconds()
        if self._control_dir is not None and not self._masters:
            self._masters = self._find_masters()
        return total + sum(_process_cpu_seconds(pid) for pid in self._masters)


def _wait_until_gone(pids: Sequence[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    remaining = list(pids)
    while remaining:
        remaining = [pid for pid in remaining if Path(f"/proc/{pid}").exists()]
        if remaining and time.monotonic() > deadline:
            raise BenchError(f"ControlMaster processes {remaining} still run after `ssh -O exit`")
        time.sleep(POLL_INTERVAL_S)


class VclusterFanOut:
    """vcluster's transport: paramiko connections opened and used through `fan_out`.

    Controller CPU is this process's own CPU time: paramiko runs in its threads.
    """

    label = "vcluster fan-out"

    def __init__(
        self, lab: SshLab, hosts: Sequence[LabHost], timeouts: SshTimeouts | None = None
    ) -> None:
        self.targets = [
            SshTarget(
                name=host.name,
                host=host.address,
                port=host.port,
                key_file=lab.client_key,
                known_hosts=lab.known_hosts,
            )
            for host in hosts
        ]
        self.timeouts = timeouts or SshTimeouts()
        self._connections: list[SshConnection] = []

    def connect(self) -> None:
        opened = fan_out(
            self.targets, lambda target: connect(target, self.timeouts), name=_target_name
        )
        self._connections = list(opened.succeeded.values())
        opened.raise_if_failed("connecting")

    def run(self, argv_by_host: Mapping[str, Sequence[str]]) -> list[str]:
        results = fan_out(
            self._connections,
            lambda connection: connection.run(argv_by_host[connection.target.name], check=True),
            name=lambda connection: connection.target.name,
        ).values()
        return [line for result in results for line in result.stdout.splitlines()]

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections = []

    def cpu_seconds(self) -> float:
        return time.process_time()


def _target_name(target: SshTarget) -> str:
    return target.name


def methods_for(lab: SshLab, hosts: Sequence[LabHost]) -> list[Method]:
    """The methods compared, in the order the table shows them."""
    return [
        OpenSsh(lab, hosts, parallel=False),
        OpenSsh(lab, hosts, parallel=True),
        VclusterFanOut(lab, hosts),
    ]


def cpu_count() -> int:
    """CPUs this process may run on (what the lab's sshds and the controller share)."""
    return len(os.sched_getaffinity(0))
