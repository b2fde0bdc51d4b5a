"""SSH connections on paramiko: strict host keys, jump hosts, argv-only commands with timeouts.

One `SshConnection` per host per run; every command of the run (and, later, the Docker API)
goes over it as a new channel. Every expected failure becomes an `SshError` that names the
host, says what failed and how to fix it.
"""

from __future__ import annotations

import logging
import select
import shlex
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from cluster.errors import VclusterError
from cluster.progress import ByteSource

log = logging.getLogger(__name__)

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
_READ_CHUNK = 1 << 16
NO_EXIT_STATUS = -1
"""`CommandResult.exit_code` of a command that ended without one (killed by a signal)."""
_TRANSPORT_TEARDOWN_S = 0.1
"""paramiko closes a dead connection's channels just before it marks the transport inactive."""
_AEAD_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


@dataclass(frozen=True)
class SshTimeouts:
    """Named, overridable timeouts in seconds."""

    connect: float = 10.0
    command: float = 120.0


@dataclass(frozen=True)
class SshTarget:
    """Everything needed to reach one host. `name` is what messages call it."""

    name: str
    host: str
    port: int = 22
    user: str = "root"
    key_file: Path | None = None
    known_hosts: Path | None = None
    trust_on_first_use: bool = False
    jump: SshTarget | None = None

    @property
    def label(self) -> str:
        """`name (user@host:port)` for messages."""
        where = f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")
        return where if self.name in (self.host, where) else f"{self.name} ({where})"

    @property
    def known_hosts_path(self) -> Path:
        return (self.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()


@dataclass(frozen=True)
class CommandResult:
    """What a remote command did. `argv` is kept for messages; it never holds secrets."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class SshError(VclusterError):
    """An expected SSH failure on one host."""


class HostUnreachable(SshError):
    pass


class AuthenticationFailed(SshError):
    pass


class HostKeyUnknown(SshError):
    pass


class HostKeyChanged(SshError):
    pass


class CommandTimeout(SshError):
    pass


class CommandFailed(SshError):
    """A command exited non-zero where success was required."""

    def __init__(self, target: SshTarget, result: CommandResult, fix: str | None = None):
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        if result.exit_code == NO_EXIT_STATUS:
            ended = "ended without an exit status (killed by a signal?)"
        else:
            ended = f"exited {result.exit_code}"
        super().__init__(
            f"`{_describe(result.argv)}` {ended}: {tail[0][:300]}",
            where=target.label,
            fix=fix,
        )
        self.result = result


def _describe(argv: Sequence[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= 80 else text[:77] + "..."


class _KnownHostsWriter:
    """Appends first-seen host keys to a known_hosts file, one writer at a time per process."""

    _lock = threading.Lock()

    @classmethod
    def append(cls, path: Path, hostname: str, key: paramiko.PKey) -> None:
        entry = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with cls._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.write(entry)


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Accept and record a key never seen before. A CHANGED key never reaches this policy:
    paramiko raises BadHostKeyException for it before asking."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        log.warning(
            "trusting new host key for %s (%s), recorded in %s", hostname, key.get_name(), self.path
        )
        _KnownHostsWriter.append(self.path, hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise _UnknownKey(hostname, key)


class _UnknownKey(Exception):
    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(hostname)
        self.hostname = hostname
        self.key = key


class SshConnection:
    """An open SSH connection to one host; run argv commands over it."""

    def __init__(
        self,
        target: SshTarget,
        client: paramiko.SSHClient,
        hops: list[SshConnection],
        timeouts: SshTimeouts,
    ):
        self.target = target
        self.timeouts = timeouts
        self._client = client
        self._hops = hops

    @property
    def transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise HostUnreachable(
                "the SSH connection was lost",
                where=self.target.label,
                fix="check the host is up and run again",
            )
        return transport

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        stdin: bytes | ByteSource | None = None,
        check: bool = False,
        fix: str | None = None,
    ) -> CommandResult:
        """Run `argv` (quoted with shlex, never pasted into a shell string) and collect its output.

        `stdin` may be bytes or a binary file object streamed to the command (e.g. an image
        into `docker load`); secrets go there, never into argv. Input the command exits without
        reading is dropped, as with OpenSSH. With `check`, a non-zero exit raises
        `CommandFailed` carrying `fix`.
        """
        if not argv:
            raise ValueError("argv must not be empty")
        limit = self.timeouts.command if timeout is None else timeout
        started = time.monotonic()
        channel = self.transport.open_session()
        try:
            channel.exec_command(shlex.join(argv))
            writer = _start_stdin_writer(channel, stdin)
            stdout, stderr = _drain(channel, deadline=started + limit)
            if stdout is None:
                raise CommandTimeout(
                    f"`{_describe(argv)}` did not finish within {limit:g}s",
                    where=self.target.label,
                    fix="raise the command timeout (ssh.command_timeout) or check the host's load",
                )
            exit_code = channel.recv_exit_status()
        finally:
            channel.close()  # also ends a writer still blocked on a command that stopped reading
        if writer is not None:
            writer.join()
            if writer.error is not None:
                raise SshError(
                    f"reading the input for `{_describe(argv)}` failed: {writer.error}",
                    where=self.target.label,
                )
        if exit_code == NO_EXIT_STATUS and self._connection_lost():
            raise HostUnreachable(
                f"the SSH connection was lost while `{_describe(argv)}` ran",
                where=self.target.label,
                fix="check that the host and its sshd are up, then run again",
            )
        result = CommandResult(
            tuple(argv), exit_code, stdout, stderr or "", time.monotonic() - started
        )
        log.debug(
            "%s: `%s` -> %d in %.2fs",
            self.target.name,
            _describe(argv),
            exit_code,
            result.duration_s,
        )
        if check and not result.ok:
            raise CommandFailed(self.target, result, fix)
        return result

    def _connection_lost(self) -> bool:
        """Whether the connection died, as opposed to the command ending without a status."""
        transport = self._client.get_transport()
        if transport is None:
            return True
        transport.join(_TRANSPORT_TEARDOWN_S)  # at once when its thread has already ended
        return not transport.is_active()

    def open_channel(self, argv: Sequence[str]) -> paramiko.Channel:
        """A channel running `argv`, for callers that speak a protocol over it (e.g. Docker)."""
        channel = self.transport.open_session()
        channel.exec_command(shlex.join(argv))
        return channel

    def interactive_channel(
        self, argv: Sequence[str], *, term: str, width: int, height: int
    ) -> paramiko.Channel:
        """A channel with a PTY running `argv`, for interactive sessions."""
        channel = self.transport.open_session()
        channel.get_pty(term=term, width=width, height=height)
        channel.exec_command(shlex.join(argv))
        return channel

    def close(self) -> None:
        self._client.close()
        for hop in self._hops:
            hop.close()

    def __enter__(self) -> SshConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _StdinWriter:
    thread: threading.Thread
    error: BaseException | None = field(default=None)

    def join(self) -> None:
        self.thread.join()


def _start_stdin_writer(
    channel: paramiko.Channel, stdin: bytes | ByteSource | None
) -> _StdinWriter | None:
    if stdin is None:
        channel.shutdown_write()
        return None
    state = _StdinWriter(thread=threading.Thread(daemon=True))

    def pump() -> None:
        try:
            for chunk in _input_chunks(stdin):
                channel.sendall(chunk)
            channel.shutdown_write()
        except _InputUnreadable as unreadable:
            state.error = unreadable.__cause__
            channel.close()  # stop the command: part of its input must not pass for all of it
        except (OSError, EOFError):
            pass  # the channel closed: the command exited, timed out or lost its connection

    state.thread = threading.Thread(target=pump, daemon=True, name="ssh-stdin")
    state.thread.start()
    return state


class _InputUnreadable(Exception):
    pass


def _input_chunks(stdin: bytes | ByteSource) -> Iterator[bytes]:
    if isinstance(stdin, bytes):
        yield stdin
        return
    while True:
        try:
            chunk = stdin.read(_READ_CHUNK * 16)
        except OSError as exc:
            raise _InputUnreadable() from exc
        if not chunk:
            return
        yield chunk


def _drain(channel: paramiko.Channel, *, deadline: float) -> tuple[str | None, str | None]:
    """Read stdout and stderr until the command exits; (None, None) on deadline."""
    out, err = bytearray(), bytearray()
    while True:
        while channel.recv_ready():
            out += channel.recv(_READ_CHUNK)
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(_READ_CHUNK)
        finished = channel.exit_status_ready() and (channel.eof_received or channel.closed)
        if finished and not channel.recv_ready() and not channel.recv_stderr_ready():
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, None
        if channel.eof_received:
            # No data follows EOF, and the channel's fileno stays readable from EOF on: selecting
            # on it would spin until the exit status arrives, so wait for that instead.
            channel.status_event.wait(min(remaining, 1.0))
        else:
            # the channel's fileno becomes readable on data on either stream, EOF or close
            select.select([channel], [], [], min(remaining, 1.0))
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def connect(target: SshTarget, timeouts: SshTimeouts = SshTimeouts()) -> SshConnection:
    """Open an authenticated connection to `target` (through its jump host, if any)."""
    hops: list[SshConnection] = []
    sock: paramiko.Channel | None = None
    try:
        if target.jump is not None:
            jump = connect(target.jump, timeouts)
            hops.append(jump)
            sock = _tunnel(jump, target, timeouts)
        client = _authenticated_client(target, timeouts, sock)
    except BaseException:
        for hop in hops:
            hop.close()
        raise
    return SshConnection(target, client, hops, timeouts)


def _tunnel(jump: SshConnection, target: SshTarget, timeouts: SshTimeouts) -> paramiko.Channel:
    try:
        return jump.transport.open_channel(
            "direct-tcpip", (target.host, target.port), ("127.0.0.1", 0), timeout=timeouts.connect
        )
    except (paramiko.ChannelException, paramiko.SSHException, OSError) as exc:
        raise HostUnreachable(
            f"jump host {jump.target.label} could not reach {target.host}:{target.port}: {exc}",
            where=target.label,
            fix="check the address and that the jump host allows TCP forwarding (AllowTcpForwarding)",
        ) from None


def _authenticated_client(
    target: SshTarget, timeouts: SshTimeouts, sock: paramiko.Channel | None
) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    known_hosts = target.known_hosts_path
    if known_hosts.exists():
        try:
            client.load_host_keys(str(known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyUnknown(
                f"cannot read known_hosts {known_hosts}: {exc}",
                where=target.label,
                fix="fix or recreate that file",
            ) from None
    if target.trust_on_first_use:
        client.set_missing_host_key_policy(_TrustOnFirstUse(known_hosts))
    else:
        client.set_missing_host_key_policy(_RejectUnknown())
    try:
        client.connect(
            target.host,
            port=target.port,
            username=target.user,
            key_filename=str(target.key_file.expanduser()) if target.key_file else None,
            look_for_keys=target.key_file is None,
            allow_agent=True,
            timeout=timeouts.connect,
            banner_timeout=timeouts.connect,
            auth_timeout=timeouts.connect,
            channel_timeout=timeouts.connect,
            sock=sock,
            transport_factory=_tuned_transport,
        )
    except BaseException as exc:
        client.close()
        raise _translate_connect_error(exc, target) from None
    return client


def _tuned_transport(
    sock: str | tuple[str, int] | socket.socket | paramiko.Channel | paramiko.ProxyCommand,
    **options: Any,  # what `SSHClient.connect` passes on, which differs across paramiko versions
) -> paramiko.Transport:
    """A paramiko transport with TCP_NODELAY that offers AES-GCM first.

    Without TCP_NODELAY (paramiko leaves Nagle on, OpenSSH turns it off) a command's small
    packets wait for the delayed ACK: about 40 ms per command instead of a round trip.
    AES-GCM (OpenSSH has it since 6.2) costs the controller about 30% less CPU per streamed
    byte than paramiko's default, AES-CTR plus a separate HMAC: it shows when an image goes to
    many nodes at once. Servers without GCM still negotiate the rest of the list.
    """
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock, **options)
    security = transport.get_security_options()
    offered = tuple(security.ciphers)  # GCM is there from paramiko 3.5 on
    security.ciphers = tuple(sorted(offered, key=lambda name: name not in _AEAD_CIPHERS))
    return transport


def _translate_connect_error(exc: BaseException, target: SshTarget) -> BaseException:
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        # paramiko folds "refused" and "no route" for each of the host's addresses into this
        exc = next(iter(exc.errors.values()))
    where = target.label
    known_hosts = target.known_hosts_path
    host_entry = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    if isinstance(exc, _UnknownKey):
        return HostKeyUnknown(
            f"host key ({exc.key.get_name()}) is not in {known_hosts}",
            where=where,
            fix=f"verify it and add it (ssh-keyscan -p {target.port} {target.host} >> {known_hosts}), "
            "or set ssh.trust_on_first_use: true",
        )
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyChanged(
            f"HOST KEY CHANGED: the server's {exc.key.get_name()} key does not match {known_hosts} "
            "(a reinstalled host, or someone intercepting the connection)",
            where=where,
            fix=f"if the change is expected: ssh-keygen -f {known_hosts} -R '{host_entry}', then add the new key",
        )
    if isinstance(exc, paramiko.AuthenticationException):
        key = target.key_file or "the agent's and default keys"
        return AuthenticationFailed(
            f"authentication failed for user {target.user} with {key}",
            where=where,
            fix=f"check ssh.user and ssh.key_file, and that the key is in {target.user}'s authorized_keys",
        )
    if isinstance(exc, paramiko.PasswordRequiredException):
        return AuthenticationFailed(
            f"the key {target.key_file} is encrypted",
            where=where,
            fix="load it into ssh-agent (ssh-add) and run again",
        )
    if isinstance(exc, socket.timeout | TimeoutError):
        return HostUnreachable(
            f"no answer on port {target.port} (timed out)",
            where=where,
            fix="check the address, that the host is up, and firewalls; or raise ssh.connect_timeout",
        )
    if isinstance(exc, ConnectionRefusedError):
        return HostUnreachable(
            f"connection refused on port {target.port}",
            where=where,
            fix="start sshd there or fix ssh.port",
        )
    if isinstance(exc, socket.gaierror):
        return HostUnreachable(
            f"cannot resolve {target.host}: {exc.strerror}", where=where, fix="fix the address"
        )
    if isinstance(exc, OSError):
        return HostUnreachable(
            f"cannot connect to port {target.port}: {exc.strerror or exc}",
            where=where,
            fix="check the address, that the host is up, and the network",
        )
    if isinstance(exc, paramiko.SSHException | EOFError):
        return SshError(
            f"SSH handshake failed: {exc}",
            where=where,
            fix=f"check that port {target.port} is an sshd",
        )
    if isinstance(exc, VclusterError):
        return exc
    return exc
