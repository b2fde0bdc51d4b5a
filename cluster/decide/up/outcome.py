"""The result of a decision with nothing to do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unchanged:
    """Nothing to do; `because` is the step's status line."""

    because: str
