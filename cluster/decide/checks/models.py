"""Rules over the model's files: in every node's cache, and (with a `source`) verified."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cluster.decide.checks.result import CheckResult, fails, passes, warns
from cluster.decide.hub import where_downloaded
from cluster.decide.inventory import Inventory, Model
from cluster.decide.manifest import Item


def check_model_present(
    inventory: Inventory, present: Mapping[str, bool], served: Model | None = None
) -> list[CheckResult]:
    """The model (the first by default) in every node's cache: required for a local path, else
    downloaded at start."""
    model = (served or inventory.primary_model).name
    local = model.startswith("/")
    missing = [name for name, found in present.items() if not found]
    if not missing:
        return [passes("model", None, f"{model} in every node's cache")]
    once = where_downloaded(served or inventory.primary_model)
    if once in ("controller", "head"):  # `up` downloads it once and sends it (docs/distribution.md)
        where = "on this machine" if once == "controller" else "on the head"
        sent = f"`up` downloads it once ({where}) and sends it"
        remedy = "`vcluster models pull` does it before `up`"
        if len(missing) == len(present):
            return [warns("model", None, f"{model} is in no node's cache: {sent}", remedy)]
        return [
            warns("model", name, f"{model} is not in this node's cache: {sent}", remedy)
            for name in missing
        ]
    if local:
        return [
            fails(
                "model",
                name,
                f"{model} is not on this node",
                f"copy the model to {model} on every node (e.g. rsync from a node that has it)",
            )
            for name in missing
        ]
    if len(missing) == len(present):
        detail = f"{model} is in no node's cache: each node downloads it at start"
        remedy = (
            "make sure the nodes reach the Hugging Face hub (and secrets.hf_token for gated models)"
        )
        return [warns("model", None, detail, remedy)]
    return [
        warns(
            "model",
            name,
            f"{model} not downloaded here (other nodes have it)",
            f"download it here too (`hf download {model}`) so every node serves the same files",
        )
        for name in missing
    ]


def check_model_files(
    served: str, items: Sequence[Item], states: Mapping[str, Mapping[str, str]]
) -> list[CheckResult]:
    """Per node, the files of a model with a `source`: all there and verified, or which lack.

    A WARN, not a FAIL: `up` sends what lacks before vLLM starts (`vcluster models pull` too).
    """
    files = [item for item in items if item.kind == "file" and item.source is not None]
    results = []
    for node, found in states.items():
        bad = [_shown(item) for item in files if found.get(item.path) != "ok"]
        if not bad:
            results.append(passes("model files", node, f"{served}: {len(files)} file(s) verified"))
            continue
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        changed = [i for i in files if found.get(i.path) in ("size", "sha256")]
        what = f"{len(changed)} differ from the source, " if changed else ""
        results.append(
            warns(
                "model files",
                node,
                f"{served}: {len(bad)} of {len(files)} file(s) missing or wrong ({what}{shown})",
                "`vcluster up` or `vcluster models pull` sends them (only those)",
            )
        )
    return results


def _shown(item: Item) -> str:
    """A model file as its source folder names it (a hub blob is named by its sha256)."""
    return (item.source or item.path).rsplit("/", 1)[-1]
