"""The sandbox's SSH identity and secrets, all inside its workdir (never `~/.ssh`).

- a client key pair (`id_ed25519`) whose public half every node authorizes for root;
- one host key per node, made HERE and mounted read-only into the node, so `known_hosts` is
  written from the keys themselves: no host key is ever trusted on first sight;
- `known_hosts` (node address -> its host key), what vcluster's strict SSH checks against;
- the API key of the endpoint `vcluster up` will serve, in a 0600 file the inventory refers to.

Keys already in the workdir are kept, so re-running `sandbox up` keeps `known_hosts` valid.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import VclusterError

CLIENT_KEY = "id_ed25519"
HOST_KEYS_DIR = "host-keys"
HOST_KEY_NAME = "ssh_host_ed25519_key"
KNOWN_HOSTS = "known_hosts"
API_KEY = "api-key"


@dataclass(frozen=True)
class HostKey:
    """One node's host key pair on the controller: the private half is mounted into the node."""

    private: Path
    public_line: str  # "ssh-ed25519 AAAA... node-1"

    @property
    def public(self) -> Path:
        return self.private.with_name(self.private.name + ".pub")


def _keygen(path: Path, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as exc:
        raise VclusterError(
            "`ssh-keygen` was not found", where="localhost", fix="apt-get install -y openssh-client"
        ) from exc
    except subprocess.CalledProcessError as exc:
        raise VclusterError(
            f"ssh-keygen failed for {path}: {exc.stderr.strip()}", where="localhost"
        ) from exc


def client_key(workdir: Path) -> Path:
    """The controller's private key (made on first use); its `.pub` goes to every node."""
    key = workdir / CLIENT_KEY
    if not key.exists():
        _keygen(key, "vcluster-sandbox")
    return key


def authorized_key(key: Path) -> str:
    """The public line of a client key, for the nodes' authorized_keys."""
    return key.with_name(key.name + ".pub").read_text().strip()


def host_key(workdir: Path, node_name: str) -> HostKey:
    """The host key of one node (made on first use)."""
    private = workdir / HOST_KEYS_DIR / node_name / HOST_KEY_NAME
    if not private.exists():
        _keygen(private, node_name)
    public = private.with_name(private.name + ".pub").read_text().strip()
    return HostKey(private=private, public_line=public)


def known_hosts_text(entries: Iterable[tuple[str, HostKey]]) -> str:
    """known_hosts lines `ADDRESS TYPE BASE64` from (address, host key) pairs (pure)."""
    lines = []
    for address, key in entries:
        key_type, key_base64 = key.public_line.split()[:2]
        lines.append(f"{address} {key_type} {key_base64}\n")
    return "".join(lines)


def write_known_hosts(workdir: Path, entries: Iterable[tuple[str, HostKey]]) -> Path:
    """Write the workdir's known_hosts for exactly these nodes; returns its path."""
    path = workdir / KNOWN_HOSTS
    path.write_text(known_hosts_text(entries))
    return path


def api_key_file(workdir: Path) -> Path:
    """A random API key in a 0600 file (made once); the inventory names it as `file:PATH`."""
    path = workdir / API_KEY
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"sk-sandbox-{secrets.token_hex(16)}\n")
    return path
