"""Images on nodes without a registry: what a node or this machine holds, and `docker save`
streams of it, read once and sent through the chain of nodes (cluster/distribution), as an
air-gapped site moves images; nothing is written to disk on the way.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from typing import TypeVar

import docker
import docker.errors

from cluster.errors import VclusterError
from cluster.nodes.transport.ssh import SshConnection

T = TypeVar("T")


class ImageError(VclusterError):
    """An image could not be found, pulled or copied."""


def image_id(client: docker.DockerClient, image: str) -> str | None:
    """The ID of `image` on this Docker engine, or None when it is not there."""
    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        return None


def try_pull(client: docker.DockerClient, image: str) -> str | None:
    """Pull `image`; its ID, or None when no registry has it (air-gapped nodes)."""
    try:
        return client.images.pull(image).id
    except docker.errors.APIError:
        return None


def image_size(client: docker.DockerClient, image: str) -> int | None:
    """The size of `image`'s layers on this engine in bytes, or None when it is not there.

    `docker save` streams a little more (tar headers, the image's JSON): a few percent.
    """
    try:
        return int(client.images.get(image).attrs["Size"])
    except (docker.errors.ImageNotFound, KeyError, TypeError, ValueError):
        return None


def local_image_id(image: str) -> str | None:
    """The ID of `image` in the controller's own Docker (DOCKER_HOST), or None."""
    return _on_local_docker(lambda client: image_id(client, image))


def local_image_size(image: str) -> int | None:
    """The size of `image` in the controller's own Docker (see `image_size`), or None."""
    return _on_local_docker(lambda client: image_size(client, image))


def _on_local_docker(action: Callable[[docker.DockerClient], T]) -> T | None:
    try:
        client = docker.from_env(timeout=30)
    except docker.errors.DockerException:
        return None
    with contextlib.closing(client):
        return action(client)


SAVE_CHUNK = 1 << 20


def saved_here(image: str) -> Iterator[bytes]:
    """`docker save` of `image` in the controller's own Docker, chunk by chunk."""
    with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        yield from iter(lambda: save.stdout.read(SAVE_CHUNK), b"")  # type: ignore[union-attr]
    if save.returncode != 0:
        raise ImageError(f"`docker save {image}` failed here (exit {save.returncode})")


def saved_on_node(source: SshConnection, image: str) -> Iterator[bytes]:
    """`docker save` of `image` on a node, read over SSH chunk by chunk."""
    channel = source.open_channel(["docker", "save", image])
    try:
        yield from iter(lambda: channel.recv(SAVE_CHUNK), b"")
        status = channel.recv_exit_status()
    finally:
        channel.close()
    if status != 0:
        raise ImageError(
            f"`docker save {image}` failed on {source.target.name} (exit {status})",
            where=source.target.label,
            fix="check the image there with `docker image inspect`",
        )
