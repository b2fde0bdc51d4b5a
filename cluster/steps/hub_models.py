"""Part of the step "Model files on every node" (and `vcluster models pull`): each hub model
without `source` downloaded once, here or on the head, then sent through the chain to every
node's model cache like a `source` folder. Which models: cluster/decide/hub.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cluster.decide.hub import HubError, revision_of
from cluster.decide.inventory import Inventory, Model
from cluster.decide.manifest import Item, hub_items, snapshot_items
from cluster.nodes.hub import Downloaded, download_here, download_on_head, head_chunks
from cluster.nodes.session import Session
from cluster.nodes.transfer import (
    ChainNode,
    Chunks,
    DistributionError,
    chain_nodes,
    distribute,
    file_chunks,
)
from cluster.progress import format_bytes
from cluster.steps.base import Reporter, progress_board


def send_hub_models(
    inventory: Inventory,
    session: Session,
    reporter: Reporter,
    models: Sequence[Model],
    addresses: Mapping[str, str] | None = None,
) -> list[str]:
    """Each model downloaded once and on every node; a line per model. Raises naming the model
    (a download) or the nodes that failed (the others have it)."""
    nodes = chain_nodes(inventory, session, addresses)
    token = inventory.secrets.hf_token
    return [
        send_hub_model(nodes, model, token.resolve() if token else None, reporter)
        for model in models
    ]


def send_hub_model(
    nodes: Sequence[ChainNode], model: Model, token: str | None, reporter: Reporter
) -> str:
    """One model downloaded once (here, or on the first node, the head, with `download:
    head`), then sent through the chain to the nodes that lack it; the step's line for it."""
    on_head = model.download == "head"
    where = nodes[0].name if on_head else "this machine"
    heading = f"{model.served}: {model.name} at {revision_of(model)} from the hub, on {where}"
    with progress_board(reporter, heading) as board:
        if on_head:
            got = download_on_head(nodes[0], model, token, board)
        else:
            got = download_here(model, token, board)
    items, chunks = _items(model, got, nodes[0] if on_head else None)
    size = sum(i.size for i in items)
    heading = f"{model.served}: {len(items)} item(s), {format_bytes(size)}, to {len(nodes)} node(s)"
    with progress_board(reporter, heading) as board:
        outcome = distribute(nodes, items, chunks, board=board)
    if outcome.failed:
        raise DistributionError(
            f"{model.served} did not reach every node: "
            + "; ".join(f"{node}: {why}" for node, why in outcome.failed.items())
            + f" (the others have it: {', '.join(outcome.complete) or 'none'})",
            where=", ".join(outcome.failed),
            fix="run the command again: it downloads nothing more and sends only what lacks",
        )
    files = sum(1 for i in items if i.kind == "file")
    sent = (
        f"every node has its {files} file(s), verified"
        if outcome.rounds == 0
        else f"{files} file(s) verified on {len(outcome.complete)} node(s); "
        f"{format_bytes(outcome.bytes_sent)} sent by this machine in {outcome.rounds} round(s)"
    )
    return (
        f"{model.served}: {sent} (hub revision {revision_of(model)} = {got.commit[:12]}, "
        f"downloaded once on {where})"
    )


def _items(model: Model, got: Downloaded, head: ChainNode | None) -> tuple[list[Item], Chunks]:
    """What is sent, and where its bytes are read: here, or the head's cache over SSH."""
    if got.snapshot is not None:
        return snapshot_items(got.snapshot, model.name), file_chunks
    if head is None or not got.files:
        raise HubError(
            f"{model.name}: the download listed no file",
            where=head.name if head else "this machine",
            fix="check the model's revision on the hub: it has no file",
        )
    return hub_items(model.name, got.commit, got.files, None), head_chunks(head, model)
