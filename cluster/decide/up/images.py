"""Which nodes lack an image, by ID, and whether a Ray-ready image is needed (pure).

The inventory's image goes on every node, or on the head alone when the nodes run a Ray-ready
image derived from it there. A node lacks it when its Docker has no image of that name; nodes
that have it must hold one ID (vcluster never overwrites an image it did not bring).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.decide.ray_image import RayImageRecipe
from cluster.decide.runtime import Runtime
from cluster.decide.up.outcome import Unchanged
from cluster.errors import VclusterError


class ImageMismatch(VclusterError):
    """Nodes hold different images under the inventory's image name."""


@dataclass(frozen=True)
class ImagePlacement:
    """`image` on `nodes`; `missing`: those of them without it, to be pulled or sent."""

    image: str
    nodes: tuple[str, ...]
    missing: tuple[str, ...]


def image_targets(
    image: str, runtime: Runtime | None, head: str, connected: Sequence[str]
) -> tuple[str, ...]:
    """Where the inventory's `image` must be: every connected node, or the head alone when
    the runtime (known: the image was on a node) runs a Ray-ready image derived from it."""
    if runtime is not None and runtime.image != image:
        return (head,)
    return tuple(connected)


def decide_image(image: str, found: Mapping[str, str | None]) -> ImagePlacement:
    """Which of the nodes (`found`: node -> its ID of `image`, None: not there) lack `image`;
    raise when those that have it hold different IDs."""
    require_one_id(image, found)
    missing = tuple(node for node, image_id in found.items() if image_id is None)
    return ImagePlacement(image, tuple(found), missing)


def require_one_id(image: str, found: Mapping[str, str | None]) -> None:
    """Raise naming the odd nodes when `image` has more than one ID among the nodes."""
    counts = Counter(v for v in found.values() if v is not None)
    if len(counts) <= 1:
        return
    common = counts.most_common(1)[0][0]
    odd = {node: image_id for node, image_id in found.items() if image_id not in (common, None)}
    detail = ", ".join(f"{node} has {image_id[:19]}" for node, image_id in odd.items() if image_id)
    raise ImageMismatch(
        f"{image} is a different image on some nodes ({detail}; the others {common[:19]})",
        where=", ".join(odd),
        fix=f"remove it there (docker rmi {image}) and run `vcluster up` again to copy the right one",
    )


@dataclass(frozen=True)
class RayImageNeeded:
    """The nodes run `tag`, a Ray-ready image of the inventory's: built from `recipe` unless a
    node has it, or (`recipe` None) built before and held by a node."""

    tag: str
    recipe: RayImageRecipe | None
    why: str


def decide_ray_image(image: str, runtime: Runtime) -> RayImageNeeded | Unchanged:
    """Whether the runtime asks for a Ray-ready image of the inventory's `image`."""
    if runtime.image == image:
        return Unchanged("not needed" if runtime.ray else "not needed: no Ray cluster")
    return RayImageNeeded(runtime.image, runtime.derive, runtime.reason)


@dataclass(frozen=True)
class Build:
    """Build the recipe on `node`."""

    node: str


def decide_build(holders: Sequence[str], head: str) -> Build | Unchanged:
    """Build on the head unless a node already holds the image of this recipe (`holders`, in
    the order asked)."""
    if holders:
        return Unchanged(f"already built ({holders[0]})")
    return Build(head)
