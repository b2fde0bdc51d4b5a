"""All facts of one host in ONE remote exec: a constant sh script, and a pure parser.

The script prints sections (`@@vcluster:NAME rc=N@@` then the section's output); a missing
tool becomes a section with its exit code (127), never a failed probe. The head address and the
model cache path reach the script as positional arguments, never pasted into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cluster.facts.gpu import (
    COMPUTE_APPS_FIELDS,
    GPU_QUERY_FIELDS,
    GpuFacts,
    GpuProcess,
    parse_compute_apps,
    parse_gpu_facts,
)

_SECTION = re.compile(r"^@@vcluster:(?P<name>[a-z-]+) rc=(?P<rc>\d+)@@$")

PROBE_SCRIPT = f"""\
head=$1; cache=$2
section() {{ name=$1; shift; out=$("$@" 2>&1); rc=$?; echo "@@vcluster:$name rc=$rc@@"; \
[ -n "$out" ] && printf '%s\\n' "$out"; }}
section hostname hostname
section clock date +%s.%N
section cpus nproc
section memory sh -c 'grep MemTotal /proc/meminfo'
section gpu-query nvidia-smi --query-gpu={",".join(GPU_QUERY_FIELDS)} --format=csv,noheader,nounits
section gpu-topology nvidia-smi topo -m
section gpu-apps nvidia-smi --query-compute-apps={",".join(COMPUTE_APPS_FIELDS)} --format=csv,noheader,nounits
section driver cat /proc/driver/nvidia/version
section docker docker version --format '{{{{.Server.Version}}}}'
section docker-runtimes docker info --format '{{{{range $name, $_ := .Runtimes}}}}{{{{$name}}}} {{{{end}}}}'
section shm df -Pk /dev/shm
section route ip -o route get "$head"
section disk sh -c 'd=$0; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d"' "$cache"
section listening sh -c 'cat /proc/net/tcp /proc/net/tcp6 2>/dev/null'
"""


def probe_argv(*, head_address: str, model_cache: str) -> list[str]:
    """The one command that gathers a host's facts."""
    return ["sh", "-c", PROBE_SCRIPT, "vcluster-probe", head_address, model_cache]


@dataclass(frozen=True)
class Section:
    exit_code: int
    output: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class HostFacts:
    """What one probe found on a host; None where a tool was missing or failed."""

    hostname: str | None
    clock: float | None
    cpus: int | None
    memory_bytes: int | None
    gpu: GpuFacts | None  # None when nvidia-smi is not installed
    gpu_processes: tuple[GpuProcess, ...]
    docker_version: str | None
    docker_error: str | None
    docker_runtimes: tuple[str, ...]
    shm_bytes: int | None
    route_interface: str | None
    route_source: str | None
    disk_free_bytes: int | None
    disk_path: str | None
    listening_ports: frozenset[int]

    @property
    def gpus(self) -> tuple:
        return self.gpu.gpus if self.gpu is not None else ()


def split_sections(output: str) -> dict[str, Section]:
    """The probe's output by section name."""
    sections: dict[str, Section] = {}
    name, code, lines = None, 0, []
    for line in output.splitlines():
        match = _SECTION.match(line)
        if match:
            if name is not None:
                sections[name] = Section(code, "\n".join(lines))
            name, code, lines = match["name"], int(match["rc"]), []
        elif name is not None:
            lines.append(line)
    if name is not None:
        sections[name] = Section(code, "\n".join(lines))
    return sections


def parse_probe(output: str) -> HostFacts:
    """Typed facts from the probe's output; never raises on odd or partial output."""
    sections = split_sections(output)

    def text(name: str) -> str | None:
        section = sections.get(name)
        return section.output.strip() if section is not None and section.ok else None

    interface, source = _parse_route(text("route"))
    disk_free, disk_path = _parse_df(text("disk"))
    docker = sections.get("docker")
    return HostFacts(
        hostname=text("hostname"),
        clock=_number(text("clock"), float),
        cpus=_number(text("cpus"), int),
        memory_bytes=_meminfo_bytes(text("memory")),
        gpu=_gpu_facts(sections),
        gpu_processes=tuple(parse_compute_apps(text("gpu-apps") or "")),
        docker_version=text("docker") or None,
        docker_error=None if docker is None or docker.ok else _last_line(docker.output),
        docker_runtimes=tuple((text("docker-runtimes") or "").split()),
        shm_bytes=_parse_df(text("shm"))[0],
        route_interface=interface,
        route_source=source,
        disk_free_bytes=disk_free,
        disk_path=disk_path,
        listening_ports=_listening_ports(text("listening") or ""),
    )


def _gpu_facts(sections: dict[str, Section]) -> GpuFacts | None:
    query = sections.get("gpu-query")
    if query is None or query.exit_code == 127:
        return None
    topology = sections.get("gpu-topology")
    driver = sections.get("driver")
    return parse_gpu_facts(
        query.output if query.ok else "",
        topology.output if topology is not None and topology.ok else None,
        query_exit_code=query.exit_code,
        query_stderr="" if query.ok else query.output,
        driver_version_text=driver.output if driver is not None and driver.ok else None,
    )


def _number(text: str | None, kind: type) -> float | int | None:
    try:
        return kind(text) if text else None
    except ValueError:
        return None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _meminfo_bytes(text: str | None) -> int | None:
    match = re.search(r"MemTotal:\s+(\d+)\s+kB", text or "")
    return int(match[1]) * 1024 if match else None


def _parse_route(text: str | None) -> tuple[str | None, str | None]:
    """`ip -o route get` -> (device, source address)."""
    if not text:
        return None, None
    device = re.search(r"\bdev\s+(\S+)", text)
    source = re.search(r"\bsrc\s+(\S+)", text)
    return (device[1] if device else None, source[1] if source else None)


def _parse_df(text: str | None) -> tuple[int | None, str | None]:
    """`df -Pk PATH` -> (available bytes, mount point)."""
    lines = (text or "").splitlines()
    if len(lines) < 2:
        return None, None
    cells = lines[-1].split()
    if len(cells) < 6 or not cells[3].isdigit():
        return None, None
    return int(cells[3]) * 1024, cells[5]


_LISTEN_STATE = "0A"


def _listening_ports(text: str) -> frozenset[int]:
    """Ports in LISTEN state from /proc/net/tcp and tcp6."""
    ports = set()
    for line in text.splitlines()[0:]:
        cells = line.split()
        if len(cells) > 3 and cells[3] == _LISTEN_STATE and ":" in cells[1]:
            ports.add(int(cells[1].rsplit(":", 1)[1], 16))
    return frozenset(ports)
