"""What is sent: a model's files from a folder on the controller, as items for the chain.

A model named by a path inside the model cache lands at that path. A model named by a hub id
lands in the Hugging Face cache layout, which vLLM reads with the hub offline
(HF_HUB_OFFLINE=1): `hub/models--ORG--NAME/blobs/<sha256>` holds each file's bytes,
`snapshots/<revision>/<file>` links to its blob, `refs/main` names the revision. The revision
is a digest of the manifest: the same files give the same snapshot.

Hashing 140 GB takes minutes, so a file's sha256 is kept on the controller by (path, size,
modification time) and read again only when one of them changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cluster.decide.inventory import Inventory, Model
from cluster.decide.state_paths import file_hashes_path
from cluster.errors import VclusterError

CHUNK = 1 << 20


class SourceError(VclusterError):
    """The model's source folder cannot be read."""


@dataclass(frozen=True)
class Item:
    """One thing to place on the nodes, under the model cache (`path` is relative to it)."""

    kind: str  # file | link | image (`path` is then the image's name)
    path: str
    size: int = 0
    sha256: str = ""
    source: str | None = None  # the file on the controller
    target: str | None = None  # a link's target
    content: bytes | None = None  # a small file made here (refs/main)

    def wire(self) -> dict:
        """What the relays see of it (no controller path, no content)."""
        return {
            "kind": self.kind,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "target": self.target,
        }


def hub_folder(model_id: str) -> str:
    """The cache folder of a hub model: `hub/models--ORG--NAME`."""
    return f"hub/models--{model_id.replace('/', '--')}"


def model_items(source: Path, name: str, model_cache: str) -> list[Item]:
    """Every item that puts the model in `source` on a node as `name` (a path or a hub id)."""
    files = _files(source)
    if name.startswith("/"):
        base = PurePosixPath(name).relative_to(model_cache)
        return [
            Item("file", str(base / rel), size, digest, str(source / rel))
            for rel, size, digest in files
        ]
    revision = hashlib.sha1(  # noqa: S324 (a name, like git's: not a security digest)
        json.dumps(files, sort_keys=True).encode()
    ).hexdigest()
    return hub_items(name, revision, files, source)


def snapshot_items(snapshot: Path, name: str) -> list[Item]:
    """Every item that puts a snapshot of the hub's cache layout on a node (`snapshot` is
    `.../models--ORG--NAME/snapshots/COMMIT`, its files links to blobs): under the same commit."""
    return hub_items(name, snapshot.name, _files(snapshot, follow_links=True), snapshot)


def hub_items(
    name: str, revision: str, files: Sequence[tuple[str, int, str]], source: Path | None
) -> list[Item]:
    """The hub cache layout of `files` (relative path, size, sha256) as snapshot `revision` of
    hub model `name`, `refs/main` naming it; each file read from `source` (None: from
    elsewhere, the caller's chunks say where)."""
    folder = PurePosixPath(hub_folder(name))
    items: list[Item] = []
    for rel, size, digest in files:
        origin = str(source / rel) if source is not None else None
        items.append(Item("file", str(folder / "blobs" / digest), size, digest, origin))
    for rel, _, digest in files:
        depth = len(PurePosixPath(rel).parts) - 1
        target = "/".join([".."] * (depth + 2) + ["blobs", digest])
        items.append(Item("link", str(folder / "snapshots" / revision / rel), target=target))
    ref = revision.encode()
    ref_path = str(folder / "refs" / "main")
    items.append(Item("file", ref_path, len(ref), hashlib.sha256(ref).hexdigest(), content=ref))
    return _unique(items)


def _unique(items: list[Item]) -> list[Item]:
    """One item per path (two files with the same bytes share one blob)."""
    return list({item.path: item for item in items}.values())


def _files(source: Path, *, follow_links: bool = False) -> list[tuple[str, int, str]]:
    """(relative path, size, sha256) of every regular file under `source`, sorted; with
    `follow_links`, of every link to one too (a hub snapshot's files are links to blobs)."""
    if not source.is_dir():
        raise SourceError(
            f"{source} is not a folder on this machine",
            fix="set source: to the folder that holds the model's files (config.json, weights)",
        )
    cache = _HashCache()
    found = []
    for path in sorted(
        p for p in source.rglob("*") if p.is_file() and (follow_links or not p.is_symlink())
    ):
        rel = path.relative_to(source).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # .git, .cache: not the model's
        found.append((rel, path.stat().st_size, cache.sha256(path)))
    cache.save()
    if not found:
        raise SourceError(f"{source} holds no file", fix="point source: at the model's folder")
    return found


class _HashCache:
    """sha256 of files by (path, size, mtime), in the controller's state folder."""

    def __init__(self) -> None:
        self.path = file_hashes_path()
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        info = path.stat()
        key = f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}"
        if key not in self.known:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    digest.update(block)
            self.known[key] = digest.hexdigest()
            self.changed = True
        return self.known[key]

    def save(self) -> None:
        if self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text(json.dumps(self.known))
            os.replace(partial, self.path)


def wire_list(items: list[Item]) -> str:
    return json.dumps([item.wire() for item in items])


def models_with_source(inventory: Inventory, names: Sequence[str] = ()) -> list[Model]:
    """The inventory's models that have a `source` (those named, when names are given)."""
    return [m for m in inventory.model_list if m.source and (not names or m.served in names)]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
"""The files of a model folder that hold its weights."""


def source_weights_bytes(inventory: Inventory) -> dict[str, int]:
    """Each model's weights in its `source` folder on this machine, by served name (models
    without one, or whose folder is missing, are left out: their size is unknown)."""
    sizes = {}
    for model in models_with_source(inventory):
        assert model.source is not None
        folder = Path(model.source).expanduser()
        if folder.is_dir():
            sizes[model.served] = sum(
                path.stat().st_size
                for path in folder.rglob("*")
                if path.suffix in WEIGHT_SUFFIXES and path.is_file()
            )
    return sizes
