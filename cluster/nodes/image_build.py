"""Build a derived image on a node's Docker over its SSH connection (the Docker SDK's build API).

The build context (the Dockerfile, and the wheels of a wheelhouse when there are some) is a tar
made on the controller and streamed to the node; nothing is written on the node besides the
image. The legacy builder's output lines feed the same progress as the sandbox's builds.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import docker
import docker.errors

from cluster.decide.ray_image import (
    CONSTRAINTS_FILE,
    WHEELS_DIR,
    RayImageRecipe,
    constraints_text,
    dockerfile,
)
from cluster.errors import VclusterError
from cluster.nodes.build_progress import DockerBuildProgress, clean_line
from cluster.nodes.transport.docker import docker_client
from cluster.nodes.transport.ssh import SshConnection

BUILD_TIMEOUT_S = 1800.0
"""pip installs Ray (and what it needs) from an index: minutes on a slow link."""
LOG_TAIL_LINES = 8


class ImageBuildError(VclusterError):
    """`docker build` of a derived image failed on a node."""


def built_recipe(client: docker.DockerClient, recipe: RayImageRecipe) -> str | None:
    """The ID of `recipe.tag` on this engine when it was built from this very recipe."""
    try:
        image = client.images.get(recipe.tag)
    except docker.errors.ImageNotFound:
        return None
    labels = image.attrs.get("Config", {}).get("Labels") or {}
    return image.id if labels == {**labels, **recipe.labels} else None


def build_context(recipe: RayImageRecipe, into: IO[bytes]) -> None:
    """Write the build context of `recipe` (a tar) into the open file `into`."""
    with tarfile.open(fileobj=into, mode="w") as tar:
        for name, text in (
            ("Dockerfile", dockerfile(recipe)),
            (CONSTRAINTS_FILE, constraints_text(recipe)),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for wheel in recipe.wheels:
            tar.add(wheel, arcname=f"{WHEELS_DIR}/{wheel.name}")
    into.seek(0)


def build_on_node(
    ssh: SshConnection,
    recipe: RayImageRecipe,
    progress: Callable[[str, float | None], None],
) -> str:
    """Build `recipe` on the node behind `ssh`; the new image's ID. `progress` gets the build's
    status line and its fraction done (steps done of the total) as its output comes."""
    watch = DockerBuildProgress(recipe.tag, time.monotonic())
    tail: list[str] = []
    client = docker_client(ssh, timeout_s=BUILD_TIMEOUT_S)
    try:
        with tempfile.TemporaryFile() as context:
            build_context(recipe, context)
            stream = client.api.build(
                fileobj=context,
                custom_context=True,
                tag=recipe.tag,
                labels=recipe.labels,
                network_mode="host",
                rm=True,
                forcerm=True,
                decode=True,
                pull=False,
            )
            for chunk in stream:
                if "error" in chunk:
                    raise ImageBuildError(
                        f"docker build of {recipe.tag} failed: {chunk['error'].strip()[-300:]}"
                        + (f" (last lines: {' | '.join(tail)})" if tail else ""),
                        where=ssh.target.label,
                        fix=_fix(recipe),
                    )
                for line in str(chunk.get("stream", "")).splitlines():
                    now = time.monotonic()
                    watch.feed(line, now)
                    text = clean_line(line)
                    if text:
                        tail = [*tail, text][-LOG_TAIL_LINES:]
                    progress(watch.describe(now), watch.fraction())
        built = built_recipe(client, recipe)
    except (docker.errors.DockerException, OSError) as exc:
        raise ImageBuildError(
            f"docker build of {recipe.tag} failed: {type(exc).__name__}: {str(exc)[:300]}",
            where=ssh.target.label,
            fix=_fix(recipe),
        ) from None
    finally:
        client.close()
    if built is None:
        raise ImageBuildError(
            f"docker build of {recipe.tag} ended without the image ({' | '.join(tail)})",
            where=ssh.target.label,
            fix=_fix(recipe),
        )
    return built


def _fix(recipe: RayImageRecipe) -> str:
    if recipe.from_wheelhouse:
        return (
            "add the missing wheels to the wheelhouse (ray.wheelhouse), or name an image with Ray"
        )
    return (
        f"check that the head reaches {recipe.index_url} (a proxy, a mirror in ray.index_url), "
        "or set ray.wheelhouse, or name an image with Ray"
    )


def wheel_bytes(recipe: RayImageRecipe) -> int:
    """What the build context weighs: the wheels it carries."""
    return sum(Path(w).stat().st_size for w in recipe.wheels)
