"""Running the chain over SSH: check the nodes, start one relay per node, stream the items once.

The controller starts the relays from the last node of the chain to the first: each listens on
its node's address, says on which port, and the one before it connects there with that relay's
own token (a token per hop: a token opens one relay only). The first relay reads the stream
from its SSH channel. Every relay reports on its own SSH channel (progress, each item, a lost
neighbour), so the controller sees every node at once.

A round ends when the stream has passed; nodes whose relay died or could not write are failed
(named with the item); nodes cut off behind them are served by the next round, without them.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TypeVar

import paramiko

from cluster.decide.chain import Routed, chain_order, lacking, require_room, routed_items
from cluster.decide.inventory import Inventory
from cluster.decide.layers import (
    ImageSend,
    NodeLayers,
    image_item,
    plan_image_send,
    require_image_room,
)
from cluster.decide.manifest import Item
from cluster.errors import VclusterError
from cluster.nodes.images import ImageSource
from cluster.nodes.session import Session
from cluster.nodes.transport.ssh import SshConnection
from cluster.progress import Meter, ProgressBoard, describe_transfer
from cluster.remote import relay
from cluster.remote.registry import RELAY, source

CHUNK = relay.CHUNK
RELAY_SOURCE = source(RELAY)
STARTUP_TIMEOUT_S = 60.0

Chunks = Callable[[Item], Iterator[bytes]]
"""The bytes of an item, from wherever the controller reads them."""


class DistributionError(VclusterError):
    """Some nodes did not receive everything."""


def relay_argv() -> list[str]:
    return ["python3", "-c", RELAY_SOURCE]


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass
class NodeReport:
    """What one node's relay said in a round."""

    done: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
    item: str | None = None
    received: int = 0
    finished: bool = False
    upstream_lost: bool = False
    no_upstream: bool = False
    """No node before it connected: the nodes cannot reach each other (a firewall?)."""
    next_lost: str | None = None
    """The node after it stopped taking the stream (its own report says why)."""
    refused_connections: int = 0
    """Connections to its relay that did not present the token in time."""
    bad_stream: str | None = None
    """Why the relay stopped reading a stream that broke its format (a frame too long...)."""
    exit_status: int | None = None

    def failure(self) -> str | None:
        """Why the node failed itself (not cut off by another), or None."""
        if self.errors:
            path, error = next(iter(self.errors.items()))
            return f"could not write {path}: {error}"
        if self.bad_stream:
            return f"refused the stream it received: {self.bad_stream}"
        if self.no_upstream:
            refused = (
                f" ({self.refused_connections} connection(s) without its token were refused)"
                if self.refused_connections
                else ""
            )
            return (
                f"the node before it never connected to it{refused}: open TCP between the nodes "
                "(ephemeral ports) in the firewall"
            )
        if not self.finished and not self.upstream_lost:
            where = f" during {self.item}" if self.item else ""
            return f"its relay ended{where} (exit {self.exit_status})"
        return None


@dataclass(frozen=True)
class RelayLimits:
    """How long a relay waits: for the node before it to connect (from the moment it listens,
    never extended), and for a new connection to present the token before it is dropped."""

    accept_timeout_s: float = relay.ACCEPT_TIMEOUT_S
    token_timeout_s: float = relay.TOKEN_TIMEOUT_S


@dataclass(frozen=True)
class ChainNode:
    """A node as the chain sees it: its address for the node before it, its folder for files."""

    name: str
    address: str
    connection: SshConnection
    root: str
    docker_host: str | None = None
    """The Docker engine its relay loads images into; None: the host's default."""


def chain_nodes(
    inventory: Inventory,
    session: Session,
    addresses: Mapping[str, str] | None = None,
    *,
    reachable_only: bool = False,
) -> list[ChainNode]:
    """Every node (or every node connected), head first, at its cluster address (the
    inventory's when not known)."""
    ordered = inventory.head_first
    if reachable_only:
        ordered = [node for node in ordered if node.node_name in session.connections]
    return [
        ChainNode(
            node.node_name,
            (addresses or {}).get(node.node_name, node.address),
            session.ssh(node.node_name),
            inventory.model_cache,
        )
        for node in ordered
    ]


def check_node(
    node: ChainNode, items: Sequence[Item], *, rehash: bool = True
) -> tuple[dict[str, str], int]:
    """The node's state of every item (`ok`, `missing`, `size`, `sha256`; `unverified` without
    `rehash` where no stamp vouches for a file) and its free bytes."""
    config = {
        "mode": "check",
        "root": node.root,
        "entries": [i.wire() for i in items],
        "hash": rehash,
    }
    result = node.connection.run(
        relay_argv(), stdin=(json.dumps(config) + "\n").encode(), timeout=3600
    )
    event = _last_event(result.stdout, "check")
    if not result.ok or event is None:
        raise DistributionError(
            f"checking the files failed: {result.stderr.strip()[-300:] or 'no report'}",
            where=node.name,
            fix="the host needs python3 (any 3.8 or later) for vcluster's relay",
        )
    return event["files"], int(event["free"])


def _last_event(output: str, name: str) -> dict | None:
    found = None
    for line in output.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            found = event
    return found


@dataclass(frozen=True)
class Hop:
    """One relay of a round: where it listens (None for the first, which reads its SSH
    channel) and the token a connection to it must open with."""

    node: ChainNode
    listen: str | None
    token: str | None


def plan_hops(chain: Sequence[ChainNode]) -> list[Hop]:
    """The relays of a round: every one but the first listens, each with a token of its own
    (128 random bits), given only to it and to the node before it."""
    return [
        Hop(node, node.address, secrets.token_hex(16)) if index else Hop(node, None, None)
        for index, node in enumerate(chain)
    ]


def run_round(
    chain: Sequence[ChainNode],
    stream: Sequence[Routed],
    chunks: Chunks,
    board: ProgressBoard | None = None,
    limits: RelayLimits = RelayLimits(),
) -> tuple[dict[str, NodeReport], int]:
    """Send `stream` once through `chain`; every node's report, and the bytes sent."""
    reports = {node.name: NodeReport() for node in chain}
    total = sum(r.item.size for r in stream)
    channels: list[tuple[ChainNode, paramiko.Channel]] = []
    readers: list[threading.Thread] = []
    following: dict | None = None
    try:
        for hop in reversed(plan_hops(chain)):
            node = hop.node
            config = {
                "mode": "relay",
                "root": node.root,
                "node": node.name,
                "token": hop.token,
                "next": following,
                "listen": hop.listen,
                "accept_timeout_s": limits.accept_timeout_s,
                "token_timeout_s": limits.token_timeout_s,
                "docker_host": node.docker_host,
            }
            channel = node.connection.open_channel(relay_argv())
            channel.sendall((json.dumps(config) + "\n").encode())
            lines = channel.makefile("r")
            if hop.listen is not None:
                port = _listening_port(lines, node.name)
                following = {
                    "name": node.name,
                    "address": node.address,
                    "port": port,
                    "token": hop.token,
                }
            reader = threading.Thread(
                target=_read_events,
                args=(lines, reports[node.name], board, node.name, total),
                daemon=True,
            )
            reader.start()
            channels.append((node, channel))
            readers.append(reader)
        first = channels[-1][1]
        sent = _send(first, stream, chunks)
        for node, channel in channels:
            reports[node.name].exit_status = channel.recv_exit_status()
        for reader in readers:
            reader.join(timeout=30)
    finally:
        for _, channel in channels:
            channel.close()
    return reports, sent


def _listening_port(lines: Iterator[str], node: str) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    for line in lines:
        event = json.loads(line)
        if event.get("event") == "listening":
            return int(event["port"])
        if time.monotonic() > deadline:
            break
    raise DistributionError(
        "the relay did not start listening",
        where=node,
        fix="the host needs python3; see that no firewall rule blocks ports between the nodes",
    )


def _send(channel: paramiko.Channel, stream: Sequence[Routed], chunks: Chunks) -> int:
    """Write the stream into the first relay; the bytes written (stops when it is gone)."""
    sent = 0

    def put(data: bytes) -> bool:
        try:
            channel.sendall(frame(data))
        except OSError:
            return False  # the first relay is gone: its report says so
        return True

    try:
        for routed in stream:
            if not put(json.dumps({**routed.item.wire(), "sinks": list(routed.sinks)}).encode()):
                return sent
            if routed.item.kind == "link":
                continue  # a header only
            for data in chunks(routed.item):  # this machine's own read errors propagate
                for start in range(0, len(data), CHUNK):  # the relays take frames of CHUNK at most
                    piece = data[start : start + CHUNK]
                    if not put(piece):
                        return sent
                    sent += len(piece)
            if not put(b""):
                return sent
        put(json.dumps({"kind": "end"}).encode())
    finally:
        with contextlib.suppress(OSError):
            channel.shutdown_write()  # the relays end, whatever happened here
    return sent


def _read_events(
    lines: Iterator[str], report: NodeReport, board: ProgressBoard | None, node: str, total: int
) -> None:
    meter = Meter(time.monotonic(), total or None)
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event.get("event")
        if kind == "progress":
            report.item = event["path"]
            meter.set(time.monotonic(), float(event["bytes"]))
        elif kind == "item":
            report.item = event["path"]
            meter.set(time.monotonic(), float(event.get("bytes", meter.done)))
            if event["error"]:
                report.errors[event["path"]] = event["error"]
            else:
                report.done.add(event["path"])
        elif kind == "upstream-lost":
            report.upstream_lost = True
        elif kind == "no-upstream":
            report.no_upstream = True
            report.refused_connections = int(event.get("refused", 0))
        elif kind == "bad-stream":
            report.bad_stream = str(event.get("error"))
        elif kind == "downstream-lost":
            report.next_lost = event.get("node")
        elif kind == "done":
            report.finished = True
        if board is not None and kind in ("progress", "item"):
            board.update(node, f"{node}: " + describe_transfer(meter, time.monotonic()))


def file_chunks(item: Item) -> Iterator[bytes]:
    """An item's bytes from the controller: its file, or the content made here."""
    if item.content is not None:
        yield item.content
        return
    assert item.source is not None
    with open(item.source, "rb") as handle:
        yield from iter(lambda: handle.read(CHUNK), b"")


@dataclass
class Outcome:
    """How the distribution ended: nodes that have everything, failed ones with why, bytes sent."""

    complete: list[str]
    failed: dict[str, str]
    bytes_sent: int
    rounds: int


RoundPlan = tuple[list[ChainNode], list[Routed]]
"""A round's chain and what it carries."""


def _in_rounds(
    nodes: Sequence[ChainNode],
    plan: Callable[[Mapping[str, str], int], RoundPlan | None],
    chunks: Chunks,
    board: ProgressBoard | None,
    what: str,
    limits: RelayLimits,
) -> Outcome:
    """Rounds until `plan` (given the failed nodes and the round number) has nothing to send,
    at most one per node; a node that still lacks `what` after the last is failed too."""
    failed: dict[str, str] = {}
    sent, rounds = 0, 0
    while (planned := plan(failed, rounds)) is not None:
        chain, stream = planned
        if rounds == len(nodes):
            for node in chain:
                failed.setdefault(node.name, f"still lacks {what} after every round")
            break
        reports, round_sent = run_round(chain, stream, chunks, board, limits)
        sent += round_sent
        rounds += 1
        for name, report in reports.items():
            why = report.failure()
            if why is not None:
                failed[name] = why
    return Outcome([n.name for n in nodes if n.name not in failed], failed, sent, rounds)


def distribute(
    nodes: Sequence[ChainNode],
    items: Sequence[Item],
    chunks: Chunks = file_chunks,
    board: ProgressBoard | None = None,
    limits: RelayLimits = RelayLimits(),
) -> Outcome:
    """Every item on every node, through a chain, in rounds until no node lacks one it can take.

    Refused before anything is sent when a node lacks the disk space for what it lacks.
    """

    def plan(failed: Mapping[str, str], rounds: int) -> RoundPlan | None:
        healthy = [n for n in nodes if n.name not in failed]
        with ThreadPoolExecutor(max_workers=max(1, len(healthy))) as pool:
            checked = dict(
                zip(
                    [n.name for n in healthy],
                    pool.map(lambda n: check_node(n, items), healthy),
                    strict=True,
                )
            )
        needs = lacking(items, {name: found for name, (found, _) in checked.items()})
        if rounds == 0:
            require_room(needs, {name: free for name, (_, free) in checked.items()})
        names = chain_order([n.name for n in nodes], needs)
        if not names:
            return None
        return [n for n in nodes if n.name in names], routed_items(items, needs, names)

    return _in_rounds(nodes, plan, chunks, board, "files", limits)


@dataclass
class ImageOutcome(Outcome):
    """How an image's distribution ended, and what its first round carried."""

    first_round: ImageSend | None = None


def send_image(
    nodes: Sequence[ChainNode],
    image: str,
    source: ImageSource,
    lacks: Callable[[str], bool],
    layers_on: Callable[[str], NodeLayers],
    board: ProgressBoard | None = None,
    limits: RelayLimits = RelayLimits(),
) -> ImageOutcome:
    """`image` into `docker load` on every node that lacks it, through a chain; rounds as for
    files, around the nodes that failed.

    Each round asks the chain's nodes which layers they hold (`layers_on`) and carries only the
    layers from the lowest one a node lacks (the whole image when one lacks them all), read
    once from `source`; each relay checks every layer's sha256 against the image's diff IDs.
    Refused before anything is sent when a node's Docker data root lacks the room.
    """
    planned: list[ImageSend] = []

    def plan(failed: Mapping[str, str], rounds: int) -> RoundPlan | None:
        chain = [n for n in nodes if n.name not in failed and lacks(n.name)]
        if not chain:
            return None
        held = _each(chain, lambda n: layers_on(n.name))
        send = plan_image_send(source.layers, held, whole=source.whole_only)
        if rounds == 0:
            rooms = _each(chain, lambda n: replace(n, root=held[n.name].docker_root))
            free = _each(chain, lambda n: check_node(rooms[n.name], [])[1])
            roots = {name: layers.docker_root for name, layers in held.items()}
            require_image_room(image, send, free, roots)
        planned.append(send)
        return chain, [Routed(image_item(image, send), tuple(n.name for n in chain))]

    def chunks(_: Item) -> Iterator[bytes]:
        return source.save(planned[-1].drop)

    outcome = _in_rounds(nodes, plan, chunks, board, "the image", limits)
    return ImageOutcome(**vars(outcome), first_round=planned[0] if planned else None)


T = TypeVar("T")


def _each(chain: Sequence[ChainNode], action: Callable[[ChainNode], T]) -> dict[str, T]:
    """`action` on every node of the chain at once, by name; the first failure propagates."""
    with ThreadPoolExecutor(max_workers=max(1, len(chain))) as pool:
        return dict(zip([n.name for n in chain], pool.map(action, chain), strict=True))
