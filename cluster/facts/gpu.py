"""GPU facts: pure parsers for what nvidia-smi prints, and why it failed when it did.

The commands run inside the host probe (`cluster.facts.probe`); here their captured output
becomes typed data. Nothing here raises on odd output: a failure becomes a `GpuProblem`
that says what is wrong and how to fix it. Tested on real captures (`tests/fixtures/gpu/`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_COLUMNS: tuple[tuple[str, str, type], ...] = (
    # (attribute, nvidia-smi query field, type)
    ("index", "index", int),
    ("uuid", "uuid", str),
    ("name", "name", str),
    ("pci_bus_id", "pci.bus_id", str),
    ("memory_total_mib", "memory.total", int),
    ("memory_used_mib", "memory.used", int),
    ("memory_free_mib", "memory.free", int),
    ("utilization_pct", "utilization.gpu", int),
    ("memory_utilization_pct", "utilization.memory", int),
    ("temperature_c", "temperature.gpu", int),
    ("power_draw_w", "power.draw", float),
    ("power_limit_w", "power.limit", float),
    ("sm_clock_mhz", "clocks.sm", int),
    ("memory_clock_mhz", "clocks.mem", int),
    ("ecc_uncorrected", "ecc.errors.uncorrected.volatile.total", int),
    ("ecc_corrected", "ecc.errors.corrected.volatile.total", int),
    ("driver_version", "driver_version", str),
    ("compute_capability", "compute_cap", str),
    ("persistence_mode", "persistence_mode", bool),
    ("pstate", "pstate", str),
    ("mig_enabled", "mig.mode.current", bool),
)

GPU_QUERY_FIELDS: tuple[str, ...] = tuple(field for _, field, _ in _COLUMNS)
"""The `--query-gpu` fields, in the order the parser reads them."""

COMPUTE_APPS_FIELDS: tuple[str, ...] = ("pid", "process_name", "used_memory", "gpu_uuid")
"""The `--query-compute-apps` fields: processes holding GPU memory."""

_NOT_REPORTED = frozenset({"", "N/A", "[N/A]", "Not Supported", "[Not Supported]"})
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_NUMBER_WITH_UNIT = re.compile(r"([-+]?\d+(?:\.\d+)?)\s*(?:[A-Za-z]+|%)?")
_SWITCH = {"enabled": True, "on": True, "disabled": False, "off": False}


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as `nvidia-smi --query-gpu` reports it; None where it reports no value.

    `errors` holds the cells that were an error rather than a value (`ERR!`,
    `[GPU requires reset]`, `[Unknown Error]`), as `field=cell`: a GPU with any is unhealthy.
    `[N/A]` and `[Not Supported]` only mean "not reported" (ECC off, MIG mode) and are no error.
    """

    index: int
    uuid: str | None = None
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    memory_free_mib: int | None = None
    utilization_pct: int | None = None
    memory_utilization_pct: int | None = None
    temperature_c: int | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: int | None = None
    memory_clock_mhz: int | None = None
    ecc_uncorrected: int | None = None
    ecc_corrected: int | None = None
    driver_version: str | None = None
    compute_capability: str | None = None
    persistence_mode: bool | None = None
    pstate: str | None = None
    mig_enabled: bool | None = None
    errors: tuple[str, ...] = ()


def _cell_value(cell: str, kind: type) -> Any:
    """The typed value of one cell (`"143771 MiB"` -> 143771); ValueError when it has none."""
    if kind is str:
        return cell
    if kind is bool:
        if cell.lower() not in _SWITCH:
            raise ValueError(cell)
        return _SWITCH[cell.lower()]
    number = _NUMBER_WITH_UNIT.fullmatch(cell)
    if number is None:
        raise ValueError(cell)
    return int(float(number[1])) if kind is int else float(number[1])


def _gpu_row(line: str) -> GpuInfo | None:
    """One `--query-gpu` row as a GpuInfo; None when the line is not a row of our fields."""
    cells = [cell.strip() for cell in line.split(",")]
    if len(cells) != len(_COLUMNS) or not cells[0].isdigit():
        return None
    values: dict[str, Any] = {}
    errors: list[str] = []
    for cell, (attribute, field, kind) in zip(cells, _COLUMNS, strict=True):
        if cell in _NOT_REPORTED:
            continue
        try:
            values[attribute] = _cell_value(cell, kind)
        except ValueError:
            errors.append(f"{field}={cell}")
    return GpuInfo(**values, errors=tuple(errors))


def parse_query_gpu(text: str) -> tuple[list[GpuInfo], list[str]]:
    """Parse `nvidia-smi --query-gpu=<GPU_QUERY_FIELDS> --format=csv[,noheader][,nounits]`.

    Returns the GPUs and the other non-blank lines (a header is skipped; an error message
    such as "Unable to determine the device handle for GPU..." is returned, not raised).
    """
    gpus: list[GpuInfo] = []
    other: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("index,"):
            continue
        gpu = _gpu_row(line)
        if gpu is None:
            other.append(line.strip())
        else:
            gpus.append(gpu)
    return gpus, other


@dataclass(frozen=True)
class GpuProcess:
    """A process holding GPU memory, from `nvidia-smi --query-compute-apps`."""

    pid: int
    process_name: str
    used_memory_mib: int | None
    gpu_uuid: str


def parse_compute_apps(text: str) -> list[GpuProcess]:
    """Parse `nvidia-smi --query-compute-apps=<COMPUTE_APPS_FIELDS>`; odd lines are skipped."""
    processes = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(COMPUTE_APPS_FIELDS) or not cells[0].isdigit():
            continue
        pid, process_name, used_memory, gpu_uuid = cells
        memory = _NUMBER.match(used_memory)
        processes.append(
            GpuProcess(int(pid), process_name, int(float(memory[0])) if memory else None, gpu_uuid)
        )
    return processes


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GPU_LABEL = re.compile(r"^GPU(\d+)$")


@dataclass(frozen=True)
class GpuTopology:
    """How the GPUs of one host are linked, from `nvidia-smi topo -m`.

    `links[(a, b)]` is the link between GPUs a and b as printed: `X` (itself), `NV<n>`
    (n bonded NVLinks), or a PCIe path: `PIX`, `PXB`, `PHB`, `NODE`, `SYS`.
    """

    gpu_indices: tuple[int, ...]
    links: Mapping[tuple[int, int], str]

    def nvlinked(self, a: int, b: int) -> bool:
        """True when GPUs a and b talk over NVLink."""
        return self.links.get((a, b), "").startswith("NV")

    def pairs_without_nvlink(self, gpu_indices: Iterable[int] | None = None) -> list[str]:
        """The pairs among `gpu_indices` (default: all) that are not NVLinked: `GPU0-GPU4 SYS`."""
        chosen = sorted(self.gpu_indices if gpu_indices is None else gpu_indices)
        return [
            f"GPU{a}-GPU{b} {self.links.get((a, b), 'unknown')}"
            for position, a in enumerate(chosen)
            for b in chosen[position + 1 :]
            if not self.nvlinked(a, b)
        ]

    @property
    def interconnect(self) -> str:
        """`NVLink` (every pair), `PCIe` (no pair), `mixed`, or `single GPU`."""
        pairs = len(self.gpu_indices) * (len(self.gpu_indices) - 1) // 2
        if pairs == 0:
            return "single GPU"
        missing = len(self.pairs_without_nvlink())
        return "NVLink" if missing == 0 else "PCIe" if missing == pairs else "mixed"


def parse_topology(text: str) -> GpuTopology:
    """Parse `nvidia-smi topo -m` into the GPU link matrix (NIC columns are left out).

    Takes the real output (ANSI-underlined, tab-separated header; blank cells) and copies
    whose tabs became spaces. Raises ValueError when there is no complete GPU matrix.
    """
    lines = _ANSI_ESCAPE.sub("", text).splitlines()
    rows = [line.split("\t") if "\t" in line else line.split() for line in lines]
    rows = [[cell.strip() for cell in row] for row in rows]
    header_at = next((n for n, row in enumerate(rows) if "GPU0" in row), None)
    if header_at is None:
        raise ValueError("no GPU0 column in nvidia-smi topo -m output")
    columns: list[str] = []
    for cell in (cell for cell in rows[header_at] if cell):
        if not re.match(r"^(GPU|NIC)\d+$", cell):
            break
        columns.append(cell)
    links: dict[tuple[int, int], str] = {}
    indices: list[int] = []
    for row in rows[header_at + 1 :]:
        if not any(row):
            break  # the blank line before the legend
        label = _GPU_LABEL.match(row[0])
        if label is None:
            continue  # a NIC's row
        a = int(label[1])
        indices.append(a)
        for column, value in zip(columns, row[1 : 1 + len(columns)], strict=False):
            column_gpu = _GPU_LABEL.match(column)
            if column_gpu and value:
                links[(a, int(column_gpu[1]))] = value
    missing = [(a, b) for a in indices for b in indices if (a, b) not in links]
    if not indices or missing:
        raise ValueError(f"incomplete GPU matrix in nvidia-smi topo -m (missing {missing[:3]})")
    return GpuTopology(gpu_indices=tuple(indices), links=links)


_DRIVER_VERSION = re.compile(
    r"^NVRM version:.*?Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)\s", re.M
)


def parse_driver_version(text: str) -> str | None:
    """The loaded kernel module's version from /proc/driver/nvidia/version (`580.159.04`)."""
    match = _DRIVER_VERSION.search(text)
    return match[1] if match else None


class GpuProblemKind(enum.StrEnum):
    """Why nvidia-smi gave no (complete) answer."""

    NVIDIA_SMI_MISSING = "nvidia-smi missing"
    DRIVER_NOT_LOADED = "driver not loaded"
    DRIVER_MISMATCH = "driver/library version mismatch"
    NO_DEVICES = "no GPUs found"
    GPU_LOST = "GPU lost"
    TIMED_OUT = "nvidia-smi timed out"
    UNKNOWN_FIELD = "unknown query field"
    FAILED = "nvidia-smi failed"
    UNREADABLE = "unreadable output"
    NOT_PROBED = "not probed"


REMEDIES: dict[GpuProblemKind, str] = {
    GpuProblemKind.NVIDIA_SMI_MISSING: (
        "install the NVIDIA driver and its utilities (nvidia-smi), and check that nvidia-smi "
        "is on the PATH of a non-interactive SSH session"
    ),
    GpuProblemKind.DRIVER_NOT_LOADED: (
        "load the kernel module (`modprobe nvidia`; `dmesg | grep -i nvrm` says why it "
        "failed), or reinstall the driver for the running kernel and reboot"
    ),
    GpuProblemKind.DRIVER_MISMATCH: (
        "the driver was upgraded but the old kernel module is still loaded: reboot the host "
        "(or stop every GPU process and reload the nvidia modules)"
    ),
    GpuProblemKind.NO_DEVICES: (
        "check that the GPUs are on the PCI bus (`lspci -d 10de:`) and that the driver "
        "supports them (`dmesg | grep -i nvrm`)"
    ),
    GpuProblemKind.GPU_LOST: (
        "a GPU fell off the bus: look for Xid 79 in `dmesg`, drain the host and reboot it; "
        "if it repeats, have the hardware checked"
    ),
    GpuProblemKind.TIMED_OUT: (
        "nvidia-smi hangs: a GPU or the driver is stuck (`dmesg | grep -i xid`); "
        "drain the host and reboot it"
    ),
    GpuProblemKind.UNKNOWN_FIELD: (
        "this driver's nvidia-smi lacks a field vcluster queries: upgrade the driver"
    ),
    GpuProblemKind.FAILED: (
        "run `nvidia-smi` on the host and read its message; `dmesg | grep -i -e nvrm -e xid` "
        "shows driver errors"
    ),
    GpuProblemKind.UNREADABLE: (
        "nvidia-smi printed something vcluster does not understand: report it with the "
        "output of `nvidia-smi` and the driver version"
    ),
    GpuProblemKind.NOT_PROBED: "run the checks again; raise ssh.command_timeout if the host is slow",
}

# The message nvidia-smi prints, matched first; its exit code (NVML return codes) second.
_MESSAGES: tuple[tuple[str, GpuProblemKind], ...] = (
    ("Driver/library version mismatch", GpuProblemKind.DRIVER_MISMATCH),
    ("couldn't communicate with the NVIDIA driver", GpuProblemKind.DRIVER_NOT_LOADED),
    ("GPU is lost", GpuProblemKind.GPU_LOST),
    ("fallen off the bus", GpuProblemKind.GPU_LOST),
    ("Unable to determine the device handle", GpuProblemKind.GPU_LOST),
    ("No devices were found", GpuProblemKind.NO_DEVICES),
    ("is not a valid field to query", GpuProblemKind.UNKNOWN_FIELD),
)
_EXIT_CODES = {
    6: GpuProblemKind.NO_DEVICES,
    9: GpuProblemKind.DRIVER_NOT_LOADED,
    15: GpuProblemKind.GPU_LOST,
    18: GpuProblemKind.DRIVER_MISMATCH,
    124: GpuProblemKind.TIMED_OUT,
    127: GpuProblemKind.NVIDIA_SMI_MISSING,
}


@dataclass(frozen=True)
class GpuProblem:
    """Why the GPU facts are missing or incomplete: what, nvidia-smi's own words, the fix."""

    kind: GpuProblemKind
    detail: str
    remedy: str


def gpu_problem(kind: GpuProblemKind, detail: str) -> GpuProblem:
    """A problem of that kind, with its remedy; the detail is cut to one short line."""
    detail = " ".join(detail.split())
    return GpuProblem(kind, detail[:237] + "..." if len(detail) > 240 else detail, REMEDIES[kind])


def classify_failure(exit_code: int | None, output: str) -> GpuProblem:
    """Name why nvidia-smi failed from its exit code (None: not installed) and output."""
    if exit_code is None:
        return gpu_problem(GpuProblemKind.NVIDIA_SMI_MISSING, "nvidia-smi is not installed")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        for text, kind in _MESSAGES:
            if text in line:
                return gpu_problem(kind, line)
    kind = _EXIT_CODES.get(exit_code, GpuProblemKind.FAILED)
    if kind is GpuProblemKind.TIMED_OUT:
        return gpu_problem(kind, "nvidia-smi did not answer in time")
    return gpu_problem(kind, f"nvidia-smi exited {exit_code}: {lines[0] if lines else 'no output'}")


@dataclass(frozen=True)
class GpuFacts:
    """One host's GPUs; `problem` is set when nvidia-smi failed or answered in part.

    GPUs that were read are kept even with a problem (seven good GPUs beside a lost one).
    """

    gpus: tuple[GpuInfo, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    topology: GpuTopology | None = None
    driver_version: str | None = None
    problem: GpuProblem | None = None

    @property
    def gpu_count(self) -> int:
        """How many GPUs nvidia-smi listed."""
        return len(self.gpus)

    @property
    def model_name(self) -> str | None:
        """The GPU model; `A + B` when mixed; None when there is none."""
        names = dict.fromkeys(gpu.name for gpu in self.gpus if gpu.name)
        return " + ".join(names) or None


@dataclass(frozen=True)
class CommandOutput:
    """What one nvidia-smi command printed; `exit_code` None when it is not installed."""

    exit_code: int | None
    stdout: str = ""
    stderr: str = ""


def parse_gpu_facts(
    query: CommandOutput,
    *,
    processes: CommandOutput | None = None,
    topology: CommandOutput | None = None,
    driver_version_file: str | None = None,
) -> GpuFacts:
    """Combine one host's nvidia-smi outputs (and /proc/driver/nvidia/version); never raises."""
    gpus, other = parse_query_gpu(query.stdout)
    problem = None
    if query.exit_code != 0 or any(text in line for line in other for text, _ in _MESSAGES):
        problem = classify_failure(query.exit_code, query.stderr + "\n" + query.stdout)
    elif other:
        problem = gpu_problem(GpuProblemKind.UNREADABLE, f"nvidia-smi --query-gpu: {other[0]}")
    elif not gpus:
        problem = gpu_problem(GpuProblemKind.NO_DEVICES, "nvidia-smi --query-gpu listed no GPUs")

    links = None
    if topology is not None and topology.exit_code == 0:
        try:
            links = parse_topology(topology.stdout)
        except ValueError as error:
            problem = problem or gpu_problem(GpuProblemKind.UNREADABLE, str(error))

    compute_apps: tuple[GpuProcess, ...] = ()
    if processes is not None and processes.exit_code == 0:
        compute_apps = tuple(parse_compute_apps(processes.stdout))
    driver = parse_driver_version(driver_version_file or "")
    return GpuFacts(
        gpus=tuple(gpus),
        processes=compute_apps,
        topology=links,
        driver_version=driver or next((g.driver_version for g in gpus if g.driver_version), None),
        problem=problem,
    )
