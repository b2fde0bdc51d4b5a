"""Where a model runs, and which idle models give way to it: pure functions over the layout.

A model with tensor parallel TP and pipeline parallel PP needs PP nodes with TP free devices
each (whole GPUs: a device runs one rank of one model). Among the nodes that fit, the fullest
are taken first, so large holes stay for large models; rank 0 (the model's API server) goes to
the head when the head is one of them, so the router reaches it without the network.

When the devices are taken, the least recently used idle models give way: never one with
requests in flight, one still loading, or one kept loaded. Of the models evicted to make room,
those the new model turns out not to need are kept.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cluster.remote.serving.catalog import NodeDevices

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

    @property
    def evictable(self) -> bool:
        return not (self.in_flight or self.keep_loaded or self.loading)


@dataclass(frozen=True)
class Activation:
    placement: Placement
    evict: tuple[str, ...]
    """Served names to unload first, least recently used first."""


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


def plan_activation(
    nodes: Sequence[NodeDevices], residents: Sequence[Resident], tensor: int, pipeline: int
) -> Activation | NoRoom:
    """Where a model goes and which residents are unloaded first, or why it cannot go now."""
    capacity = {n.name: list(n.devices) for n in nodes}
    if place(nodes, capacity, tensor, pipeline) is None:
        return NoRoom((), f"needs {pipeline} node(s) with {tensor} device(s); the cluster has none")

    def placement_without(gone: set[str]) -> Placement | None:
        held = [r.placement for r in residents if r.served not in gone]
        return place(nodes, free_devices(nodes, held), tensor, pipeline)

    evicted: list[str] = []
    found = placement_without(set())
    for resident in sorted((r for r in residents if r.evictable), key=lambda r: r.last_used):
        if found is not None:
            break
        evicted.append(resident.served)
        found = placement_without(set(evicted))
    if found is None:
        holders = tuple(r.served for r in residents if not r.evictable)
        states = ", ".join(_why_held(r) for r in residents if not r.evictable)
        return NoRoom(holders, f"the devices it needs are held by {states}")
    # Keep the most recently used of those that turned out not to be in the way.
    for served in reversed(list(evicted)):
        trial = set(evicted) - {served}
        if (kept := placement_without(trial)) is not None:
            evicted.remove(served)
            found = kept
    return Activation(found, tuple(evicted))


def _why_held(resident: Resident) -> str:
    if resident.loading:
        return f"{resident.served} (loading)"
    if resident.in_flight:
        return f"{resident.served} ({resident.in_flight} request(s) in flight)"
    return f"{resident.served} (keep_loaded)"
