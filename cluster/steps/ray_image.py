"""Step: the Ray-ready image, when the runtime asks for one: built once, on the head, then put
on every node with the same one-ID check as the inventory's image.

A node that already holds the tag built from the same recipe keeps it; the head builds only
when no node has it. Nothing is done when the image has Ray, or the cluster runs without Ray.
"""

from __future__ import annotations

import time

from cluster.decide.inventory import Inventory
from cluster.decide.ray_image import RayImageRecipe
from cluster.decide.runtime import ADD_RAY_FIX
from cluster.decide.up.images import RayImageNeeded, decide_build
from cluster.decide.up.outcome import Unchanged
from cluster.errors import VclusterError
from cluster.nodes.image_build import build_on_node, built_recipe, wheel_bytes
from cluster.nodes.lock import ClusterLock
from cluster.nodes.session import Session
from cluster.progress import format_bytes
from cluster.steps.base import Reporter, Step, progress_board, run_steps
from cluster.steps.connect import connect_to_hosts
from cluster.steps.context import UpContext
from cluster.steps.image import ensure_image, place_image
from cluster.steps.image_facts import gather_image_facts, ray_supply


def ensure_ray_image(context: UpContext) -> str:
    decided = context.require_decision().ray_image
    if isinstance(decided, Unchanged):
        return decided.because
    return put_ray_image(context, decided)


def put_ray_image(context: UpContext, needed: RayImageNeeded) -> str:
    """The Ray-ready image on every node: built on the head unless a node has it, then placed
    like the inventory's image; its facts must show Ray."""
    recipe = needed.recipe
    if recipe is None:  # built before from this very source; a node holds it
        built = "built before"
        placed = place_image(context, needed.tag, pull=False)
    else:
        built = derive_image(context, recipe)
        placed = place_image(
            context, recipe.tag, pull=False, present=lambda client: built_recipe(client, recipe)
        )
    facts = gather_image_facts(context.inventory, context.session, needed.tag)
    if facts is None or not facts.has_ray:
        summary = facts.summary() if facts else "no facts"
        raise VclusterError(
            f"{needed.tag} was built but Ray is not in it ({summary})",
            where=context.inventory.head.node_name,
            fix=f"remove it (docker rmi {needed.tag}) on every node and run `vcluster up` again",
        )
    return f"{built}; {placed}; Ray {facts.ray}"


def derive_image(context: UpContext, recipe: RayImageRecipe) -> str:
    """Build `recipe` on the head unless a node has it; what was done, in a few words."""
    session = context.session
    have = session.on_each(lambda node: built_recipe(session.docker(node), recipe)).succeeded
    holders = [node for node, found in have.items() if found is not None]
    decided = decide_build(holders, context.inventory.head.node_name)
    if isinstance(decided, Unchanged):
        return decided.because
    head = decided.node
    origin = (
        f"{len(recipe.wheels)} wheel(s), {format_bytes(wheel_bytes(recipe))}, from the wheelhouse"
        if recipe.from_wheelhouse
        else f"pip from {recipe.index_url}"
    )
    heading = f"building {recipe.tag} on {head}: {recipe.requirement} ({origin})"
    started = time.monotonic()
    with progress_board(context.reporter, heading) as board:
        image_id = build_on_node(
            session.ssh(head),
            recipe,
            lambda text, fraction: board.update(head, text, fraction),
        )
        board.finish(head, f"{head}: built in {time.monotonic() - started:.0f} s")
    context.changes.append(f"built {recipe.tag} on {head}")
    return f"built on {head} ({image_id[:19]})"


def build_ray_image(inventory: Inventory, reporter: Reporter) -> str:
    """`vcluster image build`: the Ray-ready image of the inventory's image, on every node; its
    tag (the inventory's own image when that has Ray already)."""
    needed: list[RayImageNeeded] = []

    def recipe_asked_for(context: UpContext) -> str:
        """Image facts, and the recipe whatever the executor: the user asked for the image."""
        facts = gather_image_facts(inventory, context.session)
        if facts is None:
            raise VclusterError(f"{inventory.image} is on no node after the image step")
        if facts.has_ray:
            return f"{facts.summary()}: nothing to build"
        supply = ray_supply(inventory, context.session, facts)
        if supply.recipe is None:
            raise VclusterError(
                f"cannot derive a Ray-ready image of {inventory.image} ({facts.summary()}): "
                f"{supply.why_not}",
                where=inventory.head.node_name,
                fix=supply.fix or ADD_RAY_FIX,
            )
        needed.append(RayImageNeeded(supply.recipe.tag, supply.recipe, "asked for"))
        return f"{facts.summary()}; to build: {supply.recipe.describe()}"

    def ray_image(context: UpContext) -> str:
        return put_ray_image(context, needed[0]) if needed else "not needed"

    with Session(inventory) as session:
        context = UpContext(inventory, session, reporter)
        run_steps([Step("Connecting to the hosts", connect_to_hosts)], context, reporter)
        with ClusterLock(session.ssh(inventory.head.node_name), inventory.cluster, "image build"):
            steps = [
                Step("Image on every node", ensure_image),
                Step("Image facts", recipe_asked_for),
                Step("Ray-ready image", ray_image),
            ]
            run_steps(steps, context, reporter)
        return needed[0].tag if needed else inventory.image
