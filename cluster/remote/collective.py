"""vcluster's all-reduce check, the program every node runs: `python3 -c <this source> CONFIG`.

Sent to the nodes as it is and run inside the cluster's own containers (`docker exec`), so it
gets exactly the environment vLLM gets (`VLLM_HOST_IP`, `NCCL_SOCKET_IFNAME`,
`GLOO_SOCKET_IFNAME`, the inventory's `env`). It uses the standard library and the image's own
torch (every vLLM image has it): nothing new on the nodes.

One process per GPU with NCCL, or one per node with gloo on CPUs. Rank 0 (the head's first)
holds the rendezvous. For each size (doubling by 4) it reports, as nccl-tests does, the time of
one all-reduce, the algorithm bandwidth (bytes / time) and the bus bandwidth (algbw x 2(n-1)/n),
and whether every rank got the right sum; with GPUs on several nodes, also within each node and
across the nodes. Every line it means for vcluster starts with `MARK` and is one JSON event;
every rank ends with a `done` event or an `error` event that says where it stopped.

With NCCL, each rank writes NCCL's INFO log (`NCCL_DEBUG=INFO`, the INIT and NET subsystems) to
its own file and, before its last event, sends a `transport` event: the few lines of it that say
how NCCL connected (the network it chose, the HCA ports it opened, one line per distinct `via`
of its channels, GPUDirect RDMA, NCCL's warnings), bounded in number and length, and what the
container gives RDMA (`/dev/infiniband`, the memlock limit, NCCL's IB settings). vcluster reads
them with `cluster.facts.fabric.parse_nccl_ranks`. The log itself never leaves the container.

It never outlives its time limit, whatever a rank is blocked in: each rank has a watchdog thread
(a signal handler would wait for a CUDA or NCCL call to return), and the launcher, which leads
the process group, kills the whole group when a rank fails or the deadline passes. Its PID is in
`PID_FILE` for vcluster's own stop script, the last resort.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import signal
import sys
import threading
import time
from typing import Any

MARK = "VCLUSTER-COLLECTIVE "
PID_FILE = "/tmp/vcluster-collective.pid"  # in the container; one check at a time
MIB = 1 << 20
WARMUP = 2
PATTERN = 1024
"""The sum check's values: position % PATTERN + rank + 1, exact in float32 for any world size
vcluster plans (sums stay far below 2**24)."""
LAUNCHER_GRACE_S = 5.0
"""After the deadline, the ranks' watchdogs go first; then the launcher kills the group."""
PR_SET_PDEATHSIG = 1
NCCL_LOG = "/tmp/vcluster-collective-nccl.{rank}.log"
"""Each rank's NCCL INFO log (NCCL_DEBUG_FILE), read back for its transport, then removed."""
TRANSPORT_LINES = 48
TRANSPORT_WARNINGS = 5
LINE_CHARS = 400
TRANSPORT_MARKERS = ("NET/IB : ", "NET/Socket : ", "Using network ", " nNodes ", " via ", " GDR ")
"""The INFO lines that say how NCCL connected; every other line stays in the container."""
RDMA_ENVIRONMENT = ("NCCL_IB_DISABLE", "NCCL_NET", "NCCL_IB_HCA", "NCCL_IB_GID_INDEX")


def bus_bandwidth(algbw: float, ranks: int) -> float:
    """nccl-tests' all-reduce bus bandwidth: what each link carries, comparable across sizes."""
    return algbw * 2 * (ranks - 1) / ranks if ranks > 1 else algbw


def iterations_for(size: int) -> int:
    """Timed iterations: many for small sizes (latency-bound, noisy), few for large ones."""
    return max(2, min(20, (256 * MIB) // max(size, 1)))


def emit(event: dict[str, Any]) -> None:
    """One event line in one write(2): ranks share a stdout, and a watchdog may write while
    the rank's own thread is writing (Python's buffered stdout would refuse the reentry)."""
    os.write(1, (MARK + json.dumps(event, sort_keys=True) + "\n").encode())


def interface_facts() -> dict[str, Any]:
    """The interface and address this node uses, and the interface's speed when Linux says."""
    interface = os.environ.get("NCCL_SOCKET_IFNAME") or os.environ.get("GLOO_SOCKET_IFNAME")
    speed = None
    if interface:
        try:
            with open(f"/sys/class/net/{interface}/speed") as handle:
                speed = int(handle.read().strip())
        except (OSError, ValueError):
            speed = None  # virtual interfaces and some drivers do not say
    return {
        "interface": interface,
        "address": os.environ.get("VLLM_HOST_IP"),
        "speed_mbps": speed if speed and speed > 0 else None,
    }


def log_nccl_to_file(rank: int) -> str:
    """Point NCCL's INFO log of this process at its own file (before NCCL starts)."""
    path = NCCL_LOG.format(rank=rank)
    with contextlib.suppress(OSError):
        os.unlink(path)  # a check before this one, stopped before it could remove it
    # INFO lines without a timestamp (NCCL's default; an image may ask for more): the parser
    # reads them from their `host:pid:tid [dev] NCCL INFO` start
    os.environ.update(
        {
            "NCCL_DEBUG": "INFO",
            "NCCL_DEBUG_SUBSYS": "INIT,NET",
            "NCCL_DEBUG_FILE": path,
            "NCCL_DEBUG_TIMESTAMP_LEVELS": "WARN",
        }
    )
    return path


def transport_lines(path: str) -> list[str]:
    """The lines of a rank's NCCL log that tell its transport: each once (a channel line per
    distinct `via ...`), NCCL's first warnings, at most TRANSPORT_LINES of LINE_CHARS."""
    kept: list[str] = []
    seen = set()
    warnings = 0
    try:
        with open(path, errors="replace") as handle:
            for line in handle:
                line = line.rstrip("\n")
                if " NCCL WARN " in line:
                    if warnings >= TRANSPORT_WARNINGS:
                        continue
                    warnings += 1
                    key = line.split(" NCCL WARN ", 1)[1]
                elif " NCCL INFO " in line and any(m in line for m in TRANSPORT_MARKERS):
                    text = line.split(" NCCL INFO ", 1)[1]
                    via = text.find(" via ")
                    key = text[via:] if text.startswith("Channel ") and via != -1 else text
                else:
                    continue
                if key not in seen:
                    seen.add(key)
                    kept.append(line[:LINE_CHARS])
                if len(kept) >= TRANSPORT_LINES:
                    break
    except OSError:
        return []
    return kept


def rdma_facts() -> dict[str, Any]:
    """What this container gives NCCL for InfiniBand/RoCE: its /dev/infiniband files (None:
    no such folder), the memlock limit in bytes (-1: unlimited), NCCL's IB settings."""
    try:
        devices: list[str] | None = sorted(os.listdir("/dev/infiniband"))
    except OSError:
        devices = None
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        memlock: int | None = -1 if soft == resource.RLIM_INFINITY else soft
    except (ImportError, OSError, ValueError):
        memlock = None
    environment = {name: os.environ[name] for name in RDMA_ENVIRONMENT if name in os.environ}
    return {"devices": devices, "memlock": memlock, "environment": environment}


class Transport:
    """Sends a rank's `transport` event once, from whichever thread ends the rank first."""

    def __init__(self, nccl_log: str | None, where: dict[str, Any]) -> None:
        self.nccl_log = nccl_log
        self.where = where
        self.lock = threading.Lock()

    def report(self) -> None:
        with self.lock:
            path, self.nccl_log = self.nccl_log, None
        if path is None:
            return
        lines = transport_lines(path)
        with contextlib.suppress(OSError):
            os.unlink(path)
        emit({"event": "transport", "lines": lines, "rdma": rdma_facts(), **self.where})


class Watchdog:
    """Ends this rank at the deadline, from a thread: the main thread may be stuck in C."""

    def __init__(self, deadline: float, where: dict[str, Any], transport: Transport) -> None:
        self.stage = "start"
        self.where = where
        self.transport = transport
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
        timer.daemon = True
        timer.start()

    def _expire(self) -> None:
        try:
            self.transport.report()  # a rank stuck connecting: how NCCL tried is the clue
        finally:
            emit(
                {"event": "error", "stage": self.stage, "error": "time limit passed", **self.where}
            )
            os._exit(3)


def run_rank(config: dict[str, Any], local_rank: int, deadline: float) -> int:
    """One rank: join, then all-reduce every size in every group it belongs to. Every way it
    stops is an event: `done`, or `error` with the stage."""
    nnodes, local_size = config["nnodes"], config["local_size"]
    rank, world = config["node_rank"] * local_size + local_rank, nnodes * local_size
    where = {"rank": rank, "node": config["node"], **interface_facts()}
    nccl_log = log_nccl_to_file(rank) if config["backend"] == "nccl" else None
    transport = Transport(nccl_log, where)
    watchdog = Watchdog(deadline, where, transport)
    address, port = config["master"]
    joined = False
    try:
        watchdog.stage = "join"
        import torch
        import torch.distributed as dist

        device = torch.device("cpu")
        if config["backend"] == "nccl":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        # The rendezvous waits `join_timeout_s`; every collective after it, the time limit.
        store = dist.TCPStore(
            address,
            port,
            world,
            is_master=rank == 0,
            timeout=datetime.timedelta(seconds=config["join_timeout_s"]),
        )
        dist.init_process_group(
            config["backend"],
            store=store,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=config["time_limit_s"]),
        )
        watchdog.stage = "first all-reduce"
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)  # NCCL connects here, not in init
        _synchronize(torch, device)
        joined = True
        emit({"event": "joined", "world": world, **where})
        watchdog.stage = "making the groups"
        groups = _groups(dist, nnodes, local_size, rank)
        for size in config["sizes"]:
            for scope, label, group, members in groups:
                watchdog.stage = f"{scope} all-reduce of {size // MIB} MiB"
                result = _measure(torch, dist, device, size, group, members, rank)
                if rank == members[0]:
                    emit(
                        {
                            "event": "result",
                            "scope": scope,
                            "group": label,
                            "node": config["node"],
                            **result,
                        }
                    )
        watchdog.stage = "finish"
        transport.report()  # before the communicators go: every channel has connected by now
        dist.destroy_process_group()
    except Exception as exc:  # every way a rank stops is reported, with where it was
        transport.report()
        error = {
            "event": "error",
            "stage": watchdog.stage,
            "error": f"{type(exc).__name__}: {str(exc)[:400]}",
            **where,
        }
        if not joined:
            error["master"] = f"{address}:{port}"
        emit(error)
        return 2
    emit({"event": "done", **where})
    return 0


def _groups(
    dist: Any, nnodes: int, local_size: int, rank: int
) -> list[tuple[str, str, Any, list[int]]]:
    """(scope, label, group, its ranks) of every group this rank all-reduces in.

    `all` is every rank; with several GPUs per node, `intra` is each node's ranks (NVLink or
    PCIe) and, with several nodes, `inter` is the ranks of one local index on every node (the
    network). Every rank creates every group, in the same order, as torch requires.
    """
    world = list(range(nnodes * local_size))
    mine: list[tuple[str, str, Any, list[int]]] = [("all", "all", None, world)]
    if local_size > 1:
        for node in range(nnodes):
            members = world[node * local_size : (node + 1) * local_size]
            group = dist.new_group(members)
            if rank in members:
                mine.append(("intra", f"node {node}", group, members))
    if local_size > 1 and nnodes > 1:
        for local in range(local_size):
            members = [node * local_size + local for node in range(nnodes)]
            group = dist.new_group(members)
            if rank in members:
                mine.append(("inter", f"local rank {local}", group, members))
    return mine


def _measure(
    torch: Any, dist: Any, device: Any, size: int, group: Any, members: list[int], rank: int
) -> dict[str, Any]:
    """One size in one group: every rank's sums checked, then the mean time of timed runs."""
    ranks = len(members)
    numel = size // 4  # float32
    pattern = (torch.arange(numel, dtype=torch.int32, device=device) % PATTERN).float()
    check = pattern + float(rank + 1)
    dist.all_reduce(check, group=group)
    check -= pattern * ranks  # what is left must be the sum of (rank + 1) over the group
    wrong = (check != float(sum(m + 1 for m in members))).any().float().reshape(1)
    del check, pattern
    dist.all_reduce(wrong, op=dist.ReduceOp.MAX, group=group)  # any rank's wrong sum counts
    correct = wrong.item() == 0.0
    data = torch.zeros(numel, dtype=torch.float32, device=device)  # stays zero: no overflow
    for _ in range(WARMUP):
        dist.all_reduce(data, group=group)
    iterations = iterations_for(size)
    dist.barrier(group=group)
    _synchronize(torch, device)
    started = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(data, group=group)
    _synchronize(torch, device)
    seconds = (time.perf_counter() - started) / iterations
    del data
    algbw = size / seconds
    return {
        "size": size,
        "ranks": ranks,
        "seconds": seconds,
        "iterations": iterations,
        "algbw": algbw,
        "busbw": bus_bandwidth(algbw, ranks),
        "correct": correct,
    }


def _synchronize(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launch(config: dict[str, Any]) -> int:
    """The node's launcher: the leader of a process group of one rank per local GPU (or one)."""
    deadline = time.monotonic() + float(config["time_limit_s"])  # before torch is imported
    if os.getpgid(0) != os.getpid():  # `docker exec` may start it as a session leader already
        os.setpgid(0, 0)
    with open(PID_FILE, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        return _run_ranks(config, deadline)
    finally:
        os.unlink(PID_FILE)


def _run_ranks(config: dict[str, Any], deadline: float) -> int:
    local_size = config["local_size"]
    if local_size == 1:
        return run_rank(config, 0, deadline)
    import multiprocessing
    from multiprocessing.connection import wait

    # fork: the launcher has not touched CUDA, and `python3 -c` has no module to re-import
    context = multiprocessing.get_context("fork")
    ranks = [
        context.Process(target=_rank_process, args=(config, n, deadline)) for n in range(local_size)
    ]
    for process in ranks:
        process.start()
    running = {process.sentinel: n for n, process in enumerate(ranks)}
    while running:
        left = deadline + LAUNCHER_GRACE_S - time.monotonic()
        ready = wait(list(running), timeout=max(0.0, left))
        if not ready:
            _stop_group("the ranks outlived the time limit", config)
        for sentinel in ready:
            local = running.pop(int(sentinel))  # type: ignore[arg-type]
            ranks[local].join()
            code = ranks[local].exitcode or 0
            if code != 0 and running:  # the others would wait for it until the time limit
                _stop_group(f"local rank {local} exited with code {code}", config)
    return max(abs(process.exitcode or 0) for process in ranks)


def _rank_process(config: dict[str, Any], local_rank: int, deadline: float) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a launcher killed takes its ranks along
    sys.exit(run_rank(config, local_rank, deadline))


def _stop_group(why: str, config: dict[str, Any]) -> None:
    emit({"event": "stopped", "node": config["node"], "error": why})
    os.unlink(PID_FILE)
    os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(launch(json.loads(sys.argv[1])))
