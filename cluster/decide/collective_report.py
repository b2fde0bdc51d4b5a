"""The collective check's output read back, and its verdict (pure).

Each node's output holds JSON events marked by `collective.MARK` (several ranks share a node's
stdout, so events are found wherever they start, not only at line starts). From them: every
measurement, as nccl-tests prints it; which ranks joined; and each rank's error with the
interface and address it used; with NCCL, each rank's `transport` event (the INFO lines that
say how NCCL connected, and what the container gives RDMA). The verdict compares the largest
size's bus bandwidth with what the links allow, from facts vcluster already has: the NVLink
count of `nvidia-smi topo -m` within a node; across nodes, the rate of the HCA ports NCCL used
when it used InfiniBand or RoCE, else the NIC speed of the chosen interface. A node with active
HCA ports whose ranks crossed to the other nodes over TCP sockets is a FAIL that names the cause.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cluster.decide.checks.result import CheckResult, Status
from cluster.facts.fabric import HcaPort, NcclRank, parse_nccl_ranks, sockets_despite_hcas
from cluster.facts.gpu import GpuTopology
from cluster.remote.collective import MARK, MIB

NVLINK_GBS_PER_LINK: tuple[tuple[tuple[str, ...], float], ...] = (
    (("B100", "B200", "GB200", "B300"), 50.0),  # NVLink 5
    (("V100", "A100", "A800", "H100", "H800", "H200", "H20", "GH200"), 25.0),  # NVLink 2 to 4
)
"""One NVLink's bandwidth per direction in GB/s, by datacenter GPU. Other GPUs (NVLink bridges
of workstation boards, P100's 20 GB/s) have no expectation rather than a wrong one."""
WARN_BELOW = 0.5
"""A figure below half of what the links allow is a WARN."""
NAME = "collective"
TIME_LIMIT = "time limit passed"
"""What a rank's watchdog says when the deadline passes."""


@dataclass(frozen=True)
class Measurement:
    scope: str  # all, intra (within a node), inter (across nodes)
    group: str
    node: str  # the node of the group's first rank
    size: int
    ranks: int
    seconds: float
    algbw: float  # bytes per second
    busbw: float
    correct: bool


@dataclass(frozen=True)
class RankEvent:
    node: str
    rank: int
    interface: str | None
    address: str | None
    speed_mbps: int | None
    stage: str | None = None
    error: str | None = None
    master: str | None = None


@dataclass(frozen=True)
class RankTransport:
    """How one NCCL rank connected (its INFO lines, parsed), and what its container gives RDMA."""

    node: str
    rank: int
    nccl: NcclRank
    lines: tuple[str, ...] = ()
    devices: tuple[str, ...] | None = None
    """`/dev/infiniband` in the container (None: no such folder)."""
    memlock: int | None = None
    """The container's memlock limit in bytes; -1: unlimited; None: not read."""
    environment: Mapping[str, str] = field(default_factory=dict)
    """NCCL_IB_DISABLE, NCCL_NET, NCCL_IB_HCA, NCCL_IB_GID_INDEX, where the container sets them."""

    @property
    def link(self) -> str | None:
        """`InfiniBand`, `RoCE` or `Socket` between the nodes; None when no channel crossed."""
        between = self.nccl.between_nodes
        if between == "IB":
            opened = " ".join(line for line in self.lines if "NET/IB : Using" in line)
            return "RoCE" if "/RoCE" in opened else "InfiniBand"
        return between

    @property
    def warnings(self) -> tuple[str, ...]:
        """NCCL's own WARN lines, without their `host:pid:tid [dev] NCCL WARN` prefix."""
        return tuple(
            line.split(" NCCL WARN ", 1)[1].strip() for line in self.lines if " NCCL WARN " in line
        )


@dataclass(frozen=True)
class CollectiveRun:
    """Everything the nodes said, by kind."""

    measurements: tuple[Measurement, ...] = ()
    joined: tuple[RankEvent, ...] = ()
    errors: tuple[RankEvent, ...] = ()
    done: tuple[RankEvent, ...] = ()
    stopped: Mapping[str, str] = field(default_factory=dict)
    """Per node: why its launcher stopped every rank there (a rank that failed, the deadline)."""
    silent: tuple[str, ...] = ()
    """Nodes that said nothing at all (the container is not running, docker exec failed)."""
    notes: Mapping[str, str] = field(default_factory=dict)
    """Per node: what it printed besides events, when it said nothing else (the cause)."""
    transports: tuple[RankTransport, ...] = ()
    """Each NCCL rank's transport, once per rank (none with gloo)."""

    def node_transports(self, node: str) -> tuple[RankTransport, ...]:
        return tuple(t for t in self.transports if t.node == node)


def parse_events(text: str) -> list[dict]:
    """Every event in one node's output, wherever it starts (ranks share a stdout)."""
    decoder = json.JSONDecoder()
    events = []
    start = text.find(MARK)
    while start != -1:
        try:
            event, _ = decoder.raw_decode(text, start + len(MARK))
            if isinstance(event, dict):
                events.append(event)
        except ValueError:
            pass  # cut off by a kill: what came before still counts
        start = text.find(MARK, start + len(MARK))
    return events


def read_run(outputs: Mapping[str, str]) -> CollectiveRun:
    """The run from each node's output (node name -> text); malformed events are passed over."""
    measurements, silent, notes = [], [], {}
    ranks: dict[str, list[RankEvent]] = {"joined": [], "error": [], "done": []}
    stopped = {}
    transports: dict[tuple[str, int], RankTransport] = {}
    for node, text in outputs.items():
        events = parse_events(text)
        if not events:
            silent.append(node)
            notes[node] = " | ".join(text.strip().splitlines()[-3:])[:300] or "no output"
        for event in events:
            kind = event.get("event")
            try:
                if kind == "result":
                    measurements.append(_measurement(event))
                elif kind in ranks:
                    ranks[str(kind)].append(_rank_event(event))
                elif kind == "stopped":
                    stopped[node] = str(event.get("error"))
                elif kind == "transport":
                    found = _rank_transport(event)
                    transports.setdefault((found.node, found.rank), found)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a line cut or mangled: the rest of the run still counts
    return CollectiveRun(
        tuple(measurements),
        tuple(ranks["joined"]),
        tuple(ranks["error"]),
        tuple(ranks["done"]),
        stopped,
        tuple(silent),
        notes,
        tuple(transports.values()),
    )


def _rank_transport(event: Mapping) -> RankTransport:
    lines = tuple(str(line) for line in event.get("lines") or ())
    rank, node = int(event["rank"]), str(event["node"])
    parsed = parse_nccl_ranks("\n".join(lines))
    # one process per rank: its NCCL lines are its own; its rank is the program's (global) one
    nccl = dataclasses.replace(parsed[0], rank=rank) if parsed else NcclRank(node, -1, rank)
    rdma = event.get("rdma") or {}
    devices = rdma.get("devices")
    return RankTransport(
        node=node,
        rank=rank,
        nccl=nccl,
        lines=lines,
        devices=tuple(str(d) for d in devices) if devices is not None else None,
        memlock=rdma.get("memlock"),
        environment={str(k): str(v) for k, v in (rdma.get("environment") or {}).items()},
    )


def _measurement(event: Mapping) -> Measurement:
    return Measurement(
        scope=str(event["scope"]),
        group=str(event["group"]),
        node=str(event["node"]),
        size=int(event["size"]),
        ranks=int(event["ranks"]),
        seconds=float(event["seconds"]),
        algbw=float(event["algbw"]),
        busbw=float(event["busbw"]),
        correct=bool(event["correct"]),
    )


def _rank_event(event: Mapping) -> RankEvent:
    return RankEvent(
        node=str(event.get("node")),
        rank=int(event.get("rank", -1)),
        interface=event.get("interface"),
        address=event.get("address"),
        speed_mbps=event.get("speed_mbps"),
        stage=event.get("stage"),
        error=event.get("error"),
        master=event.get("master"),
    )


def nvlink_bandwidth(
    topology: GpuTopology | None, gpu_name: str | None
) -> tuple[float, str] | None:
    """What NVLink allows between a node's GPUs (bytes/s per direction) and why; None over PCIe."""
    if topology is None or topology.interconnect != "NVLink":
        return None
    counts = [
        int(link[2:]) for (a, b), link in topology.links.items() if a != b and link[2:].isdigit()
    ]
    if not counts:
        return None
    per_link = next(
        (
            gbs
            for models, gbs in NVLINK_GBS_PER_LINK
            if gpu_name and any(m in gpu_name for m in models)
        ),
        None,
    )
    if per_link is None:
        return None
    links = min(counts)
    return links * per_link * 1e9, f"NV{links}: {links} x {per_link:g} GB/s"


def nic_bandwidth(run: CollectiveRun) -> tuple[float, str] | None:
    """What the slowest node's chosen interface allows (bytes/s), when Linux says its speed."""
    speeds = {(e.node, e.interface, e.speed_mbps) for e in run.joined}
    known = [(node, interface, mbps) for node, interface, mbps in speeds if mbps]
    if not known or len(known) < len(speeds):
        return None
    node, interface, mbps = min(known, key=lambda s: s[2])
    return mbps * 1e6 / 8, f"{interface} at {mbps / 1000:g} Gb/s on {node}"


@dataclass(frozen=True)
class NodeHcas:
    """What the host probe found of a node's InfiniBand/RoCE, for judging NCCL's transport."""

    ports: tuple[HcaPort, ...] = ()
    """The active ports (those `network.ib_hcas` names, where it names some)."""
    host_devices: tuple[str, ...] = ()
    """`/dev/infiniband` on the host."""
    peer_memory: bool | None = None
    """`nvidia_peermem` loaded (None: not read)."""


def rdma_bandwidth(
    run: CollectiveRun, nodes: Sequence[str], hcas: Mapping[str, NodeHcas]
) -> tuple[float, str] | None:
    """What the slowest node's HCA ports that NCCL used allow (bytes/s), from their sysfs rate;
    None when a node's rate is not known."""
    found = []
    for node in nodes:
        ranks = run.node_transports(node)
        opened = {device for t in ranks for device in t.nccl.ib_devices}
        ports = (hcas.get(node) or NodeHcas()).ports
        used = [p for p in ports if p.name in opened] or list(ports)
        rates = [p.rate_gbit for p in used]
        if not used or any(rate is None for rate in rates):
            return None
        link = next((t.link for t in ranks if t.link in ("InfiniBand", "RoCE")), "InfiniBand")
        found.append((sum(r for r in rates if r), node, used, link))
    if not found:
        return None
    total, node, used, link = min(found, key=lambda f: f[0])
    distinct = sorted({p.rate_gbit or 0.0 for p in used})
    shown = f"{len(used)} x {distinct[0]:g} Gb/s" if len(distinct) == 1 else f"{total:g} Gb/s"
    names = ", ".join(p.name for p in used)
    return total * 1e9 / 8, f"{shown} {link} ({names}) on {node}"


def transport_rows(
    run: CollectiveRun,
    nodes: Sequence[str],
    hcas: Mapping[str, NodeHcas],
    *,
    ib_disabled: bool = False,
) -> list[CheckResult]:
    """Per node, how NCCL crossed to the other nodes (InfiniBand, RoCE or TCP sockets, and
    GPUDirect RDMA); a FAIL, with the cause, where the node has active HCA ports but its ranks
    used sockets. `ib_disabled`: the inventory's env turns InfiniBand off on purpose."""
    if len(nodes) < 2:
        return []
    rows = []
    for node in nodes:
        ranks = run.node_transports(node)
        if not ranks:
            continue
        found = hcas.get(node) or NodeHcas()
        links = _links(ranks)
        data = {
            "transport": "Socket" if "Socket" in links else next(iter(sorted(links)), None),
            "gdr": _gdr(ranks),
            "ib_devices": sorted({d for t in ranks for d in t.nccl.ib_devices}),
            "ranks": sorted(t.rank for t in ranks),
            "nccl_lines": [line for t in ranks for line in t.lines],
        }
        if "Socket" in links and found.ports:
            row = _sockets_despite_hcas(node, ranks, found, ib_disabled)
        elif "Socket" in links:
            interfaces = sorted({i for i in map(_socket_interface, ranks) if i is not None})
            over = f" over {', '.join(interfaces)}" if interfaces else ""
            row = CheckResult(
                NAME,
                Status.PASS,
                f"NCCL crossed to the other nodes over TCP sockets{over} (no active HCA here)",
                node,
            )
        elif links:
            link = "RoCE" if "RoCE" in links else "InfiniBand"
            devices = ", ".join(sorted({d for t in ranks for d in t.nccl.ib_devices})) or "?"
            row = CheckResult(
                NAME,
                Status.PASS,
                f"NCCL crossed to the other nodes over {link} "
                f"({devices}); {_gdr_text(_gdr(ranks), found)}",
                node,
            )
        else:
            row = CheckResult(
                NAME,
                Status.PASS,
                "NCCL's INFO lines show no channel of this "
                "node's ranks to another node: transport not known",
                node,
            )
        rows.append(dataclasses.replace(row, data=data))
    return rows


def _links(ranks: Sequence[RankTransport]) -> set[str]:
    """How these ranks crossed to other nodes: by their channels, else by NCCL's network."""
    found = set()
    for rank in ranks:
        link = rank.link or {"IB": "InfiniBand", "Socket": "Socket"}.get(rank.nccl.network or "")
        if link:
            found.add(link)
    return found


def _gdr(ranks: Sequence[RankTransport]) -> bool | None:
    """GPUDirect RDMA on every rank that crossed over InfiniBand/RoCE (None: none said)."""
    said = [
        t.nccl.gdr for t in ranks if t.link in ("InfiniBand", "RoCE") and t.nccl.gdr is not None
    ]
    return all(said) if said else None


def _gdr_text(gdr: bool | None, found: NodeHcas) -> str:
    if gdr:
        return "GPUDirect RDMA: yes"
    if gdr is None:
        return "GPUDirect RDMA: not said"
    why = " (nvidia_peermem is not loaded)" if found.peer_memory is False else ""
    return f"GPUDirect RDMA: no{why}, NCCL stages through host memory"


def _socket_interface(rank: RankTransport) -> str | None:
    """`eth0` of `NET/Socket : Using [0]eth0:10.0.0.1<0>`."""
    for line in rank.lines:
        found = re.search(r"NET/Socket : Using \[\d+\]([^:\s]+)", line)
        if found:
            return found[1]
    return None


def _sockets_despite_hcas(
    node: str, ranks: Sequence[RankTransport], found: NodeHcas, ib_disabled: bool
) -> CheckResult:
    """The FAIL (a WARN where the inventory turned InfiniBand off), with the first cause found
    in what the container said: its environment, its devices, its memlock limit, NCCL's words."""
    on_sockets = [t for t in ranks if _links([t]) == {"Socket"}]
    what = sockets_despite_hcas([t.nccl for t in on_sockets], len(found.ports)) or (
        f"NCCL used TCP sockets between the nodes, although this node has {len(found.ports)} "
        "active HCA port(s)"
    )
    ports = ", ".join(p.name for p in found.ports)
    what += f" ({ports})"
    if ib_disabled:
        return CheckResult(
            NAME,
            Status.WARN,
            f"{what}: env NCCL_IB_DISABLE=1 asks for it",
            node,
            "remove NCCL_IB_DISABLE from the inventory's env, then "
            "`vcluster up --recreate`, to use them",
        )
    first = on_sockets[0] if on_sockets else ranks[0]
    cause, fix = _sockets_cause(node, first, found)
    return CheckResult(NAME, Status.FAIL, f"{what}: {cause}", node, fix)


def _sockets_cause(node: str, rank: RankTransport, found: NodeHcas) -> tuple[str, str]:
    recreate = (
        "run `vcluster up --recreate`: the containers get /dev/infiniband, memlock unlimited "
        "and IPC_LOCK (docs/gpu-fabrics.md)"
    )
    environment = rank.environment
    if environment.get("NCCL_IB_DISABLE", "0") not in ("", "0"):
        return (
            f"the container's environment sets NCCL_IB_DISABLE={environment['NCCL_IB_DISABLE']} "
            "(the image's, not the inventory's)",
            "set env NCCL_IB_DISABLE: '0' in the inventory, then `vcluster up --recreate`",
        )
    if environment.get("NCCL_NET", "").lower() == "socket":
        return (
            f"the container's environment sets NCCL_NET={environment['NCCL_NET']}",
            "remove NCCL_NET from the image or the inventory's env, then `vcluster up --recreate`",
        )
    if not any(device.startswith("uverbs") for device in rank.devices or ()):
        shown = "no /dev/infiniband" if rank.devices is None else "no /dev/infiniband/uverbs*"
        if any(device.startswith("uverbs") for device in found.host_devices):
            return f"the container has {shown} (created without them)", recreate
        return (
            f"the container has {shown}, nor has the host",
            f"load the RDMA user-space modules on {node} (`modprobe ib_uverbs rdma_ucm`, and "
            "list them in /etc/modules-load.d/), then `vcluster up --recreate`",
        )
    if rank.memlock is not None and rank.memlock != -1:
        return (
            f"the container's memlock limit is {_bytes(rank.memlock)} (RDMA pins memory)",
            recreate,
        )
    said = (
        rank.warnings[0]
        if rank.warnings
        else next(
            (
                line.split(" NCCL INFO ", 1)[1]
                for line in rank.lines
                if "NET/IB : No device" in line
            ),
            "NCCL said nothing of InfiniBand",
        )
    )
    return (
        f"NCCL found no usable HCA ({said[:200]})",
        f"check the RDMA modules on {node} (ib_uverbs, rdma_ucm, mlx5_ib: `lsmod`), that the "
        "container's NCCL_IB_HCA names active ports (`vcluster plan`), and NCCL's own lines "
        "(`vcluster check --collective --json`, the row's data)",
    )


def _bytes(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // 1024} KiB"


def verdicts(
    run: CollectiveRun,
    *,
    backend: str,
    nodes: Sequence[str],
    intra_limit: Mapping[str, tuple[float, str] | None],
    join_timeout_s: float,
    hcas: Mapping[str, NodeHcas] | None = None,
    ib_disabled: bool = False,
) -> list[CheckResult]:
    """PASS / WARN / FAIL rows: every node that could not take part, wrong sums, and for each
    group its largest size's bus bandwidth against what the links allow; with NCCL on several
    nodes, each node's transport (a FAIL where it has active HCA ports but used sockets).

    `intra_limit[node]`: what that node's GPU links allow (None: no expectation, e.g. PCIe).
    `hcas[node]`: its active HCA ports (none: NCCL is expected to use sockets).
    """
    hcas = hcas or {}
    transports = transport_rows(run, nodes, hcas, ib_disabled=ib_disabled)
    results = _join_failures(run, nodes, join_timeout_s)
    results += _stopped_after_joining(run)
    wrong = [m for m in run.measurements if not m.correct]
    results += [
        CheckResult(
            NAME,
            Status.FAIL,
            f"{m.scope} ({m.group}): the all-reduce of {size_text(m.size)} gave wrong sums",
            m.node,
            "a GPU or a link corrupts data: check ECC errors (nvidia-smi -q), run "
            "dcgmi diag, and take the node out until it is fixed",
        )
        for m in wrong
    ]
    if results:
        return results + [r for r in transports if r.status is not Status.PASS]
    results = [r for r in transports if r.status is Status.FAIL]
    if not run.measurements:
        return [
            CheckResult(
                NAME,
                Status.FAIL,
                "every rank joined, but no figure came back",
                nodes[0] if nodes else None,
                "run `vcluster check --collective` again; if it repeats, run it with a "
                "smaller --max-size",
            ),
            *results,
        ]
    rdma = backend != "gloo" and _crossed_over_rdma(run, nodes)
    if backend == "gloo":
        inter_limit = None
    elif rdma:
        inter_limit = rdma_bandwidth(run, nodes, hcas)
    else:
        inter_limit = nic_bandwidth(run)
    # The inter-node groups (one per local GPU) run at once and share each node's NIC.
    sharing = len({m.group for m in run.measurements if m.scope == "inter"}) or 1
    if inter_limit is not None and sharing > 1:
        allowed, basis = inter_limit
        inter_limit = (allowed / sharing, f"{basis}, shared by {sharing} groups at once")
    for (scope, group), largest in _largest(run.measurements).items():
        figures = [m for m in run.measurements if (m.scope, m.group) == (scope, group)]
        elsewhere = across = False
        if scope == "intra" or (scope == "all" and len(nodes) == 1):
            limit = intra_limit.get(largest.node)
        elif scope == "inter" or (scope == "all" and largest.ranks == len(nodes)):
            limit, across = inter_limit, True
        else:  # `all` across GPUs and nodes: the `intra` and `inter` rows judge it
            limit, elsewhere = None, True
        row = _bandwidth_row(
            largest, limit, backend, judged_elsewhere=elsewhere, rdma=rdma and across
        )
        results.append(dataclasses.replace(row, data=_figures(figures, limit)))
    return results + [r for r in transports if r.status is not Status.FAIL]


def _crossed_over_rdma(run: CollectiveRun, nodes: Sequence[str]) -> bool:
    """Every node's ranks crossed over InfiniBand or RoCE (none over sockets)."""
    if len(nodes) < 2:
        return False
    for node in nodes:
        links = _links(run.node_transports(node))
        if not links or not links <= {"InfiniBand", "RoCE"}:
            return False
    return True


def _join_failures(run: CollectiveRun, nodes: Sequence[str], timeout_s: float) -> list[CheckResult]:
    joined = {e.node for e in run.joined}
    failed = [n for n in nodes if n not in joined]
    head = nodes[0] if nodes else None
    waited = [e for e in run.errors if e.node == head and e.rank == 0 and _waited(e)]
    if head in failed and len(failed) > 1 and waited:
        # the head only waited for the others: they are the ones to name
        failed.remove(head)
    rows = []
    for node in failed:
        own = [e for e in run.errors if e.node == node]
        if node in run.silent:
            detail = f"no result came back from it: {run.notes.get(node, 'no output')}"
            fix = (
                "check that the cluster's container runs there (`vcluster status`); if the check "
                "outlived collective.time_limit_s, a rank hung inside NCCL or gloo: look at the "
                "node's GPUs and links"
            )
        elif own and own[0].master is None:  # its time limit ended it before it could say more
            first = own[0]
            detail = f"rank {first.rank} stopped during the {first.stage}: {first.error}"
            fix = "raise collective.time_limit_s (and keep join_timeout_s below it), then again"
        elif own:
            first = own[0]
            port = first.master.rsplit(":", 1)[-1] if first.master else "?"
            detail = (
                f"rank {first.rank} could not join the all-reduce ({first.stage}) at "
                f"{first.master} over {first.interface or 'the default route'} "
                f"({first.address or 'address unknown'}) within {timeout_s:g} s: {first.error}"
            )
            fix = (
                f"check that TCP {port} is free on {node} (the head) and that NCCL or gloo may bind "
                f"on {first.interface or 'its interface'}"
                if node == head
                else f"check the route from {node} to the head and that TCP {port} and NCCL's "
                "ports are open between the nodes; "
                f"{first.interface or 'the interface'} must be the one that reaches the other "
                "nodes (network.interface)"
            )
        else:
            detail = "no word of it joining came back before the time limit"
            fix = "run the check again; if it repeats, `vcluster exec --node NODE` and look there"
        rows.append(CheckResult(NAME, Status.FAIL, detail, node, fix))
    return rows


def _stopped_detail(why: str, seen: list[RankEvent]) -> str:
    detail = f"its ranks were stopped: {why}"
    if seen:
        detail += f" (rank {seen[0].rank} then saw: {(seen[0].error or '')[:200]})"
    return detail


def _waited(event: RankEvent) -> bool:
    """The rendezvous' own timeout: rank 0 waited for ranks that did not come."""
    return event.stage == "join" and "waiting for clients" in (event.error or "")


def _stopped_after_joining(run: CollectiveRun) -> list[CheckResult]:
    """Ranks that joined and did not finish, blaming the cause before those that waited for it:
    a rank's own error, then a launcher that stopped its node's ranks, then ranks that went
    silent (killed), and only then the ranks whose time ran out while they waited."""
    joined = {(e.node, e.rank) for e in run.joined}
    finished = {(e.node, e.rank) for e in run.done}
    errors = [e for e in run.errors if (e.node, e.rank) in joined]
    own = [e for e in errors if e.error != TIME_LIMIT]
    said = {(e.node, e.rank) for e in errors}
    silent = sorted(k for k in joined - finished - said if k[0] not in run.stopped)
    fix = (
        "a rank that joined and then stopped: a GPU fault, GPU memory taken by something else "
        "(vLLM), or a link that went down (nvidia-smi -q, the kernel log)"
    )
    # A launcher that stopped its node names the rank that failed first; the errors of the
    # ranks it stopped (their peer gone) only follow from it.
    rows = [
        CheckResult(
            NAME, Status.FAIL, _stopped_detail(why, [e for e in own if e.node == node]), node, fix
        )
        for node, why in run.stopped.items()
    ]
    rows += [
        CheckResult(
            NAME, Status.FAIL, f"rank {e.rank} stopped during the {e.stage}: {e.error}", e.node, fix
        )
        for e in own
        if e.node not in run.stopped
    ]
    rows += [
        CheckResult(NAME, Status.FAIL, f"rank {rank} joined, then went silent (killed?)", node, fix)
        for node, rank in silent
    ]
    if rows:
        return rows
    return [
        CheckResult(
            NAME,
            Status.FAIL,
            f"rank {e.rank} waited past the time limit during the {e.stage}",
            e.node,
            "raise collective.time_limit_s (a slow link or large sizes), or lower "
            "--max-size; if it repeats, a rank hangs: look at its node",
        )
        for e in errors
        if e.error == TIME_LIMIT
    ]


def _largest(measurements: Sequence[Measurement]) -> dict[tuple[str, str], Measurement]:
    largest: dict[tuple[str, str], Measurement] = {}
    for m in measurements:
        key = (m.scope, m.group)
        if key not in largest or m.size > largest[key].size:
            largest[key] = m
    return largest


def _bandwidth_row(
    m: Measurement,
    limit: tuple[float, str] | None,
    backend: str,
    *,
    judged_elsewhere: bool,
    rdma: bool = False,
) -> CheckResult:
    figure = f"{m.scope} ({m.group}, {m.ranks} ranks): {size_text(m.size)} busbw {bandwidth_text(m.busbw)}"
    if limit is None:
        why = "gloo on CPUs" if backend == "gloo" else "link speed unknown"
        if rdma:
            why = "HCA rate unknown"
        if backend != "gloo" and judged_elsewhere:
            why = "the intra and inter rows judge the links"
        return CheckResult(
            NAME, Status.PASS, f"{figure}; sums right ({why}: no expectation)", m.node
        )
    allowed, basis = limit
    detail = f"{figure} of {bandwidth_text(allowed)} the links allow ({basis}); sums right"
    node = None if m.scope == "inter" else m.node  # across nodes: not one node's figure
    if m.busbw > allowed and not rdma:
        detail += " (faster than the interface: NCCL uses another transport, e.g. InfiniBand)"
    if m.busbw >= WARN_BELOW * allowed:
        return CheckResult(NAME, Status.PASS, detail, node)
    if rdma:
        fix = (
            "check the HCA ports' rate and error counters (`ibstat`, `perfquery`), that "
            "NCCL_IB_HCA names every port (`vcluster plan`) and GPUDirect RDMA (nvidia_peermem); "
            "a busy fabric or a congested switch shows here too"
        )
    elif m.scope == "intra" or (m.ranks > 1 and "NV" in basis):
        fix = (
            "check NVLink (nvidia-smi nvlink --status), that NCCL_P2P_DISABLE is not set and the "
            "GPUs are not throttled (nvidia-smi -q -d PERFORMANCE)"
        )
    else:
        fix = (
            "check the NIC's speed and that NCCL uses the right interface (NCCL_SOCKET_IFNAME, "
            "network.interface) or InfiniBand (NCCL_IB_HCA); a busy or shaped link shows here too"
        )
    return CheckResult(NAME, Status.WARN, f"{detail}: below half", node, fix)


def _figures(group: Sequence[Measurement], limit: tuple[float, str] | None) -> dict:
    first = group[0]
    return {
        "scope": first.scope,
        "group": first.group,
        "ranks": first.ranks,
        "expected_busbw": limit[0] if limit else None,
        "sizes": [
            {
                "size": m.size,
                "seconds": m.seconds,
                "algbw": m.algbw,
                "busbw": m.busbw,
                "correct": m.correct,
            }
            for m in sorted(group, key=lambda m: m.size)
        ],
    }


def summary(run: CollectiveRun) -> list[dict]:
    """The largest size's figures per group: what the exporter's gauges show."""
    return [
        {
            "scope": m.scope,
            "group": m.group,
            "node": m.node,
            "size": m.size,
            "busbw": m.busbw,
            "correct": m.correct,
        }
        for m in _largest(run.measurements).values()
    ]


def transport_summary(run: CollectiveRun) -> dict[str, dict]:
    """Per node, how NCCL crossed to the other nodes: for `status` and the exporter."""
    found: dict[str, dict] = {}
    for node in dict.fromkeys(t.node for t in run.transports):
        ranks = run.node_transports(node)
        links = _links(ranks)
        found[node] = {
            "transport": "Socket" if "Socket" in links else next(iter(sorted(links)), None),
            "gdr": _gdr(ranks),
            "ib_devices": sorted({d for t in ranks for d in t.nccl.ib_devices}),
        }
    return found


def size_text(size: int) -> str:
    """A message size as nccl-tests names it: `4 MiB`, `1 GiB`."""
    return f"{size // (1024 * MIB)} GiB" if size >= 1024 * MIB else f"{size // MIB} MiB"


def bandwidth_text(bytes_per_s: float) -> str:
    """A bandwidth in GB/s, one decimal."""
    return f"{bytes_per_s / 1e9:.1f} GB/s"
