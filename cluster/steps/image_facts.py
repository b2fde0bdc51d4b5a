"""Step: what the inventory's image holds, and the runtime chosen on it.

Image facts come from the controller's cache when the image's ID is known there; otherwise the
probe runs once, in a throw-away container on one node that has the image (the head first).
Where Ray could come from is asked only when the image has no Ray: the wheelhouse named in the
inventory, or else whether the head reaches the package index; and a Ray-ready image of this
very source that a node already holds is used when neither is there any more.
"""

from __future__ import annotations

from pathlib import Path

import docker
import docker.errors

from cluster.decide.checks import check_runtime, failed
from cluster.decide.inventory import Inventory
from cluster.decide.ray_image import SOURCE_ID_LABEL, RayImageError, index_address, recipe_for
from cluster.decide.runtime import RaySupply, Runtime, choose_runtime
from cluster.errors import VclusterError
from cluster.facts.image import PROBE_TIMEOUT_S, ImageFacts, parse_image_probe, probe_argv
from cluster.nodes.image_cache import ImageFactsCache, image_facts_cache
from cluster.nodes.session import Session
from cluster.steps.context import UpContext

INDEX_REACH_TIMEOUT_S = 5


def gather_image_facts(
    inventory: Inventory,
    session: Session,
    image: str | None = None,
    cache: ImageFactsCache | None = None,
) -> ImageFacts | None:
    """The facts of `image` (the inventory's by default), from the first connected node (head
    first) that has it; None when no connected node has it yet. A node whose Docker does not
    answer is passed over (the `docker` check names it)."""
    cache = cache or image_facts_cache()
    image = image or inventory.image
    for node in inventory.head_first:
        name = node.node_name
        if name not in session.connections:
            continue
        found = session.on_each(lambda n: _image_on(session.docker(n), image), [name])[name]
        if found.value is None:
            continue
        found_id, entrypoint = found.value
        cached = cache.get(found_id)
        if cached is not None:
            return cached
        result = session.ssh(name).run(probe_argv(image), timeout=PROBE_TIMEOUT_S)
        try:
            facts = parse_image_probe(result.stdout + result.stderr, found_id, entrypoint)
        except VclusterError as error:
            error.where = name
            raise
        cache.put(facts)
        return facts
    return None


def _image_on(client: docker.DockerClient, image: str) -> tuple[str, tuple[str, ...]] | None:
    """The image's ID and entrypoint on this engine, or None when it is not there."""
    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound:
        return None
    entrypoint = (found.attrs.get("Config") or {}).get("Entrypoint") or ()
    return str(found.id), tuple(entrypoint)


def ray_supply(inventory: Inventory, session: Session, facts: ImageFacts) -> RaySupply:
    """Where Ray could come from for `facts`' image: the wheelhouse, else the index if the head
    reaches it; with the Ray-ready image built from it before, if a node holds one."""
    supply = _new_supply(inventory, session, facts)
    if supply.recipe is not None:
        return supply
    built = _built_before(inventory, session, facts)
    return RaySupply(None, supply.why_not, supply.fix, built)


def _new_supply(inventory: Inventory, session: Session, facts: ImageFacts) -> RaySupply:
    settings = inventory.ray
    if settings.wheelhouse is not None:
        folder = Path(settings.wheelhouse).expanduser()
        if not folder.is_dir():
            return RaySupply(None, f"the wheelhouse {folder} is not a folder on this machine")
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".whl"))
        try:
            recipe = recipe_for(
                facts,
                inventory.image,
                wheelhouse=folder,
                wheel_names=names,
                ray_version=settings.version,
            )
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
        recipe = recipe_for(
            facts, inventory.image, index_url=settings.index_url, ray_version=settings.version
        )
    except RayImageError as error:
        return RaySupply(None, error.message, error.fix)
    return RaySupply(recipe)


def _built_before(inventory: Inventory, session: Session, facts: ImageFacts) -> str | None:
    """The tag of a Ray-ready image of this very source on a node (the newest; of
    `ray.version` when set), or None."""
    label = f"{SOURCE_ID_LABEL}={facts.image_id}"

    def tagged(node: str) -> list[tuple[str, str]]:
        images = session.docker(node).images.list(filters={"label": label})
        return [(str(i.attrs.get("Created", "")), tag) for i in images for tag in i.tags]

    found = [x for found in session.on_each(tagged).succeeded.values() for x in found]
    version = inventory.ray.version
    wanted = [
        (created, tag) for created, tag in found if not version or tag.endswith(f"-ray{version}")
    ]
    return max(wanted)[1] if wanted else None


def _reaches(session: Session, node: str, host: str, port: int) -> bool:
    """A TCP connection from `node` to host:port opens (bash's /dev/tcp: nothing to install)."""
    argv = ["timeout", str(INDEX_REACH_TIMEOUT_S)]
    argv += ["bash", "-c", 'exec 3<>"/dev/tcp/$1/$2"', "reach", host, str(port)]
    return session.ssh(node).run(argv, timeout=INDEX_REACH_TIMEOUT_S + 5).ok


def decide_runtime(
    inventory: Inventory, session: Session, facts: ImageFacts, derive: bool = True
) -> Runtime:
    """The runtime for the image's facts; `derive=False` refuses a derived Ray-ready image."""
    if facts.has_ray or inventory.executor == "mp":
        return choose_runtime(inventory, facts, RaySupply(None))
    if not derive:
        off = RaySupply(
            None,
            "deriving a Ray-ready image is turned off (--no-ray-image)",
            "run `vcluster up` without --no-ray-image, name an image with Ray, or set executor: mp",
        )
        return choose_runtime(inventory, facts, off)
    return choose_runtime(inventory, facts, ray_supply(inventory, session, facts))


def learn_runtime(context: UpContext) -> None:
    """Image facts and the runtime into `context`, when some connected node has the image; a
    probe that fails is kept as `context.image_error` for the checks to report."""
    if context.runtime is not None or context.image_error is not None:
        return
    try:
        facts = gather_image_facts(context.inventory, context.session)
        if facts is None:
            return
        runtime = decide_runtime(
            context.inventory, context.session, facts, derive=context.options.derive_ray_image
        )
    except VclusterError as error:
        context.image_error = error
        return
    context.image_facts, context.runtime = facts, runtime


def learn_image(context: UpContext) -> str:
    """The step: image facts (known since preflight, or probed now that the image is on every
    node) and the runtime they lead to; Planning follows them."""
    learn_runtime(context)
    if context.image_error is not None:
        raise context.image_error
    facts, runtime = context.image_facts, context.runtime
    if facts is None or runtime is None:
        raise VclusterError(
            f"{context.inventory.image} is on no node after the image step",
            fix="run `vcluster up` again; if it repeats, check `docker images` on the head",
        )
    # the preflight's rule, for an image that was on no node when preflight ran
    for result in failed(check_runtime(context.inventory, facts, runtime)):
        raise VclusterError(
            result.detail, where=context.inventory.head.node_name, fix=result.remedy
        )
    return f"{facts.summary()}; {runtime.reason}"
