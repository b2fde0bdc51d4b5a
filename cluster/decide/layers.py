"""Which image layers each node lacks, and what the chain must carry (pure).

Docker keeps layers by chain ID (a layer with every layer below it), not by diff ID: a layer is
on a node when an image there has the same layers up to and including it. What a node lacks is
therefore a suffix of the image's layers, from the first one whose chain no image on the node
has; a round's stream carries the longest such suffix of the chain's nodes (each byte once),
and `docker load` on a node skips the layers it has.

The facts are `docker image inspect` of every image on a node (`RootFS.Layers`), `docker info`
(the data root, the image store) and, for the image sent, its history (the layers' sizes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cluster.decide.manifest import Item
from cluster.errors import VclusterError
from cluster.progress import format_bytes
from cluster.remote import relay

CONTAINERD_STORE = "io.containerd.snapshotter.v1"
"""`docker info`'s driver-type where Docker keeps images in containerd (an option since 24):
its `docker load` is not the layer store's, so such a node gets the whole image."""


class NoImageRoom(VclusterError):
    """A node's Docker data root lacks the room for the layers it must load."""


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Each layer's chain ID, as Docker's layer store names it (the relay's own function)."""
    return list(relay.chain_ids(list(diff_ids)))


@dataclass(frozen=True)
class ImageLayers:
    """The image to send: its ID, its layers (diff IDs, bottom first) and their sizes."""

    image_id: str
    diff_ids: tuple[str, ...]
    size: int
    """All its layers, unpacked (`docker image inspect`'s Size)."""
    layer_sizes: tuple[int, ...] = ()
    """The sizes `docker history` shows above 0, oldest first: every layer with content, in
    order (a layer without content, and a step that made no layer, both show 0)."""

    def suffix_bytes(self, start: int) -> int:
        """The size of the layers from `start` up: exact when every layer has content; else
        the most it can be (the last sizes shown); the whole image without a history."""
        count = len(self.diff_ids) - start
        if count <= 0:
            return 0
        if not self.layer_sizes:
            return self.size
        return sum(self.layer_sizes[-count:])


def parse_image_layers(inspect: Mapping, history: Sequence[Mapping] = ()) -> ImageLayers:
    """`docker image inspect` of one image (one element of the CLI's list, or the API's
    object) and its `GET /images/NAME/history` (newest first) as ImageLayers."""
    sizes = [int(entry.get("Size") or 0) for entry in reversed(history)]
    return ImageLayers(
        image_id=str(inspect["Id"]),
        diff_ids=tuple(inspect.get("RootFS", {}).get("Layers") or ()),
        size=int(inspect.get("Size") or 0),
        layer_sizes=tuple(size for size in sizes if size > 0),
    )


@dataclass(frozen=True)
class NodeLayers:
    """What one node holds: the chain IDs of every image there, where Docker keeps its data."""

    chains: frozenset[str]
    docker_root: str
    whole_images_only: bool = False
    """Images in containerd's store: `docker load` there gets the whole image."""


def parse_node_layers(inspects: Iterable[Mapping], info: Mapping) -> NodeLayers:
    """A node's layers from `docker image inspect` of each of its images and `docker info`."""
    chains: set[str] = set()
    for inspect in inspects:
        chains.update(chain_ids(inspect.get("RootFS", {}).get("Layers") or ()))
    return NodeLayers(
        chains=frozenset(chains),
        docker_root=str(info.get("DockerRootDir") or "/var/lib/docker"),
        whole_images_only=in_containerd_store(info),
    )


def in_containerd_store(info: Mapping) -> bool:
    """Whether `docker info` shows images kept in containerd's store (default from Docker
    Engine 29 and in Docker Desktop): its `docker save` names gzip-compressed layers by their
    compressed digest (moby#47065), not by the diff IDs of `RootFS.Layers`."""
    status = {str(pair[0]): str(pair[1]) for pair in info.get("DriverStatus") or () if pair}
    return status.get("driver-type") == CONTAINERD_STORE


def first_missing(image: ImageLayers, node: NodeLayers) -> int:
    """The index of the lowest layer the node lacks (len(diff_ids) when it has them all)."""
    if node.whole_images_only:
        return 0
    present = 0
    for chain in chain_ids(image.diff_ids):
        if chain not in node.chains:
            break
        present += 1
    return present


@dataclass(frozen=True)
class ImageSend:
    """A round's image: the layers each node lacks, and those the stream carries."""

    image: ImageLayers
    missing_from: Mapping[str, int]
    """Per node, the index of its lowest missing layer: it lacks that layer and all above."""
    carried_from: int
    drop: tuple[str, ...] = field(default=())
    """The diff IDs the stream leaves out: every node of the chain has them."""
    by_name: bool = False
    """The source's save names its layers by their compressed digest (containerd's store):
    the relays check each file against its name, not the diff IDs."""

    @property
    def carried(self) -> tuple[str, ...]:
        return self.image.diff_ids[self.carried_from :]

    @property
    def whole(self) -> bool:
        return self.carried_from == 0

    def carried_bytes(self) -> int:
        return self.image.suffix_bytes(self.carried_from)

    def bytes_to_load(self, node: str) -> int:
        """What `docker load` needs on the node: the stream unpacked in its temporary folder,
        and the node's missing layers unpacked in its store."""
        return self.carried_bytes() + self.image.suffix_bytes(self.missing_from[node])

    def describe(self) -> str:
        """`2 of 9 layer(s), about 85 MB` or `the whole image, about 2.1 GB`."""
        size = format_bytes(self.carried_bytes())
        if self.whole:
            return f"the whole image, about {size}"
        return f"{len(self.carried)} of {len(self.image.diff_ids)} layer(s), about {size}"


def plan_image_send(
    image: ImageLayers, nodes: Mapping[str, NodeLayers], whole: bool = False
) -> ImageSend:
    """What each node lacks of `image`, and the stream that serves them all at once: the
    layers from the lowest any of them lacks (no node: nothing). `whole`: the source's save
    cannot leave a layer out (containerd's store), so the stream carries every layer."""
    missing_from = {name: first_missing(image, layers) for name, layers in nodes.items()}
    carried_from = 0 if whole else min(missing_from.values(), default=len(image.diff_ids))
    carried = set(image.diff_ids[carried_from:])
    drop = tuple(d for d in dict.fromkeys(image.diff_ids[:carried_from]) if d not in carried)
    return ImageSend(image, missing_from, carried_from, drop, by_name=whole)


def image_room_problems(send: ImageSend, free: Mapping[str, int]) -> list[str]:
    """`node needs X under its Docker data root and has Y free` for every node short of room."""
    problems = []
    for node in send.missing_from:
        needed = send.bytes_to_load(node)
        if needed > free.get(node, 0):
            problems.append(
                f"{node} needs {format_bytes(needed)} under its Docker data root and has "
                f"{format_bytes(free.get(node, 0))} free"
            )
    return problems


def require_image_room(
    image: str, send: ImageSend, free: Mapping[str, int], roots: Mapping[str, str]
) -> None:
    problems = image_room_problems(send, free)
    if problems:
        names = [p.split()[0] for p in problems]
        folders = sorted({roots.get(n, "/var/lib/docker") for n in names})
        raise NoImageRoom(
            f"not enough disk space to load {image}: " + "; ".join(problems),
            where=", ".join(names),
            fix=f"free space under {', '.join(folders)} on those nodes (`docker image prune`), "
            "or move Docker's data-root to a larger disk",
        )


@dataclass(frozen=True)
class ImageItem(Item):
    """The image in the chain's stream: the relays check each layer against its diff IDs."""

    image_id: str = ""
    diff_ids: tuple[str, ...] = ()
    carried: tuple[str, ...] = ()
    by_name: bool = False

    def wire(self) -> dict:
        return {
            **super().wire(),
            "image_id": self.image_id,
            "diff_ids": list(self.diff_ids),
            "layers": list(self.carried),
            "by_name": self.by_name,
        }


def image_item(name: str, send: ImageSend) -> ImageItem:
    return ImageItem(
        "image",
        name,  # no size: the stream's tar is not known to the byte before it is read
        image_id=send.image.image_id,
        diff_ids=send.image.diff_ids,
        carried=send.carried,
        by_name=send.by_name,
    )
