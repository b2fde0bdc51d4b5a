"""Whether `up` makes the cluster's Ray token or agent token (pure), and whether a new one
replaces the running containers.

A token file vcluster made is kept; a missing one is made. Containers that run with a token
this controller no longer has must restart with the new one: for the agent token always; for
the Ray token only with `--recreate`, since the token may just be missing from this controller
(another controller started the cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.decide.plan import NodePlan
from cluster.decide.up.containers import FoundContainer
from cluster.decide.up.outcome import Unchanged
from cluster.errors import VclusterError


@dataclass(frozen=True)
class MakeToken:
    """Make the token file at `path`; `renews`: every container restarts with it."""

    path: Path
    renews: bool
    line: str


def decide_ray_token(
    given: str | None,
    path: Path,
    *,
    exists: bool,
    head: NodePlan,
    head_found: FoundContainer | None,
    recreate: bool,
) -> MakeToken | Unchanged:
    """The Ray token: `given` names the inventory's own (by reference), else vcluster's file at
    `path` (`exists` on the controller or not)."""
    if given is not None:
        return Unchanged(f"from {given}")
    if exists:
        return Unchanged(f"{path} (owner-only)")
    line = f"made {path} (owner-only)"
    if head_found is None or head_found.spec_hash != head.container.spec_hash:
        return MakeToken(path, False, line)
    if not recreate:
        raise VclusterError(
            f"the cluster runs with a Ray token this controller does not have ({path} is "
            "missing; a new one would be made now)",
            where=head.name,
            fix="copy the token file from the controller that started the cluster, or run "
            "`vcluster up --recreate` to restart the cluster with a new one",
        )
    return MakeToken(path, True, line)


def decide_agent_token(
    path: Path, *, exists: bool, head_found: FoundContainer | None
) -> MakeToken | Unchanged:
    """The agent token of several models: made when missing; the containers, if any, restart
    with it (they hold another)."""
    if exists:
        return Unchanged(f"{path} (owner-only)")
    if head_found is not None:
        return MakeToken(path, True, f"made {path} (owner-only); the containers restart with it")
    return MakeToken(path, False, f"made {path} (owner-only)")
