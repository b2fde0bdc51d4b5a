"""Images on nodes without a registry: `docker save` on a source, `docker load` on the target.

The bytes flow source -> controller -> target over the two hosts' SSH connections (or from the
controller's own Docker), as an air-gapped site moves images; nothing is written to disk on the
way.
"""

from __future__ import annotations

import contextlib
import subprocess
from typing import BinaryIO

import docker
import docker.errors

from cluster.errors import VclusterError
from cluster.transport.ssh import SshConnection

TRANSFER_TIMEOUT_S = 1800.0
"""A 20 GB vLLM image over a slow link takes many minutes; this bounds a stuck transfer."""


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


def copy_between_nodes(source: SshConnection, target: SshConnection, image: str) -> None:
    """Stream `image` from one node's Docker into another's."""
    channel = source.open_channel(["docker", "save", image])
    try:
        with channel.makefile("rb") as stream:
            _load(target, stream, image, f"from {source.target.name}")
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
    try:
        client = docker.from_env(timeout=30)
    except docker.errors.DockerException:
        return None
    with contextlib.closing(client):
        return image_id(client, image)


def copy_from_controller(target: SshConnection, image: str) -> None:
    """Stream `image` from the controller's own Docker into a node's."""
    with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        _load(target, save.stdout, image, "from this machine")
    if save.returncode != 0:
        raise ImageError(f"`docker save {image}` failed here (exit {save.returncode})")


def _load(target: SshConnection, stream: BinaryIO, image: str, origin: str) -> None:
    result = target.run(["docker", "load"], stdin=stream, timeout=TRANSFER_TIMEOUT_S)
    if not result.ok:
        raise ImageError(
            f"`docker load` of {image} {origin} failed: {result.stderr.strip()[-300:]}",
            where=target.target.label,
            fix="check free disk space under the node's Docker data root",
        )
