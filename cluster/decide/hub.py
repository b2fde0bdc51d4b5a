"""Models from the Hugging Face hub, once for the whole cluster (pure): which models, where the
download runs, whether the containers read the hub, and the one-line errors of a download.

A model named by a hub id without `source:` is downloaded once, on this machine (`download:
controller`, the default) or on the head (`download: head`), into the hub's cache layout, then
sent through the chain like a `source:` folder (docs/distribution.md). `download: nodes` keeps
the old way: each node's vLLM downloads it at start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cluster.decide.inventory import Inventory, Model
from cluster.errors import VclusterError

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"


class HubError(VclusterError):
    """A model could not be downloaded from the hub."""


def is_hub_id(model: Model) -> bool:
    return not model.name.startswith("/")


def where_downloaded(model: Model) -> str | None:
    """`controller`, `head` or `nodes` for a hub model without `source`; None otherwise."""
    if not is_hub_id(model) or model.source:
        return None
    return model.download or "controller"


def hub_models(inventory: Inventory, names: Sequence[str] = ()) -> list[Model]:
    """The models vcluster downloads once and sends (those named, when names are given)."""
    return [
        m
        for m in inventory.model_list
        if where_downloaded(m) in ("controller", "head") and (not names or m.served in names)
    ]


def revision_of(model: Model) -> str:
    return model.revision or DEFAULT_REVISION


def served_offline(inventory: Inventory) -> bool:
    """Whether every hub model reaches the nodes' caches through vcluster (from `source:` or
    downloaded once), so that vLLM must not ask the hub (`HF_HUB_OFFLINE=1`)."""
    hub = [m for m in inventory.model_list if is_hub_id(m)]
    return bool(hub) and all(where_downloaded(m) != "nodes" for m in hub)


def token_on_nodes(inventory: Inventory) -> bool:
    """Whether the containers need the hub token: only for a model each node downloads."""
    return inventory.secrets.hf_token is not None and any(
        where_downloaded(m) == "nodes" for m in inventory.model_list
    )


def endpoint(environ: Mapping[str, str]) -> str:
    """The hub's address: `HF_ENDPOINT` on this machine, else the Hugging Face hub."""
    return (environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_error(
    model: Model,
    kind: str,
    *,
    where: str,
    status: int | None = None,
    detail: str = "",
    hub: str = DEFAULT_ENDPOINT,
) -> HubError:
    """The one-line error of a failed download. `kind`: revision, repo, gated, network, disk,
    other."""
    name, revision = model.name, revision_of(model)
    page = f"{hub}/{name}"
    if kind == "revision":
        return HubError(
            f"{name} has no revision {revision!r} on the hub",
            where=where,
            fix=f"set the model's revision: to a branch, tag or commit of {page} (or drop it for main)",
        )
    if kind == "repo":
        return HubError(
            f"{name}: no such model on the hub (or it is private and the token cannot see it)",
            where=where,
            fix=f"check the name at {page}; a private model needs secrets.hf_token",
        )
    if kind == "gated" and status == 401:
        return HubError(
            f"{name} is gated and no Hugging Face token was given",
            where=where,
            fix=f"set secrets.hf_token to a token whose account accepted the terms at {page}",
        )
    if kind == "gated":
        return HubError(
            f"{name} is gated and the token lacks access to it",
            where=where,
            fix=f"accept the model's terms at {page} with the token's account, or give another token",
        )
    if kind == "network":
        return HubError(
            f"{name}: the hub ({hub}) cannot be reached from here: {detail}",
            where=where,
            fix="open the way to the hub, or give the model `download: head` (the head downloads "
            "it) or `source:` (a folder of its files on this machine)",
        )
    if kind == "disk":
        return HubError(
            f"{name}: the download could not be written: {detail}",
            where=where,
            fix="free space under model_cache there (or make it writable), then run the command "
            "again: files already downloaded are kept",
        )
    return HubError(
        f"{name}: the download from the hub failed: {detail}",
        where=where,
        fix="run the command again: files already downloaded are kept",
    )
