"""Rules over the image: one image ID on every node, and what it holds (vLLM, Ray) against what
the inventory asks."""

from __future__ import annotations

from collections.abc import Mapping

from cluster.decide.checks.result import CheckResult, fails, majority, passes, skips, warns
from cluster.decide.inventory import Inventory
from cluster.decide.runtime import ADD_RAY_FIX, Runtime
from cluster.errors import VclusterError
from cluster.facts.image import ImageFacts


def check_image(inventory: Inventory, image_ids: Mapping[str, str | None]) -> list[CheckResult]:
    """The inventory's image on every node with one ID; `image_ids[node]` None: not there.

    A node without it is fine (`up` copies it over SSH); different IDs under one name are not.
    """
    present = {name: image_id for name, image_id in image_ids.items() if image_id}
    missing = [name for name, image_id in image_ids.items() if not image_id]
    if not present:
        return [
            warns(
                "image",
                None,
                f"{inventory.image} is on no node",
                "`up` will try to pull it, then to copy it from this machine; "
                "or `docker load` it on one node",
            )
        ]
    common = majority(present)
    results = [
        fails(
            "image",
            name,
            f"{inventory.image} is {image_id[:19]} here, {common[:19]} on the others",
            f"remove or re-tag it here (`docker rmi {inventory.image}`) so `up` copies the "
            "common one",
        )
        for name, image_id in present.items()
        if image_id != common
    ]
    if missing:
        detail = f"{inventory.image} missing on {', '.join(missing)}: `up` will copy it"
        results.append(warns("image", None, detail))
    if not results:
        detail = f"{inventory.image} {common[:19]} on every node"
        results.append(passes("image", None, detail))
    return results


def check_runtime(
    inventory: Inventory,
    facts: ImageFacts | None,
    runtime: Runtime | None,
    probe_error: VclusterError | None = None,
) -> list[CheckResult]:
    """What the image holds, and whether the cluster it leads to is what the inventory asks.

    An image without Ray is fine when `up` can derive a Ray-ready one, or when vLLM's own
    multi-node mode is allowed (a WARN: the Ray parts are then off); it FAILs only when
    `executor: ray` is asked for and Ray cannot be had, or the image could not be probed.
    """
    if probe_error is not None:
        return [
            fails(
                "executor",
                probe_error.where,
                f"{inventory.image}: {probe_error.message}",
                probe_error.fix or "",
            )
        ]
    if facts is None or runtime is None:
        return [
            skips(
                "executor",
                None,
                f"{inventory.image} is on no node yet: `up` probes it once it has copied it",
            )
        ]
    summary = facts.summary()
    if facts.vllm is None:
        return [
            fails(
                "executor",
                None,
                f"{inventory.image} has no vLLM ({summary})",
                "name a vLLM image (vllm/vllm-openai:TAG, or one built on it) in image:",
            )
        ]
    if runtime.problem is not None:
        return [fails("executor", None, f"{runtime.problem} ({summary})", runtime.fix or "")]
    if runtime.fallback:
        return [
            warns(
                "executor",
                None,
                f"{summary}: {runtime.reason}",
                f"for a Ray cluster: {ADD_RAY_FIX}; executor: mp says this is intended",
            )
        ]
    cluster = "Ray cluster" if runtime.ray else "no Ray cluster"
    detail = f"{summary}: {cluster}, vLLM executor {runtime.executor}; {runtime.reason}"
    return [passes("executor", None, detail)]
