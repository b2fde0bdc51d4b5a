"""Fabric facts: NVLink multicast per GPU, the NVSwitch fabric state, InfiniBand/RoCE HCAs and
GPUDirect RDMA, as (what the probe runs, a pure parser).

The host probe (`cluster.facts.probe`) runs, in its one round trip per host:

- `multicast`: `multicast_program.py` with the host's python3 (no image or container needed:
  it is the host's driver that the containers use too), which reads the CUDA driver's
  multicast attribute per GPU and, where every GPU says 1, creates and binds a small multicast
  object and reports each call's result code;
- `gpu-fabric`: `nvidia-smi -q -x` (per GPU: the fabric state and status, the virtualization
  mode);
- `infiniband`: `INFINIBAND_SCRIPT`, which prints the HCAs' ports from sysfs
  (`/sys/class/infiniband/HCA/ports/N/{state,phys_state,link_layer,rate}`, the RoCE GID table),
  the network device of each HCA, and the device files in `/dev/infiniband`;
- `rdma-modules`: the RDMA and GPUDirect RDMA kernel modules loaded (`/proc/modules`).

Nothing here raises on odd output: what cannot be read stays unknown, with the reason.
"""

from __future__ import annotations

import enum
import json
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cluster.remote.registry import MULTICAST, source

MULTICAST_MARKER = "VCLUSTER-MULTICAST "
MULTICAST_ATTRIBUTE = 132
"""CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED."""
MULTICAST_CALLS = frozenset(
    {"cuMulticastGetGranularity", "cuMulticastCreate", "cuMulticastAddDevice", "cuMulticastBindMem"}
)
"""The try's calls whose failure means no multicast; a context or an allocation that fails
(a GPU full of another program's memory) leaves it unknown instead."""


def multicast_program() -> str:
    """The program the probe runs with the host's python3 (`python3 -c SOURCE MODE`)."""
    return source(MULTICAST)


INFINIBAND_SCRIPT = r"""
devices=${2:-/dev/infiniband}
cd "${1:-/sys/class/infiniband}" 2>/dev/null || exit 0
for port in */ports/*; do
  [ -d "$port" ] || continue
  grep -H . "$port/state" "$port/phys_state" "$port/link_layer" "$port/rate" 2>/dev/null
  [ "$(cat "$port/link_layer" 2>/dev/null)" = Ethernet ] || continue
  grep -H . "$port"/gid_attrs/types/* "$port"/gid_attrs/ndevs/* 2>/dev/null
  grep -H -v '^0000:0000:0000:0000:0000:0000:0000:0000$' "$port"/gids/* 2>/dev/null
done
for net in */device/net/*; do [ -e "$net" ] && echo "$net"; done
for device in "$devices"/*; do [ -e "$device" ] && echo "dev:${device##*/}"; done
true
"""
"""Prints `HCA/ports/N/FILE:VALUE` lines (grep -H), `HCA/device/net/IFNAME` and `dev:NAME`.
The GID table is read only for Ethernet (RoCE) ports: NCCL needs its index there only. The
probe runs it without arguments; tests give it a constructed tree (`sh -c SCRIPT sh SYSFS DEV`)."""

RDMA_MODULES = (
    "nvidia_peermem",
    "nv_peer_mem",
    "ib_core",
    "ib_uverbs",
    "rdma_ucm",
    "mlx5_ib",
    "rdma_rxe",
)
"""The modules the probe looks for in /proc/modules."""
PEER_MEMORY_MODULES = ("nvidia_peermem", "nv_peer_mem")
"""GPUDirect RDMA through the peer-memory client (the older Mellanox module name second)."""


# --- NVLink multicast ----------------------------------------------------------------------


class Multicast(enum.StrEnum):
    """Whether NVLink multicast works on a node's GPUs."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class GpuMulticast:
    """One GPU as the CUDA driver sees it: its multicast attribute (None: not read)."""

    ordinal: int
    bus_id: str
    name: str
    attribute: int | None
    fabric_handles: int | None = None
    """CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED (multi-node NVLink's handles)."""


@dataclass(frozen=True)
class DriverCall:
    """One driver call of the functional try and its result (`CUDA_SUCCESS`, or the error)."""

    call: str
    gpu: int | None
    code: int | None
    name: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def shown(self) -> str:
        where = f" on GPU {self.gpu}" if self.gpu is not None else ""
        return f"{self.call}{where}: {self.name} ({self.code})"


@dataclass(frozen=True)
class MulticastFacts:
    """What the multicast program found: per GPU the attribute, and the try's driver calls."""

    gpus: tuple[GpuMulticast, ...] = ()
    tried: bool = False
    calls: tuple[DriverCall, ...] = ()
    driver_version: int | None = None
    problem: str | None = None
    """Why nothing could be read (no driver, cuInit failed, no python3, output unreadable)."""
    not_tried: str | None = None

    @property
    def verdict(self) -> Multicast:
        """YES when the try bound memory of every GPU; NO when an attribute says 0 or a call of
        the try failed; UNKNOWN when nothing could be read or nothing was tried."""
        if self.problem is not None or not self.gpus:
            return Multicast.UNKNOWN
        if any(gpu.attribute == 0 for gpu in self.gpus):
            return Multicast.NO
        if not self.tried:
            return Multicast.UNKNOWN
        if self.failed_call is not None:
            return Multicast.NO if self.failed_call.call in MULTICAST_CALLS else Multicast.UNKNOWN
        bound = {call.gpu for call in self.calls if call.call == "cuMulticastBindMem" and call.ok}
        return Multicast.YES if bound >= {gpu.ordinal for gpu in self.gpus} else Multicast.NO

    @property
    def failed_call(self) -> DriverCall | None:
        """The first driver call of the try that failed."""
        return next((call for call in self.calls if not call.ok), None)

    def explain(self) -> str:
        """One line: why the verdict is what it is."""
        verdict = self.verdict
        if self.problem is not None:
            return self.problem
        if not self.gpus:
            return "the CUDA driver lists no GPU"
        without = [str(gpu.ordinal) for gpu in self.gpus if gpu.attribute == 0]
        if without:
            return f"the driver's multicast attribute is 0 on GPU {', '.join(without)}"
        failed = self.failed_call
        if verdict is Multicast.UNKNOWN and failed is None:
            return f"the attribute says 1, but no multicast object was tried ({self.not_tried})"
        if failed is not None and failed.call not in MULTICAST_CALLS:
            return f"the attribute says 1, but the try could not run: {failed.shown()}"
        if failed is not None:
            return f"the attribute says 1, but {failed.shown()}"
        if verdict is Multicast.NO:
            return "the attribute says 1, but memory of some GPU was not bound"
        return f"a multicast object over {len(self.gpus)} GPU(s) was created and bound"


def parse_multicast(output: str, exit_code: int | None = 0, stderr: str = "") -> MulticastFacts:
    """The multicast program's marked line (other lines ignored); never raises."""
    if exit_code is None:
        return MulticastFacts(problem="python3 is not installed on the host: multicast not read")
    line = next((x for x in output.splitlines() if x.startswith(MULTICAST_MARKER)), None)
    if line is None:
        last = (stderr.strip() or output.strip() or "no output").splitlines()[-1]
        if exit_code == 124:
            last = "timed out"
        return MulticastFacts(
            problem=f"the multicast probe printed no result (exit {exit_code}: {last[:200]})"
        )
    try:
        data = json.loads(line[len(MULTICAST_MARKER) :])
        return _multicast_facts(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return MulticastFacts(problem=f"the multicast probe's result is unreadable ({exc})")


def _multicast_facts(data: dict) -> MulticastFacts:
    gpus = tuple(
        GpuMulticast(
            ordinal=int(gpu["ordinal"]),
            bus_id=str(gpu.get("bus_id") or ""),
            name=str(gpu.get("name") or ""),
            attribute=gpu.get("multicast_attribute"),
            fabric_handles=gpu.get("fabric_handle_attribute"),
        )
        for gpu in data.get("gpus") or ()
    )
    calls = tuple(
        DriverCall(str(s["call"]), s.get("gpu"), s.get("code"), str(s.get("name")))
        for s in data.get("steps") or ()
    )
    problem = data.get("error")
    init = data.get("init")
    if problem is None and isinstance(init, dict) and init.get("code") != 0:
        problem = f"cuInit failed: {init.get('name')} ({init.get('code')})"
    return MulticastFacts(
        gpus=gpus,
        tried=bool(data.get("tried")),
        calls=calls,
        driver_version=data.get("driver"),
        problem=problem,
        not_tried=data.get("not_tried"),
    )


# --- nvidia-smi -q -x: the NVSwitch fabric ------------------------------------------------


@dataclass(frozen=True)
class GpuFabricState:
    """One GPU's `<fabric>` in `nvidia-smi -q -x`: `Completed`/`Success` where a fabric manager
    registered it, `N/A` where there is no NVSwitch fabric (or the driver does not say)."""

    bus_id: str
    product: str | None
    state: str | None
    status: str | None
    virtualization: str | None
    """`None`, `Pass-Through` (a VM with the GPU passed through), `VGPU`, ..."""


def parse_fabric_state(xml_text: str) -> tuple[GpuFabricState, ...]:
    """Each GPU's fabric state from `nvidia-smi -q -x`; () when the XML is unreadable."""
    try:
        # nvidia-smi's own output on a host of the inventory; expat refuses entity bombs
        root = ElementTree.fromstring(xml_text)  # noqa: S314
    except ElementTree.ParseError:
        return ()
    gpus = []
    for gpu in root.iter("gpu"):

        def text(path: str, element: ElementTree.Element = gpu) -> str | None:
            found = element.findtext(path)
            return found.strip() if found and found.strip() not in ("N/A", "") else None

        gpus.append(
            GpuFabricState(
                bus_id=gpu.get("id", ""),
                product=text("product_name"),
                state=text("fabric/state"),
                status=text("fabric/status"),
                virtualization=text("gpu_virtualization_mode/virtualization_mode"),
            )
        )
    return tuple(gpus)


# --- InfiniBand / RoCE ---------------------------------------------------------------------


@dataclass(frozen=True)
class Gid:
    """One entry of a RoCE port's GID table."""

    index: int
    gid: str
    type: str | None  # `RoCE v2`, `IB/RoCE v1`
    netdev: str | None

    @property
    def ipv4_mapped(self) -> bool:
        """`::ffff:a.b.c.d`: the GID of an IPv4 address (what RoCE v2 across subnets routes)."""
        return self.gid.lower().startswith("0000:0000:0000:0000:0000:ffff:")

    @property
    def link_local(self) -> bool:
        return self.gid.lower().startswith("fe80:")


@dataclass(frozen=True)
class HcaPort:
    """One port of an HCA, as sysfs shows it."""

    hca: str
    port: int
    state: str | None = None  # ACTIVE, DOWN, INIT, ARMED (sysfs: `4: ACTIVE`)
    physical_state: str | None = None  # LinkUp, Disabled, Polling (sysfs: `5: LinkUp`)
    link_layer: str | None = None  # InfiniBand, Ethernet
    rate: str | None = None  # `400 Gb/sec (4X NDR)`
    gids: tuple[Gid, ...] = ()

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE" and self.physical_state in (None, "LinkUp")

    @property
    def roce(self) -> bool:
        return self.link_layer == "Ethernet"

    @property
    def rate_gbit(self) -> float | None:
        """The rate in Gbit/s (`400 Gb/sec (4X NDR)` -> 400.0)."""
        match = re.match(r"\s*([\d.]+)\s*Gb/sec", self.rate or "")
        return float(match[1]) if match else None

    @property
    def name(self) -> str:
        """`mlx5_0:1`, NCCL_IB_HCA's form."""
        return f"{self.hca}:{self.port}"

    def roce_v2_gid_index(self) -> int | None:
        """The GID index NCCL should use on this RoCE port: RoCE v2 with an IPv4-mapped
        address first, then RoCE v2 with a global IPv6 address; None when there is neither."""
        v2 = [gid for gid in self.gids if gid.type == "RoCE v2"]
        for choose in (lambda g: g.ipv4_mapped, lambda g: not g.link_local):
            chosen = [gid.index for gid in v2 if choose(gid)]
            if chosen:
                return min(chosen)
        return None


@dataclass(frozen=True)
class InfinibandFacts:
    """The host's HCAs (ports), each HCA's network devices, and /dev/infiniband's files."""

    ports: tuple[HcaPort, ...] = ()
    netdevs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """HCA -> its network devices (`/sys/class/infiniband/HCA/device/net/`)."""
    device_files: tuple[str, ...] = ()
    """`/dev/infiniband/*`: uverbs0, rdma_cm, ... (what NCCL opens in the container)."""
    read: bool = True
    """False when the probe did not read sysfs (cut off, or an older probe)."""

    @property
    def active_ports(self) -> tuple[HcaPort, ...]:
        return tuple(port for port in self.ports if port.active)

    def link_layers(self) -> set[str]:
        """The link layers of the active ports."""
        return {port.link_layer or "unknown" for port in self.active_ports}


_SYSFS_LINE = re.compile(r"^(?P<hca>[^/\s]+)/ports/(?P<port>\d+)/(?P<file>[\w/]+?):(?P<value>.*)$")
_NETDEV_LINE = re.compile(r"^(?P<hca>[^/\s]+)/device/net/(?P<netdev>\S+)$")
_PORT_FILES = {
    "state": "state",
    "phys_state": "physical_state",
    "link_layer": "link_layer",
    "rate": "rate",
}


def _without_number(value: str) -> str:
    """sysfs' `4: ACTIVE` -> `ACTIVE`."""
    return re.sub(r"^\d+:\s*", "", value.strip())


def parse_infiniband(output: str) -> InfinibandFacts:
    """Parse `INFINIBAND_SCRIPT`'s output; lines it does not know are skipped."""
    ports: dict[tuple[str, int], dict[str, str]] = {}
    gids: dict[tuple[str, int], dict[int, dict[str, str]]] = {}
    netdevs: dict[str, list[str]] = {}
    device_files = []
    for line in output.splitlines():
        line = line.rstrip()
        if line.startswith("dev:"):
            device_files.append(line.removeprefix("dev:"))
            continue
        netdev = _NETDEV_LINE.match(line)
        if netdev:
            netdevs.setdefault(netdev["hca"], []).append(netdev["netdev"])
            continue
        match = _SYSFS_LINE.match(line)
        if match is None:
            continue
        key = (match["hca"], int(match["port"]))
        values = ports.setdefault(key, {})
        file, value = match["file"], match["value"].strip()
        if file in _PORT_FILES:
            values[_PORT_FILES[file]] = _without_number(value) if "state" in file else value
            continue
        entry = re.fullmatch(r"(gids|gid_attrs/types|gid_attrs/ndevs)/(\d+)", file)
        if entry:
            slot = gids.setdefault(key, {}).setdefault(int(entry[2]), {})
            slot[entry[1].rsplit("/", 1)[-1]] = value
    parsed = []
    for (hca, number), values in sorted(ports.items()):
        table = gids.get((hca, number), {})
        port_gids = tuple(
            Gid(index, slot["gids"], slot.get("types"), slot.get("ndevs"))
            for index, slot in sorted(table.items())
            if "gids" in slot
        )
        parsed.append(HcaPort(hca, number, gids=port_gids, **values))
    return InfinibandFacts(
        ports=tuple(parsed),
        netdevs={hca: tuple(names) for hca, names in netdevs.items()},
        device_files=tuple(device_files),
    )


def parse_modules(output: str) -> tuple[str, ...]:
    """The module names of `/proc/modules` lines, sorted (the probe keeps only RDMA_MODULES')."""
    return tuple(sorted({line.split()[0] for line in output.splitlines() if line.strip()}))


# --- one host ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FabricFacts:
    """A host's fabrics: NVLink multicast, NVSwitch fabric state, HCAs, GPUDirect RDMA."""

    multicast: MulticastFacts = MulticastFacts(problem="not probed")
    fabric_states: tuple[GpuFabricState, ...] = ()
    infiniband: InfinibandFacts = InfinibandFacts(read=False)
    modules: tuple[str, ...] | None = None
    """The RDMA modules loaded (None: not read)."""

    @property
    def peer_memory(self) -> bool | None:
        """GPUDirect RDMA's peer-memory module loaded (None: not read)."""
        if self.modules is None:
            return None
        return any(name in self.modules for name in PEER_MEMORY_MODULES)

    def summary(self) -> str:
        """One line for `check` and `plan`."""
        parts = [f"NVLink multicast {self.multicast.verdict.value}"]
        active = self.infiniband.active_ports
        if active:
            layers = "/".join(sorted(self.infiniband.link_layers()))
            parts.append(f"{len(active)} active HCA port(s) ({layers})")
        elif self.infiniband.read:
            parts.append("no active HCA")
        return ", ".join(parts)


def parse_fabric(
    multicast: tuple[int | None, str, str] | None,
    gpu_fabric: tuple[int | None, str, str] | None,
    infiniband: tuple[int | None, str, str] | None,
    modules: tuple[int | None, str, str] | None,
) -> FabricFacts:
    """Combine the probe's fabric sections, each (exit code or None: missing, stdout, stderr)
    or None when the output does not have it."""
    multicast_facts = (
        parse_multicast(multicast[1], multicast[0], multicast[2])
        if multicast is not None
        else MulticastFacts(problem="the probe did not run the multicast program")
    )
    states = parse_fabric_state(gpu_fabric[1]) if gpu_fabric and gpu_fabric[0] == 0 else ()
    ib = (
        parse_infiniband(infiniband[1])
        if infiniband is not None and infiniband[0] == 0
        else InfinibandFacts(read=False)
    )
    loaded = parse_modules(modules[1]) if modules is not None and modules[0] in (0, 1) else None
    return FabricFacts(multicast_facts, states, ib, loaded)


# --- what the facts mean for NCCL in the containers ----------------------------------------


@dataclass(frozen=True)
class RdmaSetup:
    """What a node's container needs for NCCL over InfiniBand/RoCE."""

    ports: tuple[HcaPort, ...]
    environment: dict[str, str]
    devices: tuple[str, ...] = ("/dev/infiniband",)
    note: str | None = None
    """Why a setting was left to NCCL (RoCE ports that disagree on the GID index)."""


def rdma_setup(facts: InfinibandFacts, named: Sequence[str] | None = None) -> RdmaSetup | None:
    """The container settings for this node's active HCA ports, or None when it has none.

    `named`: `network.ib_hcas` (`mlx5_0` or `mlx5_0:1`); only those ports are used. NCCL_IB_HCA
    is written with `=` (exact names): `mlx5_1` alone would also match `mlx5_10`.
    """
    ports = [port for port in facts.active_ports if _is_named(port, named)]
    if not ports:
        return None
    environment = {"NCCL_IB_HCA": "=" + ",".join(port.name for port in ports)}
    note = None
    roce = [port for port in ports if port.roce]
    if roce:
        indices = {port.roce_v2_gid_index() for port in roce}
        if len(indices) == 1 and None not in indices:
            environment["NCCL_IB_GID_INDEX"] = str(indices.pop())
        else:
            shown = ", ".join(f"{p.name}: {p.roce_v2_gid_index()}" for p in roce)
            note = f"RoCE v2 GID index differs or is missing ({shown}): left to NCCL"
    return RdmaSetup(ports=tuple(ports), environment=environment, note=note)


def _is_named(port: HcaPort, named: Iterable[str] | None) -> bool:
    if named is None:
        return True
    return any(name in (port.hca, port.name) for name in named)


# --- NCCL's own word on its transport (NCCL_DEBUG=INFO) -------------------------------------


@dataclass(frozen=True)
class NcclRank:
    """What one NCCL process (one rank) said at NCCL_DEBUG=INFO about how it connects."""

    host: str
    pid: int
    rank: int | None = None
    nodes: int | None = None
    """NCCL's `nNodes`: how many hosts it sees in the communicator."""
    network: str | None = None
    """The network plugin it uses between hosts: `IB` or `Socket` (`Using network X`)."""
    ib_devices: tuple[str, ...] = ()
    """`NET/IB : Using [0]mlx5_0:1/IB ...`: the HCA ports NCCL opened (empty: none found)."""
    transports: tuple[str, ...] = ()
    """How its channels connect: `NET/IB`, `NET/Socket`, `P2P`, `SHM`, ... (`via ...` lines)."""
    gdr: bool | None = None
    """GPUDirect RDMA: a `GDRDMA` channel or `GDR 1`; False on `GDR 0`; None when not said."""

    @property
    def between_nodes(self) -> str | None:
        """`IB` or `Socket` when a channel crossed hosts through the network; None otherwise."""
        if "NET/IB" in self.transports:
            return "IB"
        if "NET/Socket" in self.transports:
            return "Socket"
        return None


_NCCL_LINE = re.compile(r"^(?P<host>[^\s:]+):(?P<pid>\d+):\d+ \[\d+\] NCCL INFO (?P<text>.*)$")
_NCCL_COMM = re.compile(r"\bcomm 0x[0-9a-f]+ rank (?P<rank>\d+) nRanks \d+ nNodes (?P<nodes>\d+)")
_NCCL_VIA = re.compile(r"\bvia (?P<via>\S+)")
_NCCL_IB_DEVICE = re.compile(r"\[\d+\](?P<device>[^\s\[\]/]+)/(?:IB|RoCE)\b")


def parse_nccl_ranks(output: str) -> tuple[NcclRank, ...]:
    """Each NCCL process's transport from NCCL_DEBUG=INFO lines (other lines ignored), in the
    order the processes first spoke."""
    seen: dict[tuple[str, int], dict] = {}
    for line in output.splitlines():
        match = _NCCL_LINE.match(line.strip())
        if match is None:
            continue
        facts = seen.setdefault((match["host"], int(match["pid"])), {"transports": [], "ib": []})
        text = match["text"]
        comm = _NCCL_COMM.search(text)
        if comm:
            # a process may open several communicators (torch's subgroups): the first is the
            # world's, whose rank is the process's own; nNodes is the widest any of them spans
            facts.setdefault("rank", int(comm["rank"]))
            facts["nodes"] = max(facts.get("nodes", 0), int(comm["nodes"]))
        if text.startswith("Using network "):
            facts["network"] = text.removeprefix("Using network ").strip()
        if text.startswith("NET/IB : Using"):
            facts["ib"] += _NCCL_IB_DEVICE.findall(text)
        via = _NCCL_VIA.search(text)
        if via and text.startswith("Channel "):
            parts = via["via"].split("/")
            kind = "/".join(parts[:2]) if parts[0] == "NET" else parts[0]
            if kind not in facts["transports"]:
                facts["transports"].append(kind)
            if any(part.startswith("GDRDMA") for part in parts):  # also `GDRDMA(PCI)`
                facts["gdr"] = True
        gdr = re.search(r"\bGDR (\d)\b", text)
        if gdr and facts.get("gdr") is not True:
            facts["gdr"] = gdr[1] == "1"
    return tuple(
        NcclRank(
            host=host,
            pid=pid,
            rank=facts.get("rank"),
            nodes=facts.get("nodes"),
            network=facts.get("network"),
            ib_devices=tuple(dict.fromkeys(facts["ib"])),
            transports=tuple(facts["transports"]),
            gdr=facts.get("gdr"),
        )
        for (host, pid), facts in seen.items()
    )


def sockets_despite_hcas(ranks: Iterable[NcclRank], active_ports: int) -> str | None:
    """Why it is wrong, when a node with active HCA ports saw NCCL cross hosts over sockets."""
    if active_ports == 0:
        return None
    on_sockets = [r for r in ranks if r.between_nodes == "Socket"]
    if not on_sockets:
        return None
    shown = ", ".join(str(r.rank) for r in on_sockets if r.rank is not None) or "?"
    return (
        f"NCCL used TCP sockets (NET/Socket) between the nodes on rank(s) {shown}, although "
        f"this node has {active_ports} active HCA port(s)"
    )
