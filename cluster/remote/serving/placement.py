"""Where a model runs, and which idle models give way to it: pure functions over the layout.

A model with tensor parallel TP and pipeline parallel PP needs PP nodes with TP free devices
each (whole GPUs: a device runs one rank of one model). Among the nodes that fit, the fullest
are taken first, so large holes stay for large models; rank 0 (the model's API server) goes to
the head when the head is one of them, so the router reaches it without the network.

When the devices are taken, the least recently used idle models give way: never one with
requests in flight, one still loading, or one kept loaded. Of the models evicted to make room,
those the new model turns out not to need are kept.

With vLLM's sleep mode a model gives way by sleeping: its processes stay, its weights leave the
GPU, and only its CUDA context and buffers stay there. A device holds at most one awake model
and up to `NodeDevices.sleepers` sleeping ones; a sleeping model wakes on its own devices,
putting the awake ones there to sleep. When a device would hold one sleeper too many, the least
recently used sleeper on it is stopped.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cluster.remote.serving.catalog import NodeDevices

SLEEPER_GPU_GIB = 1.53
"""What a sleeping model keeps on each of its GPUs (CUDA context, CUDA graph pool, NCCL
buffers): measured 1560 MiB on an H200 and 1544 MiB on an H100 (vLLM 0.26.0, a 1.93B model at
TP 1, CUDA graphs 0.73 GiB; the same at level 1 and 2; tests/fixtures/sleep/). TP > 1 adds
NCCL's buffers (about 1 GiB per rank at TP 4, vllm-project/vllm#51485). See docs/models.md."""
VLLM_GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default `--gpu-memory-utilization`: the share of a GPU the awake model takes."""

# typing.Tuple: the alias is evaluated at run time, where `tuple[...]` needs Python 3.9
Placement = typing.Tuple[typing.Tuple[str, typing.Tuple[int, ...]], ...]  # noqa: UP006
"""Per rank, in rank order: the node's name and the devices that rank uses."""


@dataclass(frozen=True)
class Resident:
    """A model that holds devices now."""

    served: str
    placement: Placement
    last_used: float
    in_flight: int = 0
    keep_loaded: bool = False
    loading: bool = False
    asleep: bool = False
    """Sleeping: it holds its devices' memory in part, and no device for an awake model."""
    can_sleep: bool = False
    """Started with sleep mode: it gives way by sleeping where its devices have room."""

    @property
    def evictable(self) -> bool:
        return not (self.in_flight or self.keep_loaded or self.loading)


@dataclass(frozen=True)
class Activation:
    placement: Placement
    evict: tuple[str, ...]
    """Served names to unload first, least recently used first (sleepers stopped included)."""
    sleep: tuple[str, ...] = ()
    """Served names to put to sleep first, least recently used first."""


@dataclass(frozen=True)
class NoRoom:
    """Nothing can make room now: `holders` keep the devices (busy, loading or kept loaded)."""

    holders: tuple[str, ...]
    reason: str


def free_devices(
    nodes: Sequence[NodeDevices], placements: Iterable[Placement]
) -> dict[str, list[int]]:
    """Each node's devices that no placement holds, lowest first."""
    taken = {(node, device) for p in placements for node, devices in p for device in devices}
    return {n.name: sorted(d for d in n.devices if (n.name, d) not in taken) for n in nodes}


def place(
    nodes: Sequence[NodeDevices], free: Mapping[str, list[int]], tensor: int, pipeline: int
) -> Placement | None:
    """A placement on the free devices, or None when they do not allow one."""
    order = {n.name: i for i, n in enumerate(nodes)}
    fitting = [n for n in nodes if len(free[n.name]) >= tensor]
    if len(fitting) < pipeline:
        return None
    chosen = sorted(fitting, key=lambda n: (len(free[n.name]), order[n.name]))[:pipeline]
    chosen.sort(key=lambda n: (not n.head, order[n.name]))
    return tuple((n.name, tuple(free[n.name][:tensor])) for n in chosen)


def sleepers_per_device(
    memory_gib: float,
    utilization: float = VLLM_GPU_MEMORY_UTILIZATION,
    sleeper_gib: float = SLEEPER_GPU_GIB,
) -> int:
    """How many sleepers a GPU of `memory_gib` holds beside an awake model that takes
    `utilization` of it: vLLM refuses to start (or wake) when its share is not free."""
    return max(0, int(memory_gib * (1 - utilization) // sleeper_gib))


def plan_activation(
    nodes: Sequence[NodeDevices],
    residents: Sequence[Resident],
    tensor: int,
    pipeline: int,
    *,
    asleep_at: Placement | None = None,
) -> Activation | NoRoom:
    """Where a model goes and which residents give way first, or why it cannot go now.

    `residents`: the other models that hold devices, awake or asleep. `asleep_at`: the
    model's own placement when it sleeps (it wakes there).
    """
    capacity = {n.name: list(n.devices) for n in nodes}
    if place(nodes, capacity, tensor, pipeline) is None:
        return NoRoom((), f"needs {pipeline} node(s) with {tensor} device(s); the cluster has none")
    awake = [r for r in residents if not r.asleep]
    if asleep_at is not None:
        in_the_way = sorted(
            (r for r in awake if _shares_devices(r.placement, asleep_at)),
            key=lambda r: r.last_used,
        )
        if any(not r.evictable for r in in_the_way):
            return _no_room(in_the_way)
        return _give_way(nodes, residents, asleep_at, [r.served for r in in_the_way])

    def placement_without(gone: set[str]) -> Placement | None:
        held = [r.placement for r in awake if r.served not in gone]
        return place(nodes, free_devices(nodes, held), tensor, pipeline)

    evicted: list[str] = []
    found = placement_without(set())
    for resident in sorted((r for r in awake if r.evictable), key=lambda r: r.last_used):
        if found is not None:
            break
        evicted.append(resident.served)
        found = placement_without(set(evicted))
    if found is None:
        return _no_room(awake)
    # Keep the most recently used of those that turned out not to be in the way.
    for served in reversed(list(evicted)):
        trial = set(evicted) - {served}
        if (kept := placement_without(trial)) is not None:
            evicted.remove(served)
            found = kept
    return _give_way(nodes, residents, found, evicted)


def _give_way(
    nodes: Sequence[NodeDevices],
    residents: Sequence[Resident],
    placement: Placement,
    evicted: Sequence[str],
) -> Activation:
    """Which of the evicted sleep and which stop: a sleeper more than a device holds stops,
    the least recently used of the device's sleepers first (an evicted one included)."""
    by_name = {r.served: r for r in residents}
    asleep = [r for r in residents if r.asleep]
    asleep += [by_name[served] for served in evicted if by_name[served].can_sleep]
    stopped: list[str] = [served for served in evicted if not by_name[served].can_sleep]
    for node in nodes:
        for device in node.devices:
            while True:
                here = [r for r in asleep if _holds(r.placement, node.name, device)]
                if len(here) <= node.sleepers:
                    break
                victim = min(here, key=lambda r: r.last_used)
                asleep.remove(victim)
                stopped.append(victim.served)
    sleeping = [served for served in evicted if by_name[served] in asleep]
    order = {r.served: r.last_used for r in residents}
    return Activation(
        placement,
        tuple(sorted(stopped, key=order.__getitem__)),
        tuple(sleeping),
    )


def _no_room(in_the_way: Sequence[Resident]) -> NoRoom:
    held = [r for r in in_the_way if not r.evictable]
    states = ", ".join(_why_held(r) for r in held)
    return NoRoom(tuple(r.served for r in held), f"the devices it needs are held by {states}")


def _holds(placement: Placement, node: str, device: int) -> bool:
    return any(name == node and device in devices for name, devices in placement)


def _shares_devices(first: Placement, second: Placement) -> bool:
    return any(_holds(second, node, d) for node, devices in first for d in devices)


def _why_held(resident: Resident) -> str:
    if resident.loading:
        return f"{resident.served} (loading)"
    if resident.in_flight:
        return f"{resident.served} ({resident.in_flight} request(s) in flight)"
    return f"{resident.served} (keep_loaded)"
