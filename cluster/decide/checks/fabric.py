"""The rule over the fabric between the nodes: InfiniBand/RoCE HCAs, RDMA devices, GPUDirect."""

from __future__ import annotations

from cluster.decide.checks.result import (
    CheckInput,
    CheckResult,
    Status,
    fails,
    gpu_mode_only,
    passes,
    skips,
    warns,
)


@gpu_mode_only
def check_infiniband(given: CheckInput) -> list[CheckResult]:
    """InfiniBand/RoCE between nodes: HCAs Active on every node, one link layer, the same count,
    /dev/infiniband present, GPUDirect RDMA (nvidia_peermem; a WARN without)."""
    inventory = given.inventory
    name = "infiniband"
    if len(inventory.nodes) < 2:
        return [skips(name, None, "one node: NCCL's traffic stays inside it")]
    if inventory.env.get("NCCL_IB_DISABLE") == "1":
        return [skips(name, None, "NCCL_IB_DISABLE=1 in env: NCCL uses TCP sockets")]
    named = inventory.network.ib_hcas
    read = {n: f.fabric.infiniband for n, f in given.probed() if f.fabric.infiniband.read}
    active = {
        n: [p for p in ib.active_ports if named is None or p.hca in named or p.name in named]
        for n, ib in read.items()
    }
    results: list[CheckResult] = []
    if named is None and not any(active.values()):
        detail = "no active HCA on any node: NCCL uses TCP sockets between the nodes"
        return [passes(name, None, detail)]
    counts = {n: len(ports) for n, ports in active.items()}
    up_fix = (
        "bring the port up (`ibstat`: cable, switch, and a subnet manager for InfiniBand), "
        + ("or drop it from network.ib_hcas" if named else "or set env NCCL_IB_DISABLE: '1'")
    )
    for node, ib in read.items():
        ports = active[node]
        if named:
            missing = [h for h in named if not any(h in (p.hca, p.name) for p in ports)]
            for hca in missing:
                seen = [p for p in ib.ports if hca in (p.hca, p.name)]
                state = ", ".join(f"{p.name} {p.state}/{p.physical_state}" for p in seen)
                detail = f"network.ib_hcas names {hca}: " + (
                    f"not active here ({state})" if seen else "no such HCA here"
                )
                results.append(fails(name, node, detail, up_fix))
        elif not ports:
            others = ", ".join(f"{n}: {c}" for n, c in counts.items() if c)
            detail = f"no active HCA here, while other nodes have some ({others})"
            results.append(fails(name, node, detail, up_fix))
            continue
        if ports and not any(f.startswith("uverbs") for f in ib.device_files):
            results.append(
                fails(
                    name,
                    node,
                    "active HCAs but no /dev/infiniband/uverbs*: the containers "
                    "could not open them",
                    "load the RDMA user-space modules (`modprobe ib_uverbs rdma_ucm`)",
                )
            )
        roce = [p.name for p in ports if p.roce and p.roce_v2_gid_index() is None]
        if roce:
            results.append(
                warns(
                    name,
                    node,
                    f"no RoCE v2 GID with an address on {', '.join(roce)}",
                    "give the RoCE interface an IP address; NCCL needs a RoCE v2 GID",
                )
            )
        peer = given.facts[node].fabric.peer_memory
        if ports and peer is False:
            results.append(
                warns(
                    name,
                    node,
                    "nvidia_peermem is not loaded: no GPUDirect RDMA through it "
                    "(NCCL stages through host memory unless DMA-BUF works: open kernel "
                    "module, Linux 5.12+)",
                    "`modprobe nvidia_peermem`, and list it in /etc/modules-load.d/",
                )
            )
    layers = {
        n: "/".join(sorted({p.link_layer or "?" for p in ps})) for n, ps in active.items() if ps
    }
    if len(set(layers.values())) > 1:
        shown = ", ".join(f"{n}: {layer}" for n, layer in layers.items())
        results.append(
            fails(
                name,
                None,
                f"the nodes' HCAs differ in link layer ({shown})",
                "use the same fabric on every node (name its HCAs in network.ib_hcas)",
            )
        )
    if len({c for c in counts.values() if c}) > 1:
        shown = ", ".join(f"{n}: {c}" for n, c in counts.items())
        results.append(
            warns(
                name,
                None,
                f"active HCA ports differ in number ({shown})",
                "NCCL uses as many rails as the node with the fewest; check the cabling",
            )
        )
    if not any(r.status in (Status.FAIL, Status.WARN) for r in results):
        for node, ports in active.items():
            shown = ", ".join(f"{p.name} ({p.link_layer}, {p.rate})" for p in ports)
            results.append(passes(name, node, f"{len(ports)} active: {shown}"))
    return results
