"""The stand-in vLLM (tests/support/standin_vllm.py) in vLLM's place inside the sandbox's
containers, for the e2e stories whose behaviour is vcluster's rather than vLLM's (its
supervisor, firewall, doors, checks, router and model states): it starts in a fraction of a
second where vLLM takes a minute on CPU.

No image is built and nothing of vcluster changes. The stand-in and a `vllm` command in front of
vLLM's own go into a folder of each node's model cache (mounted in every container at
/root/.cache/huggingface), and the inventory's `env` puts that folder first on the containers'
PATH. That `vllm` runs the stand-in for `vllm serve ... --standin` and vLLM's own command for
anything else, so one cluster may serve a real model beside stand-in ones (`--standin` in a
model's `args` picks it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml

from cluster.decide.inventory import CONTAINER_CACHE_PATH, load_inventory
from cluster.nodes.session import Session
from cluster.sandbox.nodes import NODE_MODEL_CACHE

STANDIN = Path(__file__).resolve().with_name("standin_vllm.py")
FOLDER = "vcluster-standin"
FLAG = "--standin"
IMAGE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The workload images' PATH (images/vllm-cpu/Dockerfile); the stand-in's folder goes first."""
CONTAINER_FOLDER = f"{CONTAINER_CACHE_PATH}/{FOLDER}"
VLLM_COMMAND = f"""\
#!/bin/sh
# The e2e tier's `vllm` (tests/support/standin_node.py): `vllm serve ... {FLAG}` runs the
# stand-in; anything else runs vLLM's own command, with this folder off the PATH again.
if [ "$1" = serve ]; then
  for arg in "$@"; do
    if [ "$arg" = {FLAG} ]; then
      shift
      exec python3 {CONTAINER_FOLDER}/standin_vllm.py "$@"
    fi
  done
fi
PATH={IMAGE_PATH} exec vllm "$@"
"""


def install_standin(inventory_path: Path) -> None:
    """The stand-in and the `vllm` in front of vLLM's, in every node's model cache."""
    inventory = load_inventory(inventory_path)
    folder = f"{NODE_MODEL_CACHE}/{FOLDER}"
    files = {"standin_vllm.py": STANDIN.read_bytes(), "bin/vllm": VLLM_COMMAND.encode()}
    with contextlib.closing(Session(inventory)) as session:
        session.open().raise_if_failed("connecting")
        for node in inventory.nodes:
            ssh = session.ssh(node.node_name)
            ssh.run(["mkdir", "-p", f"{folder}/bin"], check=True)
            for name, content in files.items():
                ssh.run(["tee", f"{folder}/{name}"], stdin=content, check=True)
            ssh.run(["chmod", "755", f"{folder}/bin/vllm"], check=True)


def standin_model(entry: dict[str, Any]) -> dict[str, Any]:
    """A model entry of an inventory, served by the stand-in."""
    return {**entry, "args": [*entry.get("args", []), FLAG]}


def with_standin_path(document: dict[str, Any]) -> dict[str, Any]:
    """An inventory document whose containers find the stand-in's `vllm` first."""
    env = {**document.get("env", {}), "PATH": f"{CONTAINER_FOLDER}/bin:{IMAGE_PATH}"}
    return {**document, "env": env}


def write_standin_inventory(base: Path, target: Path, **changes: Any) -> Path:
    """`base` with its model served by the stand-in (and `changes`), written to `target`."""
    document = with_standin_path({**yaml.safe_load(base.read_text()), **changes})
    document["model"] = standin_model(document["model"])
    target.write_text(yaml.safe_dump(document, sort_keys=False))
    return target
