"""The serving package as one zip that `python3` runs: what `up` puts into the containers."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import cluster

BUNDLE_NAME = "serving.pyz"
_PACKAGE = Path(__file__).parent


def bundle_bytes() -> bytes:
    """A zip app of `cluster/serving` (and the bare `cluster` package it sits in)."""
    buffer = io.BytesIO()
    fixed = (2020, 1, 1, 0, 0, 0)  # the same bytes for the same code: its digest names it
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            zipfile.ZipInfo("__main__.py", fixed), (_PACKAGE / "__main__.py").read_bytes()
        )
        archive.writestr(zipfile.ZipInfo("cluster/__init__.py", fixed),
                         Path(cluster.__file__).read_bytes())  # fmt: skip
        for path in sorted(_PACKAGE.glob("*.py")):
            if path.name == "bundle.py":
                continue
            info = zipfile.ZipInfo(f"cluster/serving/{path.name}", fixed)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def bundle_digest() -> str:
    return hashlib.sha256(bundle_bytes()).hexdigest()[:16]
