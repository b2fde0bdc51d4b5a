"""The inventory `sandbox up` writes into its workdir: `vcluster up` uses it as is."""

from __future__ import annotations

from pathlib import Path

import yaml

from cluster.sandbox.model import TINY_MODEL_NAME
from cluster.sandbox.nodes import NODE_MODEL_CACHE, SandboxNode

INVENTORY_FILE = "inventory.yaml"
SERVED_NAME = "tiny-llama"
MODEL_ARGS = ["--dtype", "bfloat16", "--max-model-len", "256"]
"""FACTS.md: the tiny model serves on CPU in bfloat16 with a short context. Not
--enforce-eager: it crashed the engine with pipeline parallel on CPU (vLLM 0.32)."""


def inventory_text(
    name: str,
    image: str,
    nodes: list[SandboxNode],
    *,
    key_file: Path,
    known_hosts: Path,
    api_key_file: Path,
) -> str:
    """The YAML text of the sandbox's inventory (pure): the first node is the head."""
    document = {
        "cluster": name,
        "image": image,
        "accelerator": "cpu",
        "ssh": {"user": "root", "key_file": str(key_file), "known_hosts": str(known_hosts)},
        "nodes": [
            {"name": n.name, "address": n.address, **({"role": "head"} if i == 0 else {})}
            for i, n in enumerate(nodes)
        ],
        "model_cache": NODE_MODEL_CACHE,
        "network": {"interface": "eth0"},
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "secrets": {"api_key": f"file:{api_key_file}"},
        "model": {
            "name": f"{NODE_MODEL_CACHE}/models/{TINY_MODEL_NAME}",
            "served_name": SERVED_NAME,
            "args": MODEL_ARGS,
        },
    }
    header = (
        f"# Written by `vcluster sandbox up` for the local sandbox {name!r}; rewritten on each up.\n"
        "# Use it as is: vcluster up THIS_FILE; vcluster status THIS_FILE; vcluster down THIS_FILE\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)


def write_inventory(workdir: Path, text: str) -> Path:
    """Write the inventory atomically (a reader never sees half a file); returns its path."""
    path = workdir / INVENTORY_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
    return path
