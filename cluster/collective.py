"""vcluster's all-reduce check, the program every node runs: `python3 -c <this source> CONFIG`.

Sent to the nodes as it is and run inside the cluster's own containers (`docker exec`), so it
gets exactly the environment vLLM gets (`VLLM_HOST_IP`, `NCCL_SOCKET_IFNAME`,
`GLOO_SOCKET_IFNAME`, the inventory's `env`). It uses the standard library and the image's own
torch (every vLLM image has it): nothing new on the nodes.

One process per GPU with NCCL, or one per node with gloo on CPUs. Rank 0 (the head's first)
holds the rendezvous. For each size (doubling by 4) it reports, as nccl-tests does, the time of
one all-reduce, the algorithm bandwidth (bytes / time) and the bus bandwidth (algbw x 2(n-1)/n),
and whether the sum was right; with GPUs on several nodes, also within each node and across the
nodes. Every line it means for vcluster starts with `MARK` and is one JSON event.

It never outlives its time limit: every process has an alarm, and the launcher is the leader of
a process group that vcluster can kill as a whole (its PID is in `PID_FILE`).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from typing import Any

MARK = "VCLUSTER-COLLECTIVE "
PID_FILE = "/tmp/vcluster-collective.pid"  # in the container; one check at a time
MIB = 1 << 20
WARMUP = 2


def bus_bandwidth(algbw: float, ranks: int) -> float:
    """nccl-tests' all-reduce bus bandwidth: what each link carries, comparable across sizes."""
    return algbw * 2 * (ranks - 1) / ranks if ranks > 1 else algbw


def iterations_for(size: int) -> int:
    """Timed iterations: many for small sizes (latency-bound, noisy), few for large ones."""
    return max(2, min(20, (256 * MIB) // max(size, 1)))


def emit(event: dict[str, Any]) -> None:
    """One event line, in one write: the ranks of a node share their stdout."""
    sys.stdout.write(MARK + json.dumps(event, sort_keys=True) + "\n")
    sys.stdout.flush()


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


def run_rank(config: dict[str, Any], local_rank: int) -> int:
    """One rank: join, then all-reduce every size in every group it belongs to."""
    import torch
    import torch.distributed as dist

    nnodes, local_size = config["nnodes"], config["local_size"]
    node_rank = config["node_rank"]
    rank, world = node_rank * local_size + local_rank, nnodes * local_size
    where = {"rank": rank, "node": config["node"], **interface_facts()}
    stage = {"now": "join"}

    def on_alarm(signum: int, frame: object) -> None:
        emit({"event": "error", "stage": stage["now"], "error": "time limit passed", **where})
        os._exit(3)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(config["time_limit_s"]))
    backend = config["backend"]
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    address, port = config["master"]
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=config["join_timeout_s"]),
        )
        stage["now"] = "first all-reduce"
        probe = torch.ones(1, device=device)
        dist.all_reduce(probe)  # NCCL connects here, not in init
        _synchronize(torch, device)
    except Exception as exc:  # every failure to join is reported, with where it was tried
        emit({"event": "error", "stage": stage["now"], "error": f"{type(exc).__name__}: "
              f"{str(exc)[:400]}", "master": f"{address}:{port}", **where})  # fmt: skip
        return 2
    emit({"event": "joined", "world": world, **where})
    groups = _groups(dist, nnodes, local_size, rank)
    for size in config["sizes"]:
        for scope, label, group, members in groups:
            stage["now"] = f"{scope} all-reduce of {size // MIB} MiB"
            result = _measure(torch, dist, device, size, group, members, rank)
            if result is not None and rank == members[0]:
                emit({"event": "result", "scope": scope, "group": label, "node": config["node"],
                      **result})  # fmt: skip
    stage["now"] = "finish"
    dist.destroy_process_group()
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


def _measure(torch: Any, dist: Any, device: Any, size: int, group: Any, members: list[int],
             rank: int) -> dict[str, Any] | None:  # fmt: skip
    """One size in one group: the sum's correctness, then the mean time of timed iterations."""
    ranks = len(members)
    numel = size // 4  # float32: small integer sums stay exact
    check = torch.full((numel,), float(rank + 1), dtype=torch.float32, device=device)
    dist.all_reduce(check, group=group)
    expected = float(sum(m + 1 for m in members))
    correct = bool(torch.all(check == expected).item())
    del check
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
        "size": size, "ranks": ranks, "seconds": seconds, "iterations": iterations,
        "algbw": algbw, "busbw": bus_bandwidth(algbw, ranks), "correct": correct,
    }  # fmt: skip


def _synchronize(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launch(config: dict[str, Any]) -> int:
    """The node's launcher: a process group of one rank per local GPU (or one rank)."""
    if os.getpgid(0) != os.getpid():  # `docker exec` may start it as a session leader already
        os.setpgid(0, 0)
    with open(PID_FILE, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        return _run_ranks(config)
    finally:
        os.unlink(PID_FILE)


def _run_ranks(config: dict[str, Any]) -> int:
    signal.alarm(int(config["time_limit_s"]) + 10)  # the ranks' own alarms go first
    local_size = config["local_size"]
    if local_size == 1:
        return run_rank(config, 0)
    import multiprocessing

    # fork: the launcher has not touched CUDA, and `python3 -c` has no module to re-import
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_rank_exit, args=(config, n)) for n in range(local_size)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    return max(abs(process.exitcode or 0) for process in ranks)


def _rank_exit(config: dict[str, Any], local_rank: int) -> None:
    sys.exit(run_rank(config, local_rank))


if __name__ == "__main__":
    sys.exit(launch(json.loads(sys.argv[1])))
