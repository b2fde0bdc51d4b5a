"""GPU facts: the nvidia-smi commands to run on a host and pure parsers for what they print.

Each probe is an argv (run over the transport) plus a parser that turns captured text into
typed data; nothing here runs a process. The parsers are tested on real captures under
`tests/fixtures/gpu/`. Only the standard library is imported, so this module also runs on a
bare GPU host (`python3 -c 'import cluster.facts.gpu'`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

NVIDIA_SMI = "nvidia-smi"
DRIVER_VERSION_PATH = "/proc/driver/nvidia/version"

_STR = "str"
_INT = "int"
_FLOAT = "float"
_ENABLED = "enabled"

_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("index", "index", _INT),
    ("uuid", "uuid", _STR),
    ("name", "name", _STR),
    ("pci_bus_id", "pci.bus_id", _STR),
    ("memory_total_mib", "memory.total", _INT),
    ("memory_used_mib", "memory.used", _INT),
    ("memory_free_mib", "memory.free", _INT),
    ("utilization_gpu_pct", "utilization.gpu", _INT),
    ("utilization_memory_pct", "utilization.memory", _INT),
    ("temperature_c", "temperature.gpu", _INT),
    ("power_draw_w", "power.draw", _FLOAT),
    ("power_limit_w", "power.limit", _FLOAT),
    ("clocks_sm_mhz", "clocks.sm", _INT),
    ("clocks_mem_mhz", "clocks.mem", _INT),
    ("ecc_uncorrected", "ecc.errors.uncorrected.volatile.total", _INT),
    ("ecc_corrected", "ecc.errors.corrected.volatile.total", _INT),
    ("driver_version", "driver_version", _STR),
    ("compute_capability", "compute_cap", _STR),
    ("persistence_mode", "persistence_mode", _ENABLED),
    ("pstate", "pstate", _STR),
    ("mig_mode", "mig.mode.current", _ENABLED),
)

GPU_QUERY_FIELDS: tuple[str, ...] = tuple(query_field for _, query_field, _ in _COLUMNS)
"""The `--query-gpu` fields, in the order `parse_query_gpu` reads them."""

COMPUTE_APPS_FIELDS: tuple[str, ...] = ("pid", "process_name", "used_memory", "gpu_uuid")


def query_gpu_argv() -> list[str]:
    """`nvidia-smi --query-gpu=<GPU_QUERY_FIELDS> --format=csv,noheader,nounits`."""
    return [
        NVIDIA_SMI,
        "--query-gpu=" + ",".join(GPU_QUERY_FIELDS),
        "--format=csv,noheader,nounits",
    ]


def topo_argv() -> list[str]:
    """`nvidia-smi topo -m`: the GPU/NIC link matrix with CPU and NUMA affinity."""
    return [NVIDIA_SMI, "topo", "-m"]


def driver_version_argv() -> list[str]:
    """Read the loaded kernel module's version; it works even when NVML does not."""
    return ["cat", DRIVER_VERSION_PATH]


def compute_apps_argv() -> list[str]:
    """`nvidia-smi --query-compute-apps=...`: processes holding GPU memory."""
    return [
        NVIDIA_SMI,
        "--query-compute-apps=" + ",".join(COMPUTE_APPS_FIELDS),
        "--format=csv,noheader,nounits",
    ]


# --- query-gpu ---------------------------------------------------------------------------

_UNAVAILABLE_CELLS = frozenset({"[N/A]", "N/A", "[Not Supported]", "Not Supported", ""})
_NUMBER_WITH_UNIT = re.compile(r"^(?P<number>[-+]?\d+(?:\.\d+)?)(?:\s*(?P<unit>[A-Za-z%]+))?$")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as `nvidia-smi --query-gpu` reports it; None where the value is unknown.

    `errored_fields` names the query fields whose cell was an error (`ERR!`,
    `[Unknown Error]`, `[GPU is lost]`...) or could not be read: a GPU with any is sick.
    `[N/A]` and `[Not Supported]` only mean "not reported" and are not errors.
    """

    index: int
    uuid: str | None
    name: str | None
    pci_bus_id: str | None
    memory_total_mib: int | None
    memory_used_mib: int | None
    memory_free_mib: int | None
    utilization_gpu_pct: int | None
    utilization_memory_pct: int | None
    temperature_c: int | None
    power_draw_w: float | None
    power_limit_w: float | None
    clocks_sm_mhz: int | None
    clocks_mem_mhz: int | None
    ecc_uncorrected: int | None
    ecc_corrected: int | None
    driver_version: str | None
    compute_capability: str | None
    persistence_mode: bool | None
    pstate: str | None
    mig_mode: bool | None
    errored_fields: tuple[str, ...] = ()

    @property
    def is_sick(self) -> bool:
        """True when nvidia-smi reported an error for any field of this GPU."""
        return bool(self.errored_fields)

    @property
    def memory_reserved_mib(self) -> int | None:
        """Memory neither used nor free: what the driver keeps for itself."""
        total, used, free = self.memory_total_mib, self.memory_used_mib, self.memory_free_mib
        if total is None or used is None or free is None:
            return None
        return total - used - free

    @property
    def compute_capability_tuple(self) -> tuple[int, int] | None:
        """`"9.0"` as `(9, 0)`, for comparisons such as `>= (8, 0)`."""
        match = re.fullmatch(r"(\d+)\.(\d+)", self.compute_capability or "")
        return (int(match[1]), int(match[2])) if match else None


def _is_error_cell(cell: str) -> bool:
    if cell in _UNAVAILABLE_CELLS:
        return False
    return cell.startswith("ERR") or (cell.startswith("[") and cell.endswith("]"))


def _convert(cell: str, kind: str) -> Any:
    """Turn one cell into its typed value; raise ValueError when it cannot be read."""
    if kind == _STR:
        return cell
    if kind == _ENABLED:
        if cell.lower() in ("enabled", "on"):
            return True
        if cell.lower() in ("disabled", "off"):
            return False
        raise ValueError(cell)
    match = _NUMBER_WITH_UNIT.match(cell)
    if match is None:
        raise ValueError(cell)
    number = match["number"]
    return float(number) if kind == _FLOAT else int(float(number))


def _split_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.split(",")]


def _is_header(cells: list[str]) -> bool:
    return bool(cells) and cells[0] == "index" and len(cells) > 1


def _gpu_from_cells(cells: list[str]) -> GpuInfo:
    """Build a GpuInfo from one row of cells; ValueError if the row is not a GPU row."""
    if len(cells) != len(_COLUMNS):
        raise ValueError(f"expected {len(_COLUMNS)} fields, got {len(cells)}")
    values: dict[str, Any] = {}
    errored: list[str] = []
    for cell, (attribute, query_field, kind) in zip(cells, _COLUMNS, strict=True):
        if attribute == "index":
            values["index"] = int(cell)
            continue
        if cell in _UNAVAILABLE_CELLS:
            values[attribute] = None
        elif _is_error_cell(cell):
            values[attribute] = None
            errored.append(query_field)
        else:
            try:
                values[attribute] = _convert(cell, kind)
            except ValueError:
                values[attribute] = None
                errored.append(query_field)
    return GpuInfo(**values, errored_fields=tuple(errored))


def _read_query_rows(text: str) -> tuple[list[GpuInfo], list[str]]:
    """Parse every GPU row; return the GPUs and the non-blank lines that were not rows."""
    gpus: list[GpuInfo] = []
    stray: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = _split_cells(line)
        if _is_header(cells):
            continue
        try:
            gpus.append(_gpu_from_cells(cells))
        except ValueError:
            stray.append(line.strip())
    return gpus, stray


def parse_query_gpu(text: str) -> list[GpuInfo]:
    """Parse `nvidia-smi --query-gpu=<GPU_QUERY_FIELDS>` output, with or without header/units.

    Raises ValueError naming the first line that is not a GPU row (an error message, a
    different field list); `parse_gpu_facts` is the never-raising entry point.
    """
    gpus, stray = _read_query_rows(text)
    if stray:
        raise ValueError(f"not a --query-gpu row: {stray[0]!r}")
    return gpus


# --- compute apps ------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuProcess:
    """A process holding GPU memory, from `--query-compute-apps`."""

    pid: int
    process_name: str
    used_memory_mib: int | None
    gpu_uuid: str


def parse_compute_apps(text: str) -> list[GpuProcess]:
    """Parse `nvidia-smi --query-compute-apps=<COMPUTE_APPS_FIELDS>`, header optional."""
    processes = []
    for line in text.splitlines():
        cells = _split_cells(line)
        if not line.strip() or cells[0] == "pid":
            continue
        if len(cells) != len(COMPUTE_APPS_FIELDS):
            raise ValueError(f"not a --query-compute-apps row: {line.strip()!r}")
        pid, process_name, used_memory, gpu_uuid = cells
        match = _NUMBER_WITH_UNIT.match(used_memory)
        processes.append(
            GpuProcess(
                pid=int(pid),
                process_name=process_name,
                used_memory_mib=int(match["number"]) if match else None,
                gpu_uuid=gpu_uuid,
            )
        )
    return processes


# --- topo -m -----------------------------------------------------------------------------

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GPU_LABEL = re.compile(r"^GPU(\d+)$")
_NIC_LEGEND_ENTRY = re.compile(r"^\s*(NIC\d+):\s*(\S+)\s*$")
_AFFINITY_COLUMNS = ("cpu_affinity", "numa_affinity", "gpu_numa_id")


@dataclass(frozen=True)
class GpuAffinity:
    """Where a GPU sits relative to the CPUs: its CPU list and NUMA node(s)."""

    cpu_affinity: str | None
    numa_affinity: str | None
    gpu_numa_id: str | None

    @property
    def cpus(self) -> tuple[int, ...]:
        """The CPU list `"0-55,112-167"` expanded; empty when unknown."""
        return _expand_cpu_list(self.cpu_affinity)


def _expand_cpu_list(text: str | None) -> tuple[int, ...]:
    cpus: list[int] = []
    for part in (text or "").split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if match is None:
            return ()
        first = int(match[1])
        last = int(match[2]) if match[2] else first
        cpus.extend(range(first, last + 1))
    return tuple(cpus)


@dataclass(frozen=True)
class GpuTopology:
    """How the GPUs of one host are linked, from `nvidia-smi topo -m`.

    `links[(a, b)]` is the link kind between GPU indices a and b as printed: `X` (self),
    `NV<n>` (n bonded NVLinks), `PIX`, `PXB`, `PHB`, `NODE` or `SYS`. NICs are kept out of
    the matrix; `nics` maps their labels (`NIC0`) to device names (`mlx5_0`).
    """

    gpu_indices: tuple[int, ...]
    links: dict[tuple[int, int], str]
    affinity: dict[int, GpuAffinity]
    nics: dict[str, str] = field(default_factory=dict)

    def link(self, a: int, b: int) -> str:
        """The link kind between GPUs a and b; KeyError if either is not in the matrix."""
        try:
            return self.links[(a, b)]
        except KeyError:
            raise KeyError(f"GPU pair ({a}, {b}) not in topology of {self.gpu_indices}") from None

    def nvlink_count(self, a: int, b: int) -> int:
        """How many NVLinks join GPUs a and b (0 for PCIe-only or the same GPU)."""
        match = re.fullmatch(r"NV(\d+)", self.link(a, b))
        return int(match[1]) if match else 0

    def nvlink_between(self, a: int, b: int) -> bool:
        """True when GPUs a and b talk over NVLink."""
        return self.nvlink_count(a, b) > 0

    def all_nvlinked(self, gpu_indices: Iterable[int] | None = None) -> bool:
        """True when every pair among `gpu_indices` (default: all GPUs) is NVLinked."""
        chosen = tuple(self.gpu_indices if gpu_indices is None else gpu_indices)
        return all(
            self.nvlink_between(a, b)
            for position, a in enumerate(chosen)
            for b in chosen[position + 1 :]
        )


def _split_topology_line(line: str) -> list[str]:
    if "\t" in line:
        return [cell.strip() for cell in line.split("\t")]
    return line.split()


def _is_affinity_heading(cell: str) -> bool:
    return cell.startswith(("CPU", "NUMA"))


def parse_topology(text: str) -> GpuTopology:
    """Parse `nvidia-smi topo -m` into a GPU link matrix with per-GPU CPU/NUMA affinity.

    Accepts the tab-separated original (ANSI-underlined header, blank spacer cells) and
    copies where tabs became spaces. Raises ValueError when no GPU matrix is found.
    """
    lines = _ANSI_ESCAPE.sub("", text).splitlines()
    header_at = next(
        (n for n, line in enumerate(lines) if "GPU0" in _split_topology_line(line)), None
    )
    if header_at is None:
        raise ValueError("no GPU0 column in nvidia-smi topo -m output")
    header = [cell for cell in _split_topology_line(lines[header_at]) if cell]
    columns = list(itertools.takewhile(lambda cell: not _is_affinity_heading(cell), header))

    links: dict[tuple[int, int], str] = {}
    affinity: dict[int, GpuAffinity] = {}
    gpu_indices: list[int] = []
    for line in lines[header_at + 1 :]:
        if not line.strip() or line.startswith("Legend"):
            break
        cells = _split_topology_line(line)
        row_match = _GPU_LABEL.match(cells[0])
        if row_match is None:
            continue
        row = int(row_match[1])
        values = cells[1 : 1 + len(columns)]
        if len(values) != len(columns) or not all(values):
            raise ValueError(f"topology row has {len(values)} links, header has {len(columns)}")
        for label, value in zip(columns, values, strict=True):
            column_match = _GPU_LABEL.match(label)
            if column_match is not None:
                links[(row, int(column_match[1]))] = value
        tail = [cell for cell in cells[1 + len(columns) :] if cell]
        tail_values = [None if cell == "N/A" else cell for cell in tail]
        tail_values += [None] * (len(_AFFINITY_COLUMNS) - len(tail_values))
        affinity[row] = GpuAffinity(**dict(zip(_AFFINITY_COLUMNS, tail_values, strict=False)))
        gpu_indices.append(row)

    for a in gpu_indices:
        for b in gpu_indices:
            if (a, b) not in links:
                raise ValueError(f"topology matrix has no entry for GPU{a} -> GPU{b}")

    nics: dict[str, str] = {}
    for line in lines:
        match = _NIC_LEGEND_ENTRY.match(line)
        if match:
            nics[match[1]] = match[2]
    return GpuTopology(gpu_indices=tuple(gpu_indices), links=links, affinity=affinity, nics=nics)


# --- driver version ----------------------------------------------------------------------

_DRIVER_VERSION = re.compile(
    r"^NVRM version:.*?Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)\s", re.M
)


def parse_driver_version(text: str) -> str | None:
    """The loaded kernel module's version from /proc/driver/nvidia/version, e.g. `580.159.04`."""
    match = _DRIVER_VERSION.search(text)
    return match[1] if match else None


# --- failures ----------------------------------------------------------------------------


class GpuProbeErrorKind(Enum):
    """Why nvidia-smi gave no usable answer."""

    NOT_INSTALLED = "not-installed"
    DRIVER_NOT_LOADED = "driver-not-loaded"
    DRIVER_MISMATCH = "driver-mismatch"
    NO_DEVICES = "no-devices"
    GPU_LOST = "gpu-lost"
    BAD_FIELD = "bad-field"
    UNPARSEABLE = "unparseable"
    OTHER = "other"


REMEDIES: dict[GpuProbeErrorKind, str] = {
    GpuProbeErrorKind.NOT_INSTALLED: (
        "install the NVIDIA driver and its utilities (nvidia-smi, libnvidia-ml), e.g. "
        "`apt install nvidia-driver-<version> nvidia-utils-<version>`, and check that "
        "nvidia-smi is on the PATH of a non-interactive SSH session"
    ),
    GpuProbeErrorKind.DRIVER_NOT_LOADED: (
        "load the kernel module (`modprobe nvidia`; `dmesg | grep -i nvrm` says why it failed), "
        "or reinstall the driver for the running kernel (DKMS) and reboot"
    ),
    GpuProbeErrorKind.DRIVER_MISMATCH: (
        "the driver was upgraded but the old kernel module is still loaded: reboot the host, or "
        "stop every GPU process and reload the modules (`rmmod nvidia_uvm nvidia_drm "
        "nvidia_modeset nvidia && modprobe nvidia`)"
    ),
    GpuProbeErrorKind.NO_DEVICES: (
        "check that the GPUs are visible on the PCI bus (`lspci -d 10de:`), that the driver "
        "supports them (`dmesg | grep -i nvrm`), and, in a container or VM, that the GPUs "
        "were passed through"
    ),
    GpuProbeErrorKind.GPU_LOST: (
        "a GPU fell off the bus: look for Xid 79 (or 48, 63, 64, 94, 95) in `dmesg`, drain the "
        "host, try `nvidia-smi -r -i <gpu>` and otherwise reboot; if it repeats, reseat the GPU "
        "or have the hardware checked (power, cooling, riser)"
    ),
    GpuProbeErrorKind.BAD_FIELD: (
        "this nvidia-smi does not know a queried field (older driver): upgrade the driver, "
        "or report the field named in the message"
    ),
    GpuProbeErrorKind.UNPARSEABLE: (
        "nvidia-smi answered in a format vcluster does not understand: report it with the "
        "output and the driver version"
    ),
    GpuProbeErrorKind.OTHER: (
        "run `nvidia-smi` on the host and read its message; `dmesg | grep -i -e nvrm -e xid` "
        "shows driver errors"
    ),
}


@dataclass(frozen=True)
class GpuProbeError:
    """An nvidia-smi failure: its kind, the tool's own message on one line, and the fix."""

    kind: GpuProbeErrorKind
    detail: str
    remedy: str
    exit_code: int | None = None
    pci_bus_id: str | None = None

    def one_line(self) -> str:
        """Render as `<kind>: <detail> (fix: <remedy>)`."""
        return f"{self.kind.value}: {self.detail} (fix: {self.remedy})"


_GPU_HANDLE_LOST = re.compile(
    r"Unable to (?:determine|detect) the device handle for GPU\s*(?P<pci>[0-9A-Fa-f:.]+)"
)
_NVML_LIBRARY_VERSION = re.compile(r"NVML library version:\s*(\S+)")
_BAD_FIELD = re.compile(r'Field "(?P<field>[^"]*)" is not a valid field to query')

_TEXT_RULES: tuple[tuple[GpuProbeErrorKind, Callable[[str], bool]], ...] = (
    (GpuProbeErrorKind.DRIVER_MISMATCH, lambda line: "Driver/library version mismatch" in line),
    (
        GpuProbeErrorKind.DRIVER_NOT_LOADED,
        lambda line: (
            "couldn't communicate with the NVIDIA driver" in line or "Driver Not Loaded" in line
        ),
    ),
    (GpuProbeErrorKind.NO_DEVICES, lambda line: "No devices were found" in line),
    (
        GpuProbeErrorKind.GPU_LOST,
        lambda line: (
            _GPU_HANDLE_LOST.search(line) is not None
            or "fallen off the bus" in line
            or "GPU is lost" in line
        ),
    ),
    (GpuProbeErrorKind.BAD_FIELD, lambda line: _BAD_FIELD.search(line) is not None),
    (
        GpuProbeErrorKind.NOT_INSTALLED,
        lambda line: (
            "command not found" in line
            or "No such file or directory" in line
            or line.endswith("nvidia-smi: not found")
            or "couldn't find libnvidia-ml.so" in line
        ),
    ),
)

_EXIT_CODE_KINDS: dict[int, GpuProbeErrorKind] = {
    127: GpuProbeErrorKind.NOT_INSTALLED,
    126: GpuProbeErrorKind.NOT_INSTALLED,
    12: GpuProbeErrorKind.NOT_INSTALLED,
    9: GpuProbeErrorKind.DRIVER_NOT_LOADED,
    6: GpuProbeErrorKind.NO_DEVICES,
    15: GpuProbeErrorKind.GPU_LOST,
    18: GpuProbeErrorKind.DRIVER_MISMATCH,
}

_DETAIL_LIMIT = 240


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


def _quote_exit(exit_code: int | None, message: str) -> str:
    where = f"nvidia-smi exited {exit_code}" if exit_code is not None else "nvidia-smi"
    return f"{where}: {_one_line(message)}" if message else f"{where} with no message"


def classify_nvidia_smi_failure(exit_code: int | None, stdout: str, stderr: str) -> GpuProbeError:
    """Name why nvidia-smi failed, quoting its message; never raises.

    nvidia-smi prints most errors on stdout, so both streams are read. The message is
    matched first; the exit code (NVML's return codes, 127 from the shell) is the fallback.
    """
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    for kind, matches in _TEXT_RULES:
        line = next((line for line in lines if matches(line)), None)
        if line is None:
            continue
        message = line
        pci_bus_id = None
        if kind is GpuProbeErrorKind.DRIVER_MISMATCH:
            library = next(filter(None, map(_NVML_LIBRARY_VERSION.search, lines)), None)
            if library:
                message = f"{line} (NVML library version: {library[1]})"
        if kind is GpuProbeErrorKind.GPU_LOST:
            lost = _GPU_HANDLE_LOST.search(line)
            pci_bus_id = lost["pci"].rstrip(":.") if lost else None
        return GpuProbeError(
            kind=kind,
            detail=_quote_exit(exit_code, message),
            remedy=REMEDIES[kind],
            exit_code=exit_code,
            pci_bus_id=pci_bus_id,
        )
    kind = _EXIT_CODE_KINDS.get(exit_code, GpuProbeErrorKind.OTHER) if exit_code else None
    kind = kind or GpuProbeErrorKind.OTHER
    return GpuProbeError(
        kind=kind,
        detail=_quote_exit(exit_code, lines[0] if lines else ""),
        remedy=REMEDIES[kind],
        exit_code=exit_code,
    )


def _reports_failure(stdout: str, stderr: str) -> bool:
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    return any(matches(line) for line in lines for _, matches in _TEXT_RULES)


# --- all together ------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuFacts:
    """Everything vcluster knows about one host's GPUs; `error` is set when a probe failed.

    GPUs that were read are kept even when `error` is set (one lost GPU among eight).
    """

    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    topology: GpuTopology | None
    error: GpuProbeError | None = None

    @property
    def gpu_count(self) -> int:
        """How many GPUs nvidia-smi listed."""
        return len(self.gpus)

    @property
    def model_names(self) -> tuple[str, ...]:
        """The distinct GPU model names, in index order."""
        return tuple(dict.fromkeys(gpu.name for gpu in self.gpus if gpu.name))

    @property
    def model_name(self) -> str | None:
        """The GPU model when every GPU is the same model; None when mixed or none."""
        names = self.model_names
        return names[0] if len(names) == 1 else None

    @property
    def sick_gpus(self) -> tuple[GpuInfo, ...]:
        """GPUs for which nvidia-smi reported an error in some field."""
        return tuple(gpu for gpu in self.gpus if gpu.is_sick)

    @property
    def ok(self) -> bool:
        """True when GPUs were found and no probe failed."""
        return self.error is None and bool(self.gpus)


def parse_gpu_facts(
    query_out: str,
    topo_out: str | None = None,
    *,
    query_exit_code: int = 0,
    query_stderr: str = "",
    topo_exit_code: int = 0,
    topo_stderr: str = "",
    driver_version_text: str | None = None,
) -> GpuFacts:
    """Combine the query-gpu, topo -m and driver-version outputs of one host; never raises.

    A failed or half-failed query keeps the GPU rows it did print and sets `error`.
    Topology is None when it was not run or failed.
    """
    gpus, stray = _read_query_rows(query_out)
    error: GpuProbeError | None = None
    if query_exit_code != 0 or _reports_failure(query_out, query_stderr):
        error = classify_nvidia_smi_failure(query_exit_code, query_out, query_stderr)
    elif stray:
        error = GpuProbeError(
            kind=GpuProbeErrorKind.UNPARSEABLE,
            detail=f"nvidia-smi --query-gpu printed a non-GPU line: {_one_line(stray[0])}",
            remedy=REMEDIES[GpuProbeErrorKind.UNPARSEABLE],
            exit_code=query_exit_code,
        )
    elif not gpus:
        error = GpuProbeError(
            kind=GpuProbeErrorKind.NO_DEVICES,
            detail="nvidia-smi --query-gpu listed no GPUs",
            remedy=REMEDIES[GpuProbeErrorKind.NO_DEVICES],
            exit_code=query_exit_code,
        )

    topology: GpuTopology | None = None
    if topo_out is not None:
        if topo_exit_code != 0 or _reports_failure(topo_out, topo_stderr):
            error = error or classify_nvidia_smi_failure(topo_exit_code, topo_out, topo_stderr)
        else:
            try:
                topology = parse_topology(topo_out)
            except ValueError as problem:
                error = error or GpuProbeError(
                    kind=GpuProbeErrorKind.UNPARSEABLE,
                    detail=f"nvidia-smi topo -m: {problem}",
                    remedy=REMEDIES[GpuProbeErrorKind.UNPARSEABLE],
                    exit_code=topo_exit_code,
                )

    driver_version = parse_driver_version(driver_version_text) if driver_version_text else None
    if driver_version is None:
        driver_version = next((gpu.driver_version for gpu in gpus if gpu.driver_version), None)
    return GpuFacts(gpus=tuple(gpus), driver_version=driver_version, topology=topology, error=error)
