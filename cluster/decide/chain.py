"""The chain's plan (pure): what each node lacks, whether it has room, who is in the chain and
which node keeps which item.

A node is in a round's chain when it lacks at least one item; the stream carries every item
some node of the chain lacks, and each node keeps only those it lacks. A node that failed (its
relay died, or it could not write) leaves the chain; the nodes after it are served by the next
round, without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from cluster.decide.manifest import Item
from cluster.errors import VclusterError
from cluster.progress import format_bytes


class NoRoom(VclusterError):
    """A node lacks the disk space for what it must receive."""


@dataclass(frozen=True)
class Routed:
    item: Item
    sinks: tuple[str, ...]


def lacking(
    items: Sequence[Item], states: Mapping[str, Mapping[str, str]]
) -> dict[str, list[Item]]:
    """For each node, the items whose state there is not `ok` (a node's check by path)."""
    return {
        node: [item for item in items if found.get(item.path) != "ok"]
        for node, found in states.items()
    }


def room_problems(needs: Mapping[str, Sequence[Item]], free: Mapping[str, int]) -> list[str]:
    """`node needs X, has Y free` for every node without room for what it lacks."""
    problems = []
    for node, items in needs.items():
        needed = sum(item.size for item in items)
        if needed > free.get(node, 0):
            problems.append(
                f"{node} needs {format_bytes(needed)} under the model cache and has "
                f"{format_bytes(free.get(node, 0))} free"
            )
    return problems


def require_room(needs: Mapping[str, Sequence[Item]], free: Mapping[str, int]) -> None:
    problems = room_problems(needs, free)
    if problems:
        raise NoRoom(
            "not enough disk space: " + "; ".join(problems),
            where=", ".join(p.split()[0] for p in problems),
            fix="free space under model_cache on those nodes, or point model_cache at a larger disk",
        )


def chain_order(nodes: Sequence[str], needs: Mapping[str, Sequence[Item]]) -> list[str]:
    """The nodes that lack something, in the inventory's order (the head first)."""
    return [node for node in nodes if needs.get(node)]


def routed_items(
    items: Sequence[Item], needs: Mapping[str, Sequence[Item]], chain: Sequence[str]
) -> list[Routed]:
    """The stream of a round: each item some node of the chain lacks, with the nodes that keep it.

    Files go first, then links, then `refs/` last: a node never names a snapshot whose files
    are not all there.
    """
    wanted = {node: {item.path for item in needs[node]} for node in chain}
    routed = [
        Routed(item, tuple(node for node in chain if item.path in wanted[node])) for item in items
    ]
    order = {"file": 0, "link": 1}
    return sorted(
        (r for r in routed if r.sinks),
        key=lambda r: ("refs" in PurePosixPath(r.item.path).parts, order.get(r.item.kind, 0)),
    )
