"""Step: what the inventory's image holds, and the runtime chosen on it.

Image facts come from the controller's cache when the image's ID is known there; otherwise the
probe runs once, in a throw-away container on one node that has the image (the head first).
Where Ray could come from is asked only when the image has no Ray: the wheelhouse named in the
inventory, or else whether the head reaches the package index.
"""

from __future__ import annotations

from pathlib import Path

from cluster.checks import check_runtime, failed
from cluster.errors import VclusterError
from cluster.facts.image import (
    PROBE_TIMEOUT_S,
    ImageFacts,
    ImageFactsCache,
    image_facts_cache,
    parse_image_probe,
    probe_argv,
)
from cluster.images import image_id
from cluster.inventory import Inventory
from cluster.plan import build_plan
from cluster.ray_image import RayImageError, index_address, recipe_for
from cluster.runtime import RaySupply, Runtime, choose_runtime
from cluster.session import Session
from cluster.steps.context import UpContext

INDEX_REACH_TIMEOUT_S = 5


def gather_image_facts(
    inventory: Inventory,
    session: Session,
    image: str | None = None,
    cache: ImageFactsCache | None = None,
) -> ImageFacts | None:
    """The facts of `image` (the inventory's by default), from the first connected node (head
    first) that has it; None when no connected node has it yet."""
    cache = cache or image_facts_cache()
    image = image or inventory.image
    for node in [inventory.head, *inventory.workers]:
        name = node.node_name
        if name not in session.connections:
            continue
        client = session.docker(name)
        found = image_id(client, image)
        if found is None:
            continue
        cached = cache.get(found)
        if cached is not None:
            return cached
        result = session.ssh(name).run(probe_argv(image), timeout=PROBE_TIMEOUT_S)
        entrypoint = client.images.get(found).attrs.get("Config", {}).get("Entrypoint") or ()
        try:
            facts = parse_image_probe(result.stdout + result.stderr, found, tuple(entrypoint))
        except VclusterError as error:
            error.where = name
            raise
        cache.put(facts)
        return facts
    return None


def ray_supply(inventory: Inventory, session: Session, facts: ImageFacts) -> RaySupply:
    """Where Ray could come from for `facts`' image: the wheelhouse, else the index if the
    head reaches it."""
    settings = inventory.ray
    if settings.wheelhouse is not None:
        folder = Path(settings.wheelhouse).expanduser()
        if not folder.is_dir():
            return RaySupply(None, f"the wheelhouse {folder} is not a folder on this machine")
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".whl"))
        try:
            recipe = recipe_for(facts, inventory.image, wheelhouse=folder, wheel_names=names,
                                ray_version=settings.version)  # fmt: skip
        except RayImageError as error:
            return RaySupply(None, error.message, error.fix)
        return RaySupply(recipe)
    host, port = index_address(settings.index_url)
    head = inventory.head.node_name
    if head not in session.connections:
        return RaySupply(None, "the head is unreachable")
    if not _reaches(session, head, host, port):
        return RaySupply(
            None,
            f"no ray.wheelhouse is set and the head cannot reach the package index "
            f"{settings.index_url} at {host}:{port}",
        )
    try:
        recipe = recipe_for(facts, inventory.image, index_url=settings.index_url,
                            ray_version=settings.version)  # fmt: skip
    except RayImageError as error:
        return RaySupply(None, error.message, error.fix)
    return RaySupply(recipe)


def _reaches(session: Session, node: str, host: str, port: int) -> bool:
    """A TCP connection from `node` to host:port opens (bash's /dev/tcp: nothing to install)."""
    argv = ["timeout", str(INDEX_REACH_TIMEOUT_S), "bash", "-c", 'exec 3<>"/dev/tcp/$1/$2"',
            "reach", host, str(port)]  # fmt: skip
    return session.ssh(node).run(argv, timeout=INDEX_REACH_TIMEOUT_S + 5).ok


def decide_runtime(
    inventory: Inventory, session: Session, facts: ImageFacts, derive: bool = True
) -> Runtime:
    """The runtime for the image's facts; `derive=False` refuses a derived Ray-ready image."""
    if facts.has_ray or inventory.executor == "mp":
        return choose_runtime(inventory, facts, RaySupply(None))
    if not derive:
        return choose_runtime(
            inventory, facts, RaySupply(None, "deriving a Ray-ready image is off")
        )
    return choose_runtime(inventory, facts, ray_supply(inventory, session, facts))


def learn_runtime(context: UpContext) -> None:
    """Image facts and the runtime into `context`, when some connected node has the image."""
    if context.runtime is not None:
        return
    facts = gather_image_facts(context.inventory, context.session)
    if facts is None:
        return
    context.image_facts = facts
    context.runtime = decide_runtime(
        context.inventory, context.session, facts, derive=context.options.derive_ray_image
    )


def learn_image(context: UpContext) -> str:
    """The step: image facts (known since preflight, or probed now that the image is on every
    node), the runtime they lead to, and the plan for it."""
    learn_runtime(context)
    facts, runtime = context.image_facts, context.runtime
    if facts is None or runtime is None:
        raise VclusterError(
            f"{context.inventory.image} is on no node after the image step",
            fix="run `vcluster up` again; if it repeats, check `docker images` on the head",
        )
    # the preflight's rule, for an image that was on no node when preflight ran
    for result in failed(check_runtime(context.inventory, facts, runtime)):
        raise VclusterError(result.detail, where=context.inventory.head.node_name,
                            fix=result.remedy)  # fmt: skip
    if context.node_facts:  # `up`: the plan follows the runtime
        context.plan = build_plan(context.inventory, context.node_facts, runtime)
    return f"{facts.summary()}; {runtime.reason}"
