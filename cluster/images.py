"""Images on nodes without a registry: `docker save` on a source, `docker load` on the target.

The bytes flow source -> controller -> target over the two hosts' SSH connections (or from the
controller's own Docker), as an air-gapped site moves images; nothing is written to disk on the
way.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from typing import TypeVar

import docker
import docker.errors

from cluster.errors import VclusterError
from cluster.progress import ByteSource, ProgressBoard, metered
from cluster.transport.ssh import SshConnection

TRANSFER_TIMEOUT_S = 1800.0
"""A 20 GB vLLM image over a slow link takes many minutes; this bounds a stuck transfer."""
LOADING = "docker load is unpacking it"
"""What a node does once every byte is there: Docker registers each layer."""

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


def copy_between_nodes(
    source: SshConnection,
    target: SshConnection,
    image: str,
    board: ProgressBoard | None = None,
    size: int | None = None,
) -> None:
    """Stream `image` from one node's Docker into another's.

    With a `board`, the bytes sent show on it under the target's name, against `size` (the
    image's size, an estimate of the stream's).
    """
    channel = source.open_channel(["docker", "save", image])
    try:
        with channel.makefile("rb") as stream:
            _load(target, stream, image, f"from {source.target.name}", board, size)
        status = channel.recv_exit_status()
    finally:
        channel.close()
    if status != 0:
        raise ImageError(
            f"`docker save {image}` failed on {source.target.name} (exit {status})",
            where=source.target.label,
            fix="check the image there with `docker image inspect`",
        )


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


def copy_from_controller(
    target: SshConnection,
    image: str,
    board: ProgressBoard | None = None,
    size: int | None = None,
) -> None:
    """Stream `image` from the controller's own Docker into a node's (progress as for
    `copy_between_nodes`)."""
    with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        _load(target, save.stdout, image, "from this machine", board, size)
    if save.returncode != 0:
        raise ImageError(f"`docker save {image}` failed here (exit {save.returncode})")


def _load(
    target: SshConnection,
    stream: ByteSource,
    image: str,
    origin: str,
    board: ProgressBoard | None,
    size: int | None,
) -> None:
    key = target.target.name
    with metered(board, key, stream, size, estimated=True, after_sent=LOADING) as counted:
        result = target.run(["docker", "load"], stdin=counted, timeout=TRANSFER_TIMEOUT_S)
    if not result.ok:
        raise ImageError(
            f"`docker load` of {image} {origin} failed: {result.stderr.strip()[-300:]}",
            where=target.target.label,
            fix="check free disk space under the node's Docker data root",
        )
