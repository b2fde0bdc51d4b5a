"""The controller's cache of image facts: one JSON file per image ID under vcluster's state folder.

An image ID names one immutable image, so an entry never goes stale; an entry that cannot be
read back as facts of that very ID is a miss, and the image is probed again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from cluster.decide.state_paths import image_facts_dir
from cluster.facts.image import ImageFacts

_TEXT_FIELDS = ("image_id", "python", "machine")


def from_dict(data: object) -> ImageFacts | None:
    """The inverse of `ImageFacts.to_dict(packages=True)`; None when `data` is not that."""
    if not isinstance(data, Mapping) or not all(isinstance(data.get(k), str) for k in _TEXT_FIELDS):
        return None
    known = {k: v for k, v in data.items() if k in ImageFacts.__dataclass_fields__}
    known["entrypoint"] = tuple(known.get("entrypoint") or ())
    if not isinstance(known.get("packages", {}), Mapping):
        return None
    try:
        return ImageFacts(**known)
    except TypeError:
        return None


class ImageFactsCache:
    """Facts by image ID, one JSON file each."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, image_id: str) -> Path:
        return self.folder / f"{image_id.removeprefix('sha256:')}.json"

    def get(self, image_id: str) -> ImageFacts | None:
        try:
            facts = from_dict(json.loads(self._path(image_id).read_text()))
        except (OSError, ValueError):
            return None  # absent or unreadable: probe again
        return facts if facts is not None and facts.image_id == image_id else None

    def put(self, facts: ImageFacts) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(facts.image_id)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(facts.to_dict(packages=True), sort_keys=True))
        partial.replace(path)


def image_facts_cache() -> ImageFactsCache:
    """The controller's cache, under vcluster's state folder."""
    return ImageFactsCache(image_facts_dir())
