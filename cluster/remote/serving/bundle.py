"""The serving package as one zip that `python3` runs: what `up` puts into the containers."""

from __future__ import annotations

import hashlib
import io
import zipfile

from cluster.remote.registry import PACKAGE, serving_files

BUNDLE_NAME = "serving.pyz"


def bundle_bytes() -> bytes:
    """A zip app of `cluster/remote/serving` (and the bare packages it sits in)."""
    buffer = io.BytesIO()
    fixed = (2020, 1, 1, 0, 0, 0)  # the same bytes for the same code: its digest names it
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            zipfile.ZipInfo("__main__.py", fixed),
            (PACKAGE / "remote/serving/__main__.py").read_bytes(),
        )
        for package in ("__init__.py", "remote/__init__.py"):
            archive.writestr(
                zipfile.ZipInfo(f"cluster/{package}", fixed), (PACKAGE / package).read_bytes()
            )
        for path in serving_files():
            info = zipfile.ZipInfo(f"cluster/{path}", fixed)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, (PACKAGE / path).read_bytes())
    return buffer.getvalue()


def bundle_digest() -> str:
    return hashlib.sha256(bundle_bytes()).hexdigest()[:16]
