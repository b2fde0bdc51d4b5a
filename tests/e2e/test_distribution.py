"""A model sent from this machine through the sandbox's nodes, in the Hugging Face cache layout,
served by real vLLM with the hub offline; a corrupted file found by `check` and replaced.

The model is the session's (conftest.py: a hub ID with a `source` folder, served as
`tiny-llama`): `models pull` sends it before any cluster is up, the session's cluster serves it
with real vLLM, and the corrupted file is found and replaced while the stand-in vLLM runs (what
is under test is vcluster's check and transfer).
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from cluster.decide.manifest import hub_folder
from tests.e2e.conftest import HUB_ID, SERVED
from tests.support.cli import vcluster

pytestmark = pytest.mark.e2e


def in_node(inventory: Path, node: str, *command: str) -> str:
    result = vcluster("exec", str(inventory), "--node", node, "--", *command)
    assert result.returncode == 0, result.stderr
    return result.stdout


def blob_paths(inventory: Path) -> list[str]:
    """The model's blobs on node-2, as its container sees the node's cache."""
    folder = f"/root/.cache/huggingface/{hub_folder(HUB_ID)}/blobs"
    return in_node(inventory, "node-2", "ls", "-1", folder).split()


@pytest.mark.stage("bare")
def test_models_pull_sends_the_model_to_every_node_once(session_inventory):
    result = vcluster("models", "pull", str(session_inventory), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "verified on 2 node(s)" in result.stdout
    again = vcluster("models", "pull", str(session_inventory), timeout=600)
    assert "every node has its" in again.stdout  # nothing sent the second time


@pytest.mark.stage("real")
def test_vllm_serves_it_from_the_cache_with_the_hub_offline(cluster):
    inventory = Path(str(cluster.source))
    assert cluster.secrets.api_key is not None
    client = openai.OpenAI(
        base_url=f"http://{cluster.head.address}:{cluster.ports.vllm}/v1",
        api_key=cluster.secrets.api_key.resolve(),
    )
    reply = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    processes = in_node(inventory, "node-2", "ps", "-eo", "args")  # the second stage's rank
    assert f"vllm serve {HUB_ID} " in processes, processes  # loads it by its hub ID
    environment = in_node(inventory, "node-2", "printenv", "HF_HUB_OFFLINE")
    assert environment.strip() == "1"


@pytest.mark.stage("standin")
def test_a_corrupted_file_on_one_node_is_found_by_check_and_replaced_by_pull(standin_cluster):
    inventory = Path(str(standin_cluster.source))
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
