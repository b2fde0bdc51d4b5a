"""The workload image and the tiny model reach the nodes over SSH, as on air-gapped servers.

The image goes `docker save` -> SSH (vcluster's own transport) -> `docker load`, to every
node in parallel, and only to nodes that lack that image ID; afterwards every node must report
the same ID. `docker save` runs once per image ID: its archive is kept in
`/var/cache/vcluster/images/` (the save takes 16 s for the 2 GB image on this kind of
machine), so a warm `sandbox up` only streams.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from cluster.nodes.transport.fanout import fan_out
from cluster.nodes.transport.ssh import SshConnection
from cluster.progress import ProgressBoard, board_for, format_bytes, metered
from cluster.sandbox.dockerd import LocalDocker
from cluster.sandbox.filelock import file_lock
from cluster.sandbox.images import CACHE_DIR
from cluster.sandbox.model import RECIPE_FILE
from cluster.sandbox.nodes import NODE_MODEL_CACHE, SandboxError

ARCHIVE_DIR = CACHE_DIR / "images"
SAVE_TIMEOUT_S = 900.0
LOAD_TIMEOUT_S = 1800.0
"""Bounds one node's `docker load` of a streamed image (2 minutes is usual here)."""
LOADING = "docker load is unpacking it"
"""What a node does once every byte is there (Docker 20.10 then registers each layer)."""

Progress = Callable[[str], None]


def _name(connection: SshConnection) -> str:
    return connection.target.name


def archive_path(image: str, image_id: str, folder: Path = ARCHIVE_DIR) -> Path:
    """Where the `docker save` archive of this image ID lives (pure)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", image)
    return folder / f"{slug}@{image_id.removeprefix('sha256:')[:16]}.tar"


def image_archive(
    local: LocalDocker, image: str, image_id: str, folder: Path = ARCHIVE_DIR
) -> tuple[Path, bool]:
    """The archive of `image` at `image_id` (saved now unless kept); (path, saved_now).

    Archives of older IDs of the same image are removed: one archive per image on disk.
    """
    path = archive_path(image, image_id, folder)
    with file_lock(folder / ".lock"):  # one saver at a time across processes
        if path.exists():
            return path, False
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        done = subprocess.run(
            local.argv("save", "--output", str(partial), image),
            capture_output=True,
            text=True,
            timeout=SAVE_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise SandboxError(
                f"`docker save {image}` failed: {done.stderr.strip()[-300:]}",
                where="localhost",
                fix=f"check free disk space under {folder}",
            )
        os.replace(partial, path)
        for older in folder.glob(path.name.split("@")[0] + "@*.tar"):
            if older != path:
                older.unlink(missing_ok=True)
    return path, True


def remote_image_id(connection: SshConnection, image: str) -> str | None:
    """The ID of `image` in a node's Docker, or None when it is not there."""
    result = connection.run(["docker", "image", "inspect", "--format", "{{.Id}}", image])
    return result.stdout.strip() if result.ok else None


def _load(connection: SshConnection, archive: Path, board: ProgressBoard | None = None) -> None:
    size = archive.stat().st_size
    with (
        archive.open("rb") as file,
        metered(board, _name(connection), file, size, after_sent=LOADING) as stream,
    ):
        result = connection.run(["docker", "load"], stdin=stream, timeout=LOAD_TIMEOUT_S)
    if not result.ok or "Loaded image" not in result.stdout:
        raise SandboxError(
            f"`docker load` of the streamed image failed: {result.stderr.strip()[-300:]}",
            where=connection.target.label,
            fix="free memory or disk space here (nodes keep their Docker data in a tmpfs, or in a "
            "volume with --node-storage disk), or run `sandbox up` with the other --node-storage",
        )


def image_to_nodes(
    local: LocalDocker,
    connections: list[SshConnection],
    image: str,
    wanted_id: str,
    progress: Progress,
) -> int:
    """Stream `image` to every node that lacks `wanted_id`, in parallel; check every ID after.

    Returns how many nodes received it. Each node's bytes, rate and time left show on
    `progress`: a line per node redrawn in place on a terminal, plain lines otherwise.
    """
    present = fan_out(connections, lambda c: remote_image_id(c, image), name=_name)
    present.raise_if_failed("asking the nodes for their image")
    lacking = [c for c in connections if present[_name(c)].value != wanted_id]
    if lacking:
        started = time.monotonic()
        archive, saved = image_archive(local, image, wanted_id)
        if saved:
            progress(f"saved {image} to {archive} ({time.monotonic() - started:.1f}s)")
        size = format_bytes(archive.stat().st_size)
        names = ", ".join(_name(c) for c in lacking)
        progress(f"streaming {image} ({size}) over SSH to {names}")
        with board_for(progress) as board:
            sent = fan_out(lacking, lambda c: _load(c, archive, board), name=_name)
        sent.raise_if_failed(f"streaming {image}")
    after = fan_out(connections, lambda c: remote_image_id(c, image), name=_name)
    after.raise_if_failed("checking the image on the nodes")
    odd = {host: found for host, found in after.succeeded.items() if found != wanted_id}
    if odd:
        raise SandboxError(
            f"{image} is not {wanted_id[:19]} on "
            + ", ".join(f"{host} ({found or 'missing'})" for host, found in odd.items()),
            where="localhost",
            fix="run `vcluster sandbox up` again (it streams the image again)",
        )
    return len(lacking)


def model_to_node(connection: SshConnection, model_dir: Path) -> bool:
    """Copy the model into the node's cache (a tar over SSH) unless the same recipe is there.

    Returns True when it was copied.
    """
    name = model_dir.name
    target = f"{NODE_MODEL_CACHE}/models/{name}"
    recipe = (model_dir / RECIPE_FILE).read_text().strip()
    present = connection.run(["cat", f"{target}/{RECIPE_FILE}"])
    if present.ok and present.stdout.strip() == recipe:
        return False
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(model_dir, arcname=name)
    # The script is constant; the folder and the model name come in as $0 and $1.
    unpack = 'rm -rf "$0/$1" && mkdir -p "$0" && tar -x --no-same-owner -C "$0"'
    connection.run(
        ["sh", "-c", unpack, f"{NODE_MODEL_CACHE}/models", name],
        stdin=archive.getvalue(),
        check=True,
        fix="check free disk space on this machine",
    )
    return True
