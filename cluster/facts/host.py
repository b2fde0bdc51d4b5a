"""Host facts: what one run of the probe (`cluster.facts.probe`) found on a host, typed.

`parse_probe` never raises: a missing tool, a failing command or a cut-off output leaves the
fact unknown (None) with the reason in a `problem` field, for the checks to report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cluster.facts.fabric import FabricFacts, parse_fabric
from cluster.facts.gpu import (
    CommandOutput,
    GpuFacts,
    GpuInfo,
    GpuProblemKind,
    gpu_problem,
    parse_gpu_facts,
)
from cluster.facts.probe import ProbeOutput, Section, probe_argv, split_sections

__all__ = [
    "DiskSpace",
    "DockerFacts",
    "HostFacts",
    "RouteToHead",
    "parse_probe",
    "probe_argv",
]

_Number = TypeVar("_Number", int, float)


@dataclass(frozen=True)
class DockerFacts:
    """The Docker engine: its version and runtimes, or why it could not be asked."""

    server_version: str | None = None
    runtimes: tuple[str, ...] = ()
    nvidia_hooks: tuple[str, ...] = ()
    """The NVIDIA container toolkit's programs found on the PATH (what `--gpus` needs)."""
    problem: str | None = None

    @property
    def reachable(self) -> bool:
        """The daemon answered."""
        return self.server_version is not None


@dataclass(frozen=True)
class DiskSpace:
    """A file system as `df -Pk PATH` reports it."""

    mount_point: str
    size_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class RouteToHead:
    """How this host reaches the head: the interface and source address, or why unknown.

    On the head itself the kernel routes through `lo`; the interface is then the one that
    holds the head's address, which is what NCCL and Gloo must use.
    """

    interface: str | None = None
    source_address: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class HostFacts:
    """Everything one probe found on a host; None where a fact is unknown."""

    hostname: str | None = None
    clock_s: float | None = None
    """The host's clock (seconds since the epoch) when the probe started."""
    cpu_count: int | None = None
    memory_bytes: int | None = None
    gpu: GpuFacts = field(default_factory=GpuFacts)
    docker: DockerFacts = DockerFacts()
    shm: DiskSpace | None = None
    cache_disk: DiskSpace | None = None
    """The file system holding the model cache (or its nearest existing parent)."""
    route: RouteToHead = RouteToHead()
    listening_ports: frozenset[int] = frozenset()
    fabric: FabricFacts = field(default_factory=FabricFacts)
    """NVLink multicast, the NVSwitch fabric, InfiniBand/RoCE HCAs, GPUDirect RDMA."""
    problems: tuple[str, ...] = field(default=())
    """What the probe could not learn that no other field reports (a cut-off output)."""

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        """The GPUs nvidia-smi listed (none when it is missing or failed)."""
        return self.gpu.gpus

    @property
    def route_interface(self) -> str | None:
        """The interface that routes to the head."""
        return self.route.interface


def parse_probe(output: str) -> HostFacts:
    """Typed facts from the probe's output; never raises on odd, partial or empty output."""
    probe = split_sections(output)
    problems = () if probe.complete else ("the probe's output was cut off (no end marker)",)
    return HostFacts(
        hostname=_stdout(probe, "hostname") or None,
        clock_s=_number(_stdout(probe, "clock"), float),
        cpu_count=_number(_stdout(probe, "cpus"), int),
        memory_bytes=_meminfo_bytes(_stdout(probe, "memory")),
        gpu=_gpu_facts(probe),
        docker=_docker_facts(probe),
        shm=_df(_stdout(probe, "shm")),
        cache_disk=_df(_stdout(probe, "cache-disk")),
        route=_route(probe),
        listening_ports=_listening_ports(_stdout(probe, "listening", any_exit_code=True)),
        fabric=parse_fabric(*(_raw(probe, name) for name in _FABRIC_SECTIONS)),
        problems=problems,
    )


def _stdout(probe: ProbeOutput, name: str, *, any_exit_code: bool = False) -> str:
    """A section's stdout when its command succeeded (or ran at all); else ''."""
    section = probe.get(name)
    if section is None or section.missing or not (section.ok or any_exit_code):
        return ""
    return section.stdout.strip()


_FABRIC_SECTIONS = ("multicast", "gpu-fabric", "infiniband", "rdma-modules")


def _raw(probe: ProbeOutput, name: str) -> tuple[int | None, str, str] | None:
    """A section as (exit code or None: missing, stdout, stderr); None when it is absent."""
    section = probe.get(name)
    return None if section is None else (section.exit_code, section.stdout, section.stderr)


def _why_not(section: Section | None, what: str) -> str:
    if section is None:
        return f"the probe did not reach {what}"
    return section.message()


def _command_output(section: Section | None) -> CommandOutput | None:
    if section is None:
        return None
    return CommandOutput(section.exit_code, section.stdout, section.stderr)


def _gpu_facts(probe: ProbeOutput) -> GpuFacts:
    query = _command_output(probe.get("gpu-query"))
    if query is None:
        detail = "the probe's output ended before nvidia-smi ran"
        return GpuFacts(problem=gpu_problem(GpuProblemKind.NOT_PROBED, detail))
    return parse_gpu_facts(
        query,
        processes=_command_output(probe.get("gpu-apps")),
        topology=_command_output(probe.get("gpu-topology")),
        driver_version_file=_stdout(probe, "driver"),
    )


def _docker_facts(probe: ProbeOutput) -> DockerFacts:
    version = _stdout(probe, "docker-version")
    hooks = tuple(_stdout(probe, "nvidia-toolkit").split())
    if not version:
        return DockerFacts(
            nvidia_hooks=hooks, problem=_why_not(probe.get("docker-version"), "docker")
        )
    try:
        runtimes = json.loads(_stdout(probe, "docker-runtimes") or "null") or {}
    except ValueError:
        runtimes = {}
    names = tuple(sorted(runtimes)) if isinstance(runtimes, dict) else ()
    return DockerFacts(server_version=version, runtimes=names, nvidia_hooks=hooks)


def _route(probe: ProbeOutput) -> RouteToHead:
    text = _stdout(probe, "route")
    device = re.search(r"\bdev\s+(\S+)", text)
    source = re.search(r"\bsrc\s+(\S+)", text)
    if device is None:
        return RouteToHead(problem=_why_not(probe.get("route"), "the route to the head"))
    interface = device[1]
    if interface == "lo" and source is not None:
        interface = _interface_holding(_stdout(probe, "addresses"), source[1]) or interface
    return RouteToHead(interface=interface, source_address=source[1] if source else None)


def _interface_holding(addresses: str, address: str) -> str | None:
    """From `ip -o addr show`: the interface (other than lo) that holds `address`."""
    for line in addresses.splitlines():
        cells = line.split()
        if len(cells) > 3 and cells[1] != "lo" and cells[3].split("/")[0] == address:
            return cells[1]
    return None


def _number(text: str, kind: Callable[[str], _Number]) -> _Number | None:
    try:
        return kind(text) if text else None
    except ValueError:
        # busybox `date` prints `%N` literally: keep the whole seconds
        whole = re.match(r"\d+", text)
        return kind(whole[0]) if whole else None


def _meminfo_bytes(text: str) -> int | None:
    match = re.search(r"MemTotal:\s+(\d+)\s+kB", text)
    return int(match[1]) * 1024 if match else None


def _df(text: str) -> DiskSpace | None:
    """`df -Pk PATH`: the last line is `FS 1024-blocks Used Available Capacity Mounted-on`."""
    lines = text.splitlines()
    cells = lines[-1].split() if len(lines) >= 2 else []
    if len(cells) < 6 or not (cells[1].isdigit() and cells[3].isdigit()):
        return None
    return DiskSpace(
        mount_point=" ".join(cells[5:]),
        size_bytes=int(cells[1]) * 1024,
        free_bytes=int(cells[3]) * 1024,
    )


_LISTEN = "0A"


def _listening_ports(text: str) -> frozenset[int]:
    """The TCP ports in LISTEN state, from /proc/net/tcp and /proc/net/tcp6."""
    ports = set()
    for line in text.splitlines():
        cells = line.split()
        if len(cells) > 3 and cells[3] == _LISTEN and ":" in cells[1]:
            ports.add(int(cells[1].rsplit(":", 1)[1], 16))
    return frozenset(ports)
