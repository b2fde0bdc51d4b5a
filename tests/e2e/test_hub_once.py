"""A hub model without `source:`, downloaded once on this machine from a local stand-in of the
hub (tests/support/standin_hub.py, driven by the real `huggingface_hub`), sent through the
sandbox's two nodes into their Hugging Face caches, and served with the hub offline on every
node: the nodes never reach the stand-in hub (it listens on this machine's loopback), and it is
stopped before the first request. What is under test is vcluster's (one download, the chain,
the offline flag): the stand-in vLLM serves (tests/support/standin_node.py); real vLLM serving a
hub id from the nodes' caches with the hub offline is test_distribution.py's story.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import openai
import pytest
import yaml

from cluster.decide.inventory import load_inventory
from cluster.decide.manifest import hub_folder
from cluster.sandbox.model import SECOND_MODEL_NAME, ensure_tiny_model
from tests.support.cli import UP_TIMEOUT_S, vcluster
from tests.support.standin_hub import StandinRepo, running

pytestmark = [pytest.mark.e2e, pytest.mark.stage("variants")]

HUB_MODEL = "vcluster-sandbox/tiny-from-hub"
SERVED = "tiny-hub"


def in_node(inventory: Path, node: str, *command: str) -> str:
    result = vcluster("exec", str(inventory), "--node", node, "--", *command)
    assert result.returncode == 0, result.stderr
    return result.stdout


def tiny_model_files() -> dict[str, bytes]:
    folder = ensure_tiny_model(name=SECOND_MODEL_NAME)
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def test_a_hub_model_is_downloaded_once_and_served_offline_on_every_node(
    standin_inventory: Path,
    sandbox_cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = StandinRepo(HUB_MODEL, tiny_model_files())
    document = yaml.safe_load(standin_inventory.read_text())
    model = {**document["model"], "name": HUB_MODEL, "served_name": SERVED}
    model.pop("source", None)
    document["model"] = model
    inventory = tmp_path / "hub-once.yaml"
    inventory.write_text(yaml.safe_dump(document, sort_keys=False))
    sandbox_cluster.changed()
    with running([repo]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the CLI's subprocess inherits it
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "controller-hub-cache"))
        up = vcluster("up", "--recreate", str(inventory), timeout=UP_TIMEOUT_S)
    sandbox_cluster.changed()  # the next stage's cluster is another
    assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
    blobs = {hashlib.sha256(data).hexdigest() for data in repo.files.values()}
    said = " ".join(up.stderr.split())  # the steps' lines; the console wraps them at spaces
    assert "Model files on every node" in said, up.stderr
    sent = r"\d+ file\(s\) verified on 2 node\(s\)"
    kept = r"every node has its \d+ file\(s\), verified"  # a node's disk kept from a last run
    assert re.search(rf"{SERVED}: ({sent}|{kept})", said), up.stderr
    assert "downloaded once on this machine" in said, up.stderr
    asked = {path: len(hub.file_requests(path)) for path in repo.files}
    assert asked == dict.fromkeys(repo.files, 1)  # each file once, for both nodes

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
    for node in ("node-1", "node-2"):
        assert in_node(inventory, node, "printenv", "HF_HUB_OFFLINE").strip() == "1"
        ref = f"/root/.cache/huggingface/{hub_folder(HUB_MODEL)}/refs/main"
        assert in_node(inventory, node, "cat", ref).strip() == repo.commit
        kept = in_node(
            inventory, node, "ls", f"/root/.cache/huggingface/{hub_folder(HUB_MODEL)}/blobs"
        )
        assert set(kept.split()) == blobs  # every file, named by its sha256
    processes = in_node(inventory, "node-2", "ps", "-eo", "args")  # the second stage's rank
    assert f" {HUB_MODEL} " in processes, processes  # by its hub id, offline
