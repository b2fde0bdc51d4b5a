"""Which models `up` sends to the nodes (pure): those with a `source` folder on this machine.

Which node lacks which file is decided per round of the chain from each node's check
(cluster/decide/chain.py: `lacking`, `chain_order`, `routed_items`), since the check that gives
those facts is the relay's, run as each round starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.decide.hub import hub_models
from cluster.decide.inventory import Inventory, Model
from cluster.decide.manifest import models_with_source
from cluster.decide.up.outcome import Unchanged


@dataclass(frozen=True)
class SendModels:
    """Each of `models` to every node, through the chain (only what a node lacks); then each
    of `from_hub`, downloaded once first (cluster/decide/hub.py)."""

    models: tuple[Model, ...]
    from_hub: tuple[Model, ...] = ()


def decide_model_files(inventory: Inventory) -> SendModels | Unchanged:
    models = models_with_source(inventory)
    from_hub = hub_models(inventory)
    if not models and not from_hub:
        # hub models with `download: nodes` and paths without `source` are not sent
        return Unchanged("not applicable: no model has a source folder")
    return SendModels(tuple(models), tuple(from_hub))
