"""What the cluster runs, decided from the image's facts (pure): which image, Ray or not, which
vLLM executor, and why.

The cluster stays a Ray cluster whenever it can: an image with Ray is used as it is; an image
without Ray (vLLM's own from 0.19.1 on) gets a derived Ray-ready image when Ray can be had (a
wheelhouse on the controller, or a package index the head reaches), or the one derived from it
before when it is still on a node. Only when none of these is there does the cluster fall back
to vLLM's own multi-node mode, and `executor: ray` then cannot be honoured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from cluster.decide.inventory import Inventory
from cluster.decide.ray_image import RayImageRecipe
from cluster.facts.image import ImageFacts

Executor = Literal["ray", "mp"]

ADD_RAY_FIX = (
    "set ray.wheelhouse to a folder of Ray wheels on this machine, make the package index "
    "reachable from the head (ray.index_url), or name an image with Ray"
)


@dataclass(frozen=True)
class RaySupply:
    """Where Ray could come from for an image without it."""

    recipe: RayImageRecipe | None
    """The derived image's recipe, or None when Ray cannot be had now."""
    why_not: str | None = None
    """Why there is no recipe (no wheelhouse and the index unreachable from the head, ...)."""
    fix: str | None = None
    """How to make Ray available, when the cause has a fix of its own."""
    built: str | None = None
    """A Ray-ready image of this very source that a node already holds (its tag)."""


@dataclass(frozen=True)
class Runtime:
    """The image the containers run, whether they form a Ray cluster, and vLLM's executor."""

    image: str
    ray: bool
    executor: Executor
    reason: str
    """One sentence for `plan` and `up`: why this image and executor."""
    derive: RayImageRecipe | None = None
    """Set when `image` is a Ray-ready image to build (or found built) from the recipe."""
    problem: str | None = None
    """Set when the inventory asks for what the image cannot do (`executor: ray`, no Ray)."""
    fix: str | None = None
    facts: str | None = None
    """The image facts it was chosen on, in one line (None without facts)."""
    fallback: bool = False
    """vLLM's own multi-node mode because Ray could not be had (not because it was asked)."""
    vllm_version: str | None = None
    """The image's vLLM (None without facts): the known traps (cluster/decide/traps.py) compare it."""
    image_has_ray: bool | None = None
    """Whether the inventory's image itself has Ray (None without facts)."""


def assumed_runtime(inventory: Inventory, why: str = "offline") -> Runtime:
    """The runtime without image facts (an offline plan, or no node has the image yet): the
    image is taken to have Ray."""
    return Runtime(
        image=inventory.image,
        ray=True,
        executor=inventory.default_executor,
        reason=f"image facts not gathered ({why}): the image is taken to have Ray",
    )


def ray_ready(inventory: Inventory, facts: ImageFacts, recipe: RayImageRecipe) -> Runtime:
    """The runtime on the Ray-ready image of `recipe`."""
    return Runtime(
        recipe.tag,
        True,
        inventory.default_executor,
        f"{_named(inventory, facts)} has no Ray: the cluster runs the Ray-ready "
        f"{recipe.describe()}",
        derive=recipe,
        facts=facts.summary(),
        vllm_version=facts.vllm,
        image_has_ray=facts.has_ray,
    )


def choose_runtime(inventory: Inventory, facts: ImageFacts, supply: RaySupply) -> Runtime:
    """The runtime for `inventory` given what its image holds and where Ray could come from."""
    return dataclasses.replace(
        _choose(inventory, facts, supply),
        facts=facts.summary(),
        vllm_version=facts.vllm,
        image_has_ray=facts.has_ray,
    )


def _choose(inventory: Inventory, facts: ImageFacts, supply: RaySupply) -> Runtime:
    image = inventory.image
    executor = inventory.default_executor
    named = _named(inventory, facts)
    if facts.has_ray:
        return Runtime(image, True, executor, f"{image} has Ray {facts.ray}")
    if inventory.executor == "mp":
        return Runtime(
            image, False, "mp", f"{named} has no Ray and executor: mp needs none: no Ray cluster"
        )
    if inventory.routed:
        return Runtime(
            image,
            False,
            "mp",
            f"{named} has no Ray, and several models need none (each runs in vLLM's own "
            "multi-node mode): no Ray cluster",
        )
    if supply.recipe is not None:
        return ray_ready(inventory, facts, supply.recipe)
    if supply.built is not None:
        return Runtime(
            supply.built,
            True,
            executor,
            f"{named} has no Ray: the cluster runs its Ray-ready {supply.built}, built before "
            f"(Ray cannot be added now: {supply.why_not})",
        )
    no_ray = f"{named} has no Ray, and Ray cannot be added ({supply.why_not})"
    if inventory.executor == "ray":
        return Runtime(
            image,
            False,
            "ray",
            no_ray,
            problem=f"vLLM's Ray executor is asked for (executor: ray), but {no_ray}",
            fix=supply.fix or f"{ADD_RAY_FIX}; or set executor: mp",
        )
    return Runtime(
        image,
        False,
        "mp",
        f"{no_ray}: vLLM's own multi-node mode (--nnodes/--node-rank/--headless), no Ray cluster",
        fallback=True,
    )


def _named(inventory: Inventory, facts: ImageFacts) -> str:
    vllm = f"vLLM {facts.vllm}" if facts.vllm else "no vLLM"
    return f"{inventory.image} ({vllm})"
