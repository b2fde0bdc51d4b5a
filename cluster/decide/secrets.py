"""Secrets by reference: `env:NAME` or `file:/abs/path`, resolved only when a value is needed.

A `SecretRef` renders as its reference, never as its value, so plans, logs and errors can show
where a secret comes from without leaking it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import VclusterError

MASK = "********"
TOKEN_BYTES = 32
"""Random bytes in a token vcluster generates (256 bits, URL-safe base64 in the file)."""


@dataclass(frozen=True)
class SecretRef:
    """Where a secret lives: an environment variable of the controller or a file on it."""

    source: str  # "env" or "file"
    name: str  # the variable name or the absolute path

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        """Parse `env:NAME` or `file:/abs/path`; raise ValueError with the accepted forms."""
        kind, sep, name = text.partition(":")
        if not sep or kind not in ("env", "file") or not name:
            raise ValueError("a secret must be a reference, 'env:NAME' or 'file:/absolute/path'")
        if kind == "file" and not Path(name).expanduser().is_absolute():
            raise ValueError(f"secret file path must be absolute, got {name!r}")
        if kind == "env" and not name.replace("_", "").isalnum():
            raise ValueError(f"invalid environment variable name {name!r}")
        return cls(kind, name)

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"

    def resolve(self, environ: Mapping[str, str] | None = None) -> str:
        """Read the secret's value; a missing one is a `VclusterError` naming the reference."""
        environ = os.environ if environ is None else environ
        if self.source == "env":
            value = environ.get(self.name)
            if not value:
                raise VclusterError(
                    f"secret {self} is not set",
                    fix=f"export {self.name}=... before running vcluster",
                )
            return value
        path = Path(self.name).expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise VclusterError(
                f"secret {self} cannot be read: {exc.strerror}",
                fix=f"create {path} holding the secret (mode 0600)",
            ) from None
        if not value:
            raise VclusterError(f"secret {self} is empty", fix=f"write the secret into {path}")
        return value


def redact(text: str, secrets: list[str]) -> str:
    """Replace every occurrence of each secret value in `text` by the mask."""
    for value in secrets:
        if value:
            text = text.replace(value, MASK)
    return text


def ensure_token_file(path: Path) -> bool:
    """Create `path` holding a new random token, readable by its owner only, unless it exists.

    Returns True when it was created now. The folder is made owner-only too, also one that
    existed with a wider mode (mkdir's mode applies only to a folder it creates); an existing
    file that others may read is refused (its token may have leaked).
    """
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)
    except OSError as exc:
        raise VclusterError(
            f"cannot make {folder} readable by its owner only: {exc.strerror}",
            fix=f"run vcluster as the owner of {folder}, or set VCLUSTER_STATE_DIR to a folder "
            "of yours",
        ) from None
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            raise VclusterError(
                f"{path} may be read by other users than its owner",
                fix=f"chmod 600 {path} (or delete it: a new token is made, then run "
                "`vcluster up --recreate`)",
            ) from None
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as token_file:
        token_file.write(secrets.token_urlsafe(TOKEN_BYTES) + "\n")
    return True
