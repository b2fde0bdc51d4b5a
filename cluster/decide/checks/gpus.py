"""Rules over the GPUs: nvidia-smi's list, one driver, errors, idle GPUs, the topology tensor
parallel runs over."""

from __future__ import annotations

from cluster.decide.checks.result import (
    CheckInput,
    CheckResult,
    fails,
    gpu_mode_only,
    majority,
    passes,
    skips,
    warns,
)
from cluster.decide.inventory import Inventory
from cluster.facts.gpu import GpuTopology


@gpu_mode_only
def check_gpus(given: CheckInput) -> list[CheckResult]:
    """nvidia-smi answers on every node, with the same GPU count and model everywhere."""
    results = []
    shapes: dict[str, tuple[int, str | None]] = {}
    for name, facts in given.probed():
        gpu = facts.gpu
        if gpu.problem is not None:
            detail = f"{gpu.problem.kind}: {gpu.problem.detail}"
            results.append(fails("gpus", name, detail, gpu.problem.remedy))
        if gpu.gpus:
            chosen = _chosen_gpus(given.inventory, name, gpu.gpu_count)
            if isinstance(chosen, str):
                results.append(fails("gpus", name, chosen, "list indices `nvidia-smi -L` shows"))
                continue
            shapes[name] = (chosen, gpu.model_name)
        elif gpu.problem is None:
            detail = "nvidia-smi listed no GPUs"
            results.append(fails("gpus", name, detail, "run `nvidia-smi` on the host"))
    if not shapes:
        return results
    declared = {
        n.node_name: n.gpus
        for n in given.inventory.nodes
        if n.gpus is not None and n.gpu_ids is None
    }
    # Several models are placed on whatever each node gives: only the GPU model must agree.
    routed = given.inventory.routed
    compared = {name: (0 if routed else count, model) for name, (count, model) in shapes.items()}
    common = majority(compared)
    for name, (count, model) in shapes.items():
        if compared[name] != common:
            if routed:
                detail = f"{model}, but other nodes have {common[1]}"
                remedy = "a model's ranks need one GPU model: fix this node or leave it out"
            else:
                detail = f"{count} x {model}, but other nodes have {common[0]} x {common[1]}"
                remedy = "tensor parallel = GPUs per node needs identical nodes: fix this node or leave it out"
            results.append(fails("gpus", name, detail, remedy))
        elif name in declared and declared[name] != count:
            detail = f"the inventory declares {declared[name]} GPUs, nvidia-smi lists {count}"
            remedy = (
                "correct gpus: in the inventory, or the node (a GPU may have fallen off the bus)"
            )
            results.append(fails("gpus", name, detail, remedy))
        elif not any(r.node == name for r in results):
            results.append(passes("gpus", name, f"{count} x {model}"))
    return results


def _chosen_gpus(inventory: Inventory, node: str, found: int) -> int | str:
    """How many GPUs the node gives the cluster (its `gpu_ids`, or all), or what is wrong."""
    ids = next(n.gpu_ids for n in inventory.nodes if n.node_name == node)
    if ids is None:
        return found
    absent = [i for i in ids if i >= found]
    if absent:
        return f"gpu_ids names GPU {', '.join(map(str, absent))}, but nvidia-smi lists {found}"
    return len(ids)


@gpu_mode_only
def check_driver_version(given: CheckInput) -> list[CheckResult]:
    """The same NVIDIA driver on every node (WARN: NCCL across versions is a gamble)."""
    versions = {
        name: facts.gpu.driver_version for name, facts in given.probed() if facts.gpu.driver_version
    }
    if not versions:
        return [skips("driver version", None, "no driver version known")]
    common = majority(versions)
    odd = {name: version for name, version in versions.items() if version != common}
    if not odd:
        return [passes("driver version", None, f"{common} on every node")]
    return [
        warns(
            "driver version",
            name,
            f"driver {version}, other nodes {common}",
            f"install driver {common} here (one version everywhere avoids NCCL surprises)",
        )
        for name, version in odd.items()
    ]


@gpu_mode_only
def check_gpu_errors(given: CheckInput) -> list[CheckResult]:
    """No GPU reports uncorrected ECC errors, an error value, or MIG mode."""
    results = []
    for name, facts in given.probed():
        if not facts.gpus:
            continue  # check_gpus says why
        ecc = [f"GPU{g.index} ({g.ecc_uncorrected})" for g in facts.gpus if g.ecc_uncorrected]
        broken = [f"GPU{g.index} {', '.join(g.errors)}" for g in facts.gpus if g.errors]
        mig = [f"GPU{g.index}" for g in facts.gpus if g.mig_enabled]
        if ecc:
            results.append(
                fails(
                    "gpu errors",
                    name,
                    f"uncorrected ECC errors: {', '.join(ecc)}",
                    "drain the node; reset the GPU (`nvidia-smi -r -i N`) or reboot, and have "
                    "it replaced if errors come back",
                )
            )
        if broken:
            results.append(
                fails(
                    "gpu errors",
                    name,
                    f"nvidia-smi reports errors: {'; '.join(broken)}",
                    "reset the GPU (`nvidia-smi -r -i N`) or reboot the host; "
                    "`dmesg | grep -i xid` says what happened",
                )
            )
        if mig:
            results.append(
                fails(
                    "gpu errors",
                    name,
                    f"MIG mode enabled on {', '.join(mig)}",
                    "tensor parallel needs whole GPUs: `nvidia-smi -i N -mig 0` and reset the GPU",
                )
            )
        if not (ecc or broken or mig):
            results.append(passes("gpu errors", name, "no ECC errors, no error values"))
    return results


@gpu_mode_only
def check_gpus_idle(given: CheckInput) -> list[CheckResult]:
    """No other process holds GPU memory (vLLM takes 90% of it by default)."""
    results = []
    for name, facts in given.probed():
        if not facts.gpus:
            continue
        processes = facts.gpu.processes
        if not processes:
            results.append(passes("gpus idle", name, "no process holds GPU memory"))
            continue
        by_uuid = {g.uuid: g.index for g in facts.gpus}
        held = ", ".join(
            f"{p.process_name} (pid {p.pid}, GPU{by_uuid.get(p.gpu_uuid, '?')}, "
            f"{p.used_memory_mib} MiB)"
            for p in processes[:4]
        )
        more = f" and {len(processes) - 4} more" if len(processes) > 4 else ""
        results.append(
            warns(
                "gpus idle",
                name,
                f"GPU memory held by {held}{more}",
                "stop those processes (`nvidia-smi` lists them), or vLLM may run out of GPU memory",
            )
        )
    return results


def _tensor_parallel_groups(given: CheckInput, gpu_count: int) -> list[list[int]] | None:
    """The GPU indices each tensor-parallel group uses on a node; None when TP spans nodes."""
    tensor_parallel = given.inventory.primary_model.tensor_parallel
    size = gpu_count if tensor_parallel == "auto" else tensor_parallel
    if size > gpu_count:
        return None
    return [list(range(start, start + size)) for start in range(0, gpu_count - size + 1, size)]


def _describe_topology(topology: GpuTopology) -> str:
    return f"{topology.interconnect} between {len(topology.gpu_indices)} GPUs"


@gpu_mode_only
def check_topology(given: CheckInput) -> list[CheckResult]:
    """NVLink or PCIe per node; WARN when tensor parallel spans GPUs without NVLink."""
    results = []
    for name, facts in given.probed():
        topology = facts.gpu.topology
        if topology is None:
            if facts.gpus:
                results.append(skips("topology", name, "nvidia-smi topo -m gave no matrix"))
            continue
        groups = _tensor_parallel_groups(given, len(topology.gpu_indices))
        if groups is None:
            results.append(
                warns(
                    "topology",
                    name,
                    f"tensor parallel {given.inventory.primary_model.tensor_parallel} spans nodes: "
                    "its all-reduces cross the network",
                    "set tensor_parallel to the GPUs per node, pipeline_parallel to nodes",
                )
            )
            continue
        slow = [pair for group in groups for pair in topology.pairs_without_nvlink(group)]
        if slow:
            shown = ", ".join(slow[:3]) + (f" and {len(slow) - 3} more" if len(slow) > 3 else "")
            results.append(
                warns(
                    "topology",
                    name,
                    f"{_describe_topology(topology)}: tensor parallel runs over PCIe ({shown})",
                    "expect lower throughput; a smaller tensor_parallel within NVLinked "
                    "GPUs and a larger pipeline_parallel may serve faster",
                )
            )
        else:
            results.append(passes("topology", name, _describe_topology(topology)))
    return results
