"""A model sent from this machine through the sandbox's nodes, in the Hugging Face cache layout,
served by real vLLM with the hub offline; a corrupted file found by `check` and replaced."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from cluster.decide.inventory import load_inventory
from cluster.decide.manifest import hub_folder
from cluster.sandbox.inventory_file import MODEL_ARGS
from cluster.sandbox.model import SECOND_MODEL_NAME, ensure_tiny_model
from tests.support.cli import UP_TIMEOUT_S, vcluster

pytestmark = pytest.mark.e2e

HUB_ID = "vcluster-sandbox/tiny-from-source"
SERVED = "tiny-src"


@pytest.fixture(scope="module")
def inventory(sandbox_inventory: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    document = yaml.safe_load(sandbox_inventory.read_text())
    document["model"] = {
        "name": HUB_ID,
        "served_name": SERVED,
        "source": str(ensure_tiny_model(name=SECOND_MODEL_NAME)),
        "args": MODEL_ARGS,
    }
    target = tmp_path_factory.mktemp("distribution") / "inventory.yaml"
    target.write_text(yaml.safe_dump(document, sort_keys=False))
    yield target
    down = vcluster("down", str(target))
    assert down.returncode == 0, down.stderr


def in_node(inventory: Path, node: str, *command: str) -> str:
    result = vcluster("exec", str(inventory), "--node", node, "--", *command)
    assert result.returncode == 0, result.stderr
    return result.stdout


def blob_paths(inventory: Path) -> list[str]:
    """The model's blobs on node-2, as its container sees the node's cache."""
    folder = f"/root/.cache/huggingface/{hub_folder(HUB_ID)}/blobs"
    return in_node(inventory, "node-2", "ls", "-1", folder).split()


def test_models_pull_sends_the_model_to_every_node_once(inventory):
    result = vcluster("models", "pull", str(inventory), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "verified on 2 node(s)" in result.stdout
    again = vcluster("models", "pull", str(inventory), timeout=600)
    assert "every node has its" in again.stdout  # nothing sent the second time


def test_vllm_serves_it_from_the_cache_with_the_hub_offline(inventory):
    up = vcluster("up", "--recreate", str(inventory), timeout=UP_TIMEOUT_S)
    assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
    loaded = load_inventory(inventory)
    assert loaded.secrets.api_key is not None
    client = openai.OpenAI(
        base_url=f"http://{loaded.head.address}:{loaded.ports.vllm}/v1",
        api_key=loaded.secrets.api_key.resolve(),
    )
    reply = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    environment = in_node(inventory, "node-2", "printenv", "HF_HUB_OFFLINE")
    assert environment.strip() == "1"


def test_a_corrupted_file_on_one_node_is_found_by_check_and_replaced_by_pull(inventory):
    blob = sorted(blob_paths(inventory))[0]
    path = f"/root/.cache/huggingface/{hub_folder(HUB_ID)}/blobs/{blob}"
    in_node(
        inventory,
        "node-2",
        "sh",
        "-c",
        'printf x | dd of="$0" bs=1 seek=0 conv=notrunc 2>/dev/null',
        path,
    )
    check = vcluster("check", str(inventory), "--json")
    rows = [r for r in json.loads(check.stdout) if r["name"] == "model files"]
    states = {r["node"]: r["status"] for r in rows}
    assert states == {"node-1": "PASS", "node-2": "WARN"}
    assert "1 differ from the source" in next(r["detail"] for r in rows if r["node"] == "node-2")
    pulled = vcluster("models", "pull", str(inventory), timeout=600)
    assert pulled.returncode == 0, pulled.stderr
    assert "verified on 2 node(s)" in pulled.stdout
    check = vcluster("check", str(inventory), "--json")
    rows = [r for r in json.loads(check.stdout) if r["name"] == "model files"]
    assert {r["status"] for r in rows} == {"PASS"}
