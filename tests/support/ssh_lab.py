"""A lab of real OpenSSH servers, one per network namespace, for integration tests and benchmarks.

Each host is a network namespace joined by a veth pair to a Linux bridge in the root namespace,
with its own IPv4 address, its own hostname (a UTS namespace), its own ed25519 host key and its
own ``sshd -D``; every host trusts one client key. With ``with_jump=True`` the lab also has a
host ``jump`` on the bridge and a host ``behind`` on a second bridge that lives inside the jump
namespace, so ``behind`` is reachable only through ``jump``.

Everything the lab writes lies under its workdir, except its network objects (namespaces,
links, all named ``PREFIX-TOKEN-...``) and sshd's privilege separation directory ``/run/sshd``
(created if missing, as the openssh-server package itself does). Two labs, in one process or in
two test runs, never collide: each claims its token and its subnets through abstract Unix
sockets held for its lifetime (released by the kernel when the process dies, so
``cleanup_stale`` can tell a crashed run's leftovers from a live lab's objects). See
docs/testing.md.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
PRIVILEGE_SEPARATION_DIR = Path("/run/sshd")
SSH_PORT = 22

DEFAULT_PREFIX = "vcl"
DEFAULT_START_TIMEOUT_S = 30.0
"""How long every sshd of a lab may take to accept TCP connections."""
DEFAULT_STOP_TIMEOUT_S = 5.0
"""How long a process may take to exit after SIGTERM before it gets SIGKILL."""
POLL_INTERVAL_S = 0.02
CONNECT_PROBE_TIMEOUT_S = 0.5

FIRST_HOST_OFFSET = 10
"""Plain hosts get .10, .11, ...; .1 is the bridge, .2 the jump host, .254 is never used."""
MAX_HOSTS = 240
JUMP_OFFSET = 2
BEHIND_OFFSET = 10
UNUSED_OFFSET = 254

PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,4}$")
TOKEN_LENGTH = 4
CLAIM_NAMESPACE = "vcluster-ssh-lab"
JUMP_NAME = "jump"
BEHIND_NAME = "behind"
INNER_BRIDGE = "behind-br"
"""The second bridge, inside the jump namespace (its names are private to that namespace)."""


class LabError(RuntimeError):
    """The lab could not be built, started or taken down; the message says which step and why."""


@dataclass(frozen=True)
class LabHost:
    """One host of the lab: a network namespace running its own sshd."""

    name: str
    namespace: str
    address: str
    host_key_path: Path
    port: int = SSH_PORT
    jump: str | None = None
    """Name of the host to jump through, or None when reachable from the root namespace."""
    sshd_config: Path | None = None
    sshd_log: Path | None = None


def _candidate_subnets() -> Iterator[ipaddress.IPv4Network]:
    for second in range(231, 255):
        for third in range(256):
            yield ipaddress.IPv4Network(f"10.{second}.{third}.0/24")


def _run(argv: Sequence[str], *, input_text: str | None = None, check: bool = True) -> str:
    """Run argv, return stdout; raise LabError naming the command and its stderr on failure."""
    result = subprocess.run(
        list(argv), input=input_text, capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def _ip_batch(
    commands: Sequence[str], *, namespace: str | None = None, force: bool = False
) -> None:
    """Run many `ip` commands in one process (`ip -batch -`), optionally inside a namespace."""
    if not commands:
        return
    argv = ["ip"]
    if namespace is not None:
        argv += ["-n", namespace]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    _run(argv, input_text="\n".join(commands) + "\n", check=not force)


def _json_or_empty(text: str) -> list[dict]:
    return json.loads(text) if text.strip() else []


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on the machine."""
    return [entry["name"] for entry in _json_or_empty(_run(["ip", "-j", "netns", "list"]))]


def list_links() -> list[str]:
    """Names of all links in the root network namespace."""
    return [entry["ifname"] for entry in _json_or_empty(_run(["ip", "-j", "link", "show"]))]


def used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address in or a route to (defaults aside)."""
    networks = []
    for entry in _json_or_empty(_run(["ip", "-j", "-4", "addr", "show"])):
        for info in entry.get("addr_info", []):
            if info.get("family") == "inet":
                interface = f"{info['local']}/{info['prefixlen']}"
                networks.append(ipaddress.IPv4Interface(interface).network)
    for route in _json_or_empty(_run(["ip", "-j", "-4", "route", "show", "table", "all"])):
        destination = route.get("dst", "default")
        if destination != "default":
            networks.append(ipaddress.IPv4Network(destination, strict=False))
    return networks


def _claim(name: str) -> socket.socket | None:
    """Take a machine-wide claim on name, or None when a live process holds it.

    The claim is an abstract Unix socket: binding is atomic, nothing is written to disk, and the
    kernel releases it when the holder dies.
    """
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0{CLAIM_NAMESPACE}:{name}")
    except OSError as error:
        claim.close()
        if error.errno == errno.EADDRINUSE:
            return None
        raise
    return claim


def _is_alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie has left its namespaces: it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _namespace_pids(namespace: str) -> list[int]:
    output = _run(["ip", "netns", "pids", namespace], check=False)
    return [int(pid) for pid in output.split()]


def _end_processes(pids: Sequence[int], timeout_s: float) -> None:
    """SIGTERM each pid, wait for all to exit within timeout_s, then SIGKILL the rest."""
    for pid in pids:
        _send_signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    remaining = [pid for pid in pids if _is_alive(pid)]
    while remaining and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        remaining = [pid for pid in remaining if _is_alive(pid)]
    for pid in remaining:
        _send_signal(pid, signal.SIGKILL)


def _send_signal(pid: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal_number)


def _remove_lab_objects(base: str, stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> list[str]:
    """End every process in the lab's namespaces, delete them and its links; return leftovers."""
    mine = f"{base}-"
    namespaces = [name for name in list_namespaces() if name.startswith(mine)]
    pids = [pid for namespace in namespaces for pid in _namespace_pids(namespace)]
    _end_processes(pids, stop_timeout_s)
    _ip_batch([f"netns del {namespace}" for namespace in namespaces], force=True)
    # Deleting a namespace destroys the veth ends inside it, and with them their root-side
    # peers; what remains (a partial start, a process that kept a namespace alive) goes here.
    links = [name for name in list_links() if name.startswith(mine)]
    veths_first = sorted(links, key=lambda name: name.endswith("-br"))
    _ip_batch([f"link del {link}" for link in veths_first], force=True)
    return [name for name in list_namespaces() + list_links() if name.startswith(mine)]


def _lab_bases(prefix: str) -> set[str]:
    """The `PREFIX-TOKEN` bases of every namespace or link that looks like a lab's."""
    bases = set()
    for name in list_namespaces() + list_links():
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == prefix and len(parts[1]) == TOKEN_LENGTH:
            bases.add(f"{parts[0]}-{parts[1]}")
    return bases


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove what crashed labs with this prefix left behind; return the bases removed.

    A lab is stale when no live process holds its claim, so a lab running in another test
    session is never touched.
    """
    removed = []
    for base in sorted(_lab_bases(prefix)):
        claim = _claim(base)
        if claim is None:
            continue
        try:
            leftovers = _remove_lab_objects(base)
        finally:
            claim.close()
        if leftovers:
            raise LabError(f"could not remove stale lab {base}: {', '.join(leftovers)} remain")
        log.info("ssh lab: removed stale lab %s", base)
        removed.append(base)
    return removed


def _generate_key(path: Path, comment: str) -> None:
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _public_key(private_key: Path) -> str:
    """The `TYPE BASE64` part of a public key, without its comment."""
    kind, blob = private_key.with_name(private_key.name + ".pub").read_text().split()[:2]
    return f"{kind} {blob}"


def _tcp_accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=CONNECT_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _listens_in_namespace_of(pid: int, address: str, port: int) -> bool:
    """Whether pid's network namespace has a TCP socket listening on address:port."""
    wanted = (socket.inet_aton(address), port)
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in lines:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state != "0A":  # TCP_LISTEN
            continue
        hex_address, hex_port = local.split(":")
        # The kernel prints the address as a native-endian integer of the network-order bytes.
        packed = struct.pack("=I", int(hex_address, 16))
        if (packed, int(hex_port, 16)) == wanted:
            return True
    return False


def sshd_config_text(host: LabHost, authorized_keys: Path, pid_file: Path) -> str:
    """The sshd_config of one lab host: its address only, keys only, root allowed, no PAM."""
    return "\n".join(
        [
            f"ListenAddress {host.address}",
            f"Port {host.port}",
            f"HostKey {host.host_key_path}",
            f"AuthorizedKeysFile {authorized_keys}",
            f"PidFile {pid_file}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "StrictModes no",
            "UsePAM no",
            "UseDNS no",
            "AllowTcpForwarding yes",
            "MaxSessions 128",
            "MaxStartups 256",
            "PrintMotd no",
            "PrintLastLog no",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


class SshLab:
    """Hosts in network namespaces, each running a real sshd; a context manager.

    ``hosts`` plain hosts are named ``node01``, ``node02``, ...; ``with_jump`` adds ``jump`` and
    ``behind`` (reachable only through ``jump``). All are in ``self.hosts``.
    """

    def __init__(
        self,
        workdir: Path,
        hosts: int,
        prefix: str = DEFAULT_PREFIX,
        *,
        with_jump: bool = False,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
    ) -> None:
        if not PREFIX_PATTERN.match(prefix):
            raise ValueError(f"prefix {prefix!r} must be 1-5 of [a-z0-9], starting with a letter")
        if not 0 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be between 0 and {MAX_HOSTS}, got {hosts}")
        if hosts == 0 and not with_jump:
            raise ValueError("a lab needs at least one host")
        self.workdir = Path(workdir).resolve()
        self.prefix = prefix
        self.with_jump = with_jump
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.hosts: list[LabHost] = []
        self._claims: list[socket.socket] = []
        self._sshd: dict[str, subprocess.Popen] = {}
        self._wrong_client_key: Path | None = None
        self._closed = False
        self.base = ""
        try:
            self._start(hosts)
        except BaseException:
            self.close()
            raise

    # -- the files every host and client shares -------------------------------------------------

    @property
    def client_key(self) -> Path:
        """The private key every host trusts (its public half is `client_key.pub`)."""
        return self.workdir / "client_key"

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file listing every host's key by address."""
        return self.workdir / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self.workdir / "authorized_keys"

    @property
    def ssh_config(self) -> Path:
        """An ssh_config for `ssh -F`: lab key, lab known_hosts, strict, hosts by name."""
        return self.workdir / "ssh_config"

    @property
    def bridge(self) -> str:
        return f"{self.base}-br"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the lab bridge: where the hosts see us come from."""
        return str(self.subnet.network_address + 1)

    # -- bring-up --------------------------------------------------------------------------------

    def _start(self, plain_hosts: int) -> None:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "hosts").mkdir(exist_ok=True)
        self._claim_base()
        self.subnet = self._claim_subnet()
        self.behind_subnet = self._claim_subnet() if self.with_jump else None
        self.hosts = self._plan_hosts(plain_hosts)
        self._create_network()
        _generate_key(self.client_key, f"{self.base}-client")
        self.authorized_keys.write_text(_public_key(self.client_key) + "\n")
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(self._prepare_host, self.hosts))
        self.rewrite_known_hosts()
        self._write_ssh_config()
        PRIVILEGE_SEPARATION_DIR.mkdir(mode=0o755, exist_ok=True)
        for host in self.hosts:
            self._spawn_sshd(host)
        self._wait_until_accepting(self.hosts)
        log.info(
            "ssh lab %s: %d hosts on %s up in %.2f s",
            self.base,
            len(self.hosts),
            self.subnet,
            time.monotonic() - started,
        )

    def _claim_base(self) -> None:
        existing = set(list_namespaces()) | set(list_links())
        for _ in range(100):
            base = f"{self.prefix}-{secrets.token_hex(TOKEN_LENGTH // 2)}"
            if any(name.startswith(f"{base}-") for name in existing):
                continue
            claim = _claim(base)
            if claim is not None:
                self._claims.append(claim)
                self.base = base
                return
        raise LabError(f"no free lab name with prefix {self.prefix!r} after 100 tries")

    def _claim_subnet(self) -> ipaddress.IPv4Network:
        used = used_networks()
        for subnet in _candidate_subnets():
            if any(subnet.overlaps(network) for network in used):
                continue
            claim = _claim(f"subnet:{subnet}")
            if claim is None:
                continue
            self._claims.append(claim)
            return subnet
        raise LabError("no free /24 subnet in 10.231.0.0-10.254.255.0")

    def _plan_hosts(self, plain_hosts: int) -> list[LabHost]:
        hosts = [
            self._host(f"node{index + 1:02d}", self.subnet, FIRST_HOST_OFFSET + index)
            for index in range(plain_hosts)
        ]
        if self.with_jump:
            assert self.behind_subnet is not None
            hosts.append(self._host(JUMP_NAME, self.subnet, JUMP_OFFSET))
            hosts.append(self._host(BEHIND_NAME, self.behind_subnet, BEHIND_OFFSET, jump=JUMP_NAME))
        return hosts

    def _host(
        self, name: str, subnet: ipaddress.IPv4Network, offset: int, jump: str | None = None
    ) -> LabHost:
        directory = self.workdir / "hosts" / name
        return LabHost(
            name=name,
            namespace=f"{self.base}-{name}",
            address=str(subnet.network_address + offset),
            host_key_path=directory / "ssh_host_ed25519_key",
            jump=jump,
            sshd_config=directory / "sshd_config",
            sshd_log=directory / "sshd.log",
        )

    def _root_veth(self, host: LabHost) -> str:
        if host.name == JUMP_NAME:
            return f"{self.base}-j"
        return f"{self.base}-{self.hosts.index(host)}"

    def _create_network(self) -> None:
        """Bridge first (its address makes the subnet visibly taken), then namespaces and veths."""
        commands = [
            f"link add {self.bridge} type bridge",
            f"addr add {self.gateway}/{self.subnet.prefixlen} dev {self.bridge}",
            f"link set {self.bridge} up",
        ]
        for host in self.hosts:
            commands.append(f"netns add {host.namespace}")
        for host in self.hosts:
            if host.jump is not None:
                continue
            veth = self._root_veth(host)
            commands += [
                f"link add {veth} type veth peer name eth0 netns {host.namespace}",
                f"link set {veth} master {self.bridge} up",
            ]
        _ip_batch(commands)
        if self.with_jump:
            jump, behind = self.host(JUMP_NAME), self.host(BEHIND_NAME)
            assert self.behind_subnet is not None
            _ip_batch(
                [
                    f"link add {INNER_BRIDGE} type bridge",
                    f"addr add {self._jump_behind_address()}/24 dev {INNER_BRIDGE}",
                    f"link set {INNER_BRIDGE} up",
                    f"link add behind0 type veth peer name eth0 netns {behind.namespace}",
                    f"link set behind0 master {INNER_BRIDGE} up",
                ],
                namespace=jump.namespace,
            )

    def _jump_behind_address(self) -> str:
        """The jump host's own address on the behind subnet (its inner bridge)."""
        assert self.behind_subnet is not None
        return str(self.behind_subnet.network_address + 1)

    def _prepare_host(self, host: LabHost) -> None:
        """Address the host's eth0, bring it and lo up, make its host key and sshd_config."""
        _ip_batch(
            [
                "link set lo up",
                f"addr add {host.address}/24 dev eth0",
                "link set eth0 up",
            ],
            namespace=host.namespace,
        )
        host.host_key_path.parent.mkdir(parents=True, exist_ok=True)
        _generate_key(host.host_key_path, f"{host.name}-host")
        assert host.sshd_config is not None
        host.sshd_config.write_text(
            sshd_config_text(host, self.authorized_keys, host.host_key_path.parent / "sshd.pid")
        )

    def _write_ssh_config(self) -> None:
        lines = []
        for host in self.hosts:
            lines += [f"Host {host.name}", f"  HostName {host.address}"]
            if host.jump is not None:
                lines.append(f"  ProxyJump {host.jump}")
        lines += [
            "Host *",
            "  User root",
            f"  IdentityFile {self.client_key}",
            "  IdentitiesOnly yes",
            "  IdentityAgent none",
            f"  UserKnownHostsFile {self.known_hosts}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 5",
            "  LogLevel ERROR",
            "",
        ]
        self.ssh_config.write_text("\n".join(lines))

    # -- sshd ------------------------------------------------------------------------------------

    def _spawn_sshd(self, host: LabHost) -> None:
        assert host.sshd_log is not None
        with host.sshd_log.open("ab") as sshd_log:
            self._sshd[host.name] = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    host.namespace,
                    "unshare",
                    "--uts",
                    "--",
                    "/bin/sh",
                    "-c",
                    f'hostname "$1" && exec {SSHD} -D -e -f "$2"',
                    "sh",
                    host.name,
                    str(host.sshd_config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=sshd_log,
                stderr=sshd_log,
                start_new_session=True,
            )

    def _wait_until_accepting(self, hosts: Sequence[LabHost]) -> None:
        """Poll until each host's sshd accepts TCP (or, behind a jump, listens); deadline-bound."""
        deadline = time.monotonic() + self.start_timeout_s
        waiting = list(hosts)
        while waiting:
            for host in list(waiting):
                process = self._sshd[host.name]
                if process.poll() is not None:
                    raise LabError(
                        f"sshd of {host.name} exited {process.returncode}: {self._log_tail(host)}"
                    )
                if host.jump is None:
                    ready = _tcp_accepts(host.address, host.port)
                else:
                    ready = _listens_in_namespace_of(process.pid, host.address, host.port)
                if ready:
                    waiting.remove(host)
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(host.name for host in waiting)
                raise LabError(
                    f"sshd of {names} not accepting connections after {self.start_timeout_s} s"
                )
            time.sleep(POLL_INTERVAL_S)

    def _log_tail(self, host: LabHost, lines: int = 5) -> str:
        assert host.sshd_log is not None
        try:
            return " | ".join(host.sshd_log.read_text().strip().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop_sshd(self, host: LabHost | str) -> None:
        """Stop the host's listening sshd; sessions already open carry on, as on a real host."""
        host = self._resolve(host)
        process = self._sshd.pop(host.name, None)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def start_sshd(self, host: LabHost | str) -> None:
        """Start the host's sshd again (a no-op if it runs) and wait until it accepts."""
        host = self._resolve(host)
        process = self._sshd.get(host.name)
        if process is not None and process.poll() is None:
            return
        self._spawn_sshd(host)
        self._wait_until_accepting([host])

    def regenerate_host_key(self, host: LabHost | str) -> None:
        """Give the host a new host key and restart its sshd; known_hosts is now wrong for it."""
        host = self._resolve(host)
        self.stop_sshd(host)
        _generate_key(host.host_key_path, f"{host.name}-host")
        self.start_sshd(host)

    def rewrite_known_hosts(self) -> None:
        """Write known_hosts from the hosts' current keys (undoes regenerate_host_key's effect)."""
        lines = [f"{host.address} {_public_key(host.host_key_path)}" for host in self.hosts]
        self.known_hosts.write_text("\n".join(lines) + "\n")

    # -- for tests -------------------------------------------------------------------------------

    def host(self, name: str) -> LabHost:
        """The host with this name."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no host {name!r} in lab {self.base}")

    def _resolve(self, host: LabHost | str) -> LabHost:
        return self.host(host) if isinstance(host, str) else self.host(host.name)

    def unused_address(self) -> str:
        """An address on the lab subnet (routed from here) that no host answers."""
        return str(self.subnet.network_address + UNUSED_OFFSET)

    def wrong_client_key(self) -> Path:
        """A private key no host trusts."""
        if self._wrong_client_key is None:
            path = self.workdir / "wrong_client_key"
            _generate_key(path, f"{self.base}-untrusted")
            self._wrong_client_key = path
        return self._wrong_client_key

    def ssh_command(self, host: LabHost | str, *remote: str) -> list[str]:
        """argv for the OpenSSH client to run `remote` on host (through the jump when needed)."""
        host = self._resolve(host)
        return ["ssh", "-F", str(self.ssh_config), host.name, *remote]

    # -- take-down -------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every sshd and session, delete namespaces, veths and bridges; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for name in list(self._sshd):
                self.stop_sshd(name)
            leftovers = _remove_lab_objects(self.base, self.stop_timeout_s) if self.base else []
        finally:
            for claim in self._claims:
                claim.close()
            self._claims.clear()
        if leftovers:
            raise LabError(f"lab {self.base}: could not remove {', '.join(leftovers)}")

    def __enter__(self) -> SshLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SshLab({self.base!r}, {len(self.hosts)} hosts on {getattr(self, 'subnet', None)})"
