"""A sandbox inventory turned into one that serves several models (for tests and bench/router).

The head gets two CPU device slots (`gpu_ids: [0, 1]`), the other nodes one: a model over
every node (pipeline parallel = nodes) leaves room for a one-node model on the head and none
for a second model over every node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cluster.sandbox.inventory_file import MODEL_ARGS
from cluster.sandbox.model import SECOND_MODEL_NAME, TINY_MODEL_NAME
from cluster.sandbox.nodes import NODE_MODEL_CACHE

MODEL_A = f"{NODE_MODEL_CACHE}/models/{TINY_MODEL_NAME}"
MODEL_B = f"{NODE_MODEL_CACHE}/models/{SECOND_MODEL_NAME}"


def write_routed_inventory(
    base: Path, target: Path, models: list[dict[str, Any]], **extra: Any
) -> Path:
    """`base` (a sandbox's inventory) with `models:` instead of `model:`; written to `target`."""
    document = yaml.safe_load(base.read_text())
    document.pop("model")
    document["models"] = models
    document["nodes"][0]["gpu_ids"] = [0, 1]
    document.update(extra)
    target.write_text(yaml.safe_dump(document, sort_keys=False))
    return target


def tiny(served: str, path: str = MODEL_A, *args: str, **keys: Any) -> dict[str, Any]:
    """A model entry for one of the sandbox's tiny models."""
    return {"name": path, "served_name": served, "args": [*MODEL_ARGS, *args], **keys}
