"""Where vcluster keeps its state on the controller: every path, computed here and nowhere else.

Pure: it reads the environment, never the disk; the modules that read and write these files
(the token steps, the hash and image-facts caches, the collective store) take their paths from
here. The layout under the state folder:

    file-hashes.json                  sha256 of model source files, by path, size and mtime
    image-facts/IMAGE_ID.json         the facts of each image probed once
    clusters/CLUSTER/ray-token        the Ray token vcluster made (owner-only)
    clusters/CLUSTER/agent-token      the model agents' token with several models (owner-only)
    clusters/CLUSTER/collective.json  the last collective check's figures and verdict
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where vcluster keeps its state on the controller: `$VCLUSTER_STATE_DIR`, or
    `$XDG_STATE_HOME/vcluster`, or `~/.local/state/vcluster`."""
    environ = os.environ if environ is None else environ
    if environ.get("VCLUSTER_STATE_DIR"):
        return Path(environ["VCLUSTER_STATE_DIR"]).expanduser()
    xdg = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "vcluster"


def cluster_state_dir(cluster: str) -> Path:
    """One cluster's folder: its tokens and its last collective check."""
    return state_dir() / "clusters" / cluster


def generated_ray_token_path(cluster: str) -> Path:
    """Where vcluster keeps the Ray token it made for `cluster` (owner-only)."""
    return cluster_state_dir(cluster) / "ray-token"


def agent_token_path(cluster: str) -> Path:
    """The token of the cluster's model agents (made by `up`, owner-only)."""
    return cluster_state_dir(cluster) / "agent-token"


def collective_run_path(cluster: str) -> Path:
    """The last collective check's figures per group and verdict, for `status` and the exporter."""
    return cluster_state_dir(cluster) / "collective.json"


def file_hashes_path() -> Path:
    """The sha256 of model source files, by (path, size, mtime): files are hashed once."""
    return state_dir() / "file-hashes.json"


def image_facts_dir() -> Path:
    """The image facts cache: one JSON file per image ID."""
    return state_dir() / "image-facts"
