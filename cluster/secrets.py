"""Secrets by reference: `env:NAME` or `file:/abs/path`, resolved only when a value is needed.

A `SecretRef` renders as its reference, never as its value, so plans, logs and errors can show
where a secret comes from without leaking it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import VclusterError

MASK = "********"


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
