"""Step (and `vcluster models pull`): each model with a `source` folder on every node's model
cache, sent once by this machine through the chain of nodes, every file checked on arrival.

Which models: cluster/decide/up/models.py; which node lacks which file is decided per round of
the chain, from each node's check (cluster/decide/chain.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from cluster.decide.inventory import Inventory, Model
from cluster.decide.manifest import Item, model_items
from cluster.decide.up.models import decide_model_files
from cluster.decide.up.outcome import Unchanged
from cluster.nodes.session import Session
from cluster.nodes.transfer import DistributionError, Outcome, chain_nodes, distribute
from cluster.progress import format_bytes
from cluster.steps.base import Reporter, progress_board
from cluster.steps.context import UpContext
from cluster.steps.hub_models import send_hub_models


def send_models(
    inventory: Inventory,
    session: Session,
    reporter: Reporter,
    models: Sequence[Model],
    addresses: Mapping[str, str] | None = None,
) -> list[str]:
    """Each model on every node; a line per model. Raises naming the nodes that failed (the
    others have it)."""
    nodes = chain_nodes(inventory, session, addresses)
    lines = []
    for model in models:
        assert model.source is not None
        items = model_items(Path(model.source).expanduser(), model.name, inventory.model_cache)
        size = sum(i.size for i in items)
        heading = (
            f"{model.served}: {len(items)} item(s), {format_bytes(size)}, to {len(nodes)} node(s)"
        )
        with progress_board(reporter, heading) as board:
            outcome = distribute(nodes, items, board=board)
        lines.append(describe(model, items, outcome))
        if outcome.failed:
            raise DistributionError(
                f"{model.served} did not reach every node: "
                + "; ".join(f"{node}: {why}" for node, why in outcome.failed.items())
                + f" (the others have it: {', '.join(outcome.complete) or 'none'})",
                where=", ".join(outcome.failed),
                fix="run the command again: it sends only what those nodes lack",
            )
    return lines


def describe(model: Model, items: Sequence[Item], outcome: Outcome) -> str:
    files = sum(1 for i in items if i.kind == "file")
    if outcome.rounds == 0:
        return f"{model.served}: every node has its {files} file(s), verified"
    return (
        f"{model.served}: {files} file(s) verified on {len(outcome.complete)} node(s); "
        f"{format_bytes(outcome.bytes_sent)} sent by this machine in {outcome.rounds} round(s)"
    )


def model_files_step(context: UpContext) -> str:
    decided = decide_model_files(context.inventory)
    if isinstance(decided, Unchanged):
        return decided.because
    addresses = {name: facts.address for name, facts in context.node_facts.items()}
    lines = send_models(
        context.inventory, context.session, context.reporter, decided.models, addresses
    )
    lines += send_hub_models(  # downloaded once, then sent the same way
        context.inventory, context.session, context.reporter, decided.from_hub, addresses
    )
    return "; ".join(lines)
