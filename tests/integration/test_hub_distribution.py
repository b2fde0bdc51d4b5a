"""A hub model downloaded once, here or on the head, then through the chain to every node of the
SSH lab (real sshd hosts, real relays, real TCP between them), from a local stand-in of the hub
(tests/support/standin_hub.py) that the real clients speak to: `huggingface_hub` here, and
vcluster's own download program on the head.

The lab's hosts share this machine's file system, so each node gets its own folder as its
model cache (as in test_distribution.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.decide.inventory import Model
from cluster.decide.manifest import hub_folder
from cluster.nodes.transfer import ChainNode
from cluster.steps.base import SilentReporter
from cluster.steps.hub_models import send_hub_model
from tests.integration.test_distribution import (  # the lab's nodes, as the chain sees them
    hosts_reach_each_other,  # noqa: F401 (a fixture)
    nodes,  # noqa: F401 (a fixture)
    own_state_folder,  # noqa: F401 (a fixture)
)
from tests.support.ssh_lab import SshLab
from tests.support.standin_hub import StandinHub, StandinRepo, running

NAME = "acme/tiny-chat"
TOKEN = "hf_standin_token_0123456789"


def tiny_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "tokenizer.json": b'{"version": "1.0"}' * 100,
        "model.safetensors": os.urandom(12 << 20),
        "nested/generation_config.json": b'{"do_sample": false}',
    }


@pytest.fixture
def repo() -> StandinRepo:
    return StandinRepo(NAME, tiny_files(), gated=True)


@pytest.fixture
def hub(
    repo: StandinRepo, ssh_lab: SshLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StandinHub]:
    """The stand-in on the lab bridge's address, which the hosts reach; HF_ENDPOINT names it."""
    with running([repo], token=TOKEN, host=ssh_lab.gateway) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "controller-hub-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


def assert_every_node_has_the_snapshot(chain: list[ChainNode], repo: StandinRepo) -> None:
    for node in chain:
        folder = Path(node.root) / hub_folder(NAME)
        assert (folder / "refs" / "main").read_text() == repo.commit, node.name
        snapshot = folder / "snapshots" / repo.commit
        for path, data in repo.files.items():
            placed = snapshot / path
            assert placed.is_symlink(), (node.name, path)  # into blobs/, the hub's layout
            digest = hashlib.sha256(data).hexdigest()
            assert placed.resolve() == (folder / "blobs" / digest).resolve()
            assert hashlib.sha256(placed.read_bytes()).hexdigest() == digest


def file_downloads(hub: StandinHub) -> dict[str, int]:
    """How many times each file's bytes were asked for (GET of resolve/)."""
    counts: dict[str, int] = {}
    for request in hub.requests:
        if request.method == "GET" and "/resolve/" in request.path:
            path = request.path.split("/resolve/", 1)[1].split("/", 1)[1]
            counts[path] = counts.get(path, 0) + 1
    return counts


def test_downloaded_once_here_then_every_node_has_it_in_the_hub_cache_layout(
    nodes: list[ChainNode],  # noqa: F811
    hub: StandinHub,
    repo: StandinRepo,
) -> None:
    line = send_hub_model(nodes, Model(name=NAME), TOKEN, SilentReporter())
    assert file_downloads(hub) == dict.fromkeys(repo.files, 1)  # each file once, for 4 nodes
    assert_every_node_has_the_snapshot(nodes, repo)
    assert line.startswith(f"{NAME}: 5 file(s) verified on 4 node(s)")
    assert f"= {repo.commit[:12]}, downloaded once on this machine" in line

    again = send_hub_model(nodes, Model(name=NAME), TOKEN, SilentReporter())
    assert again.startswith(f"{NAME}: every node has its 5 file(s), verified")
    assert sum(file_downloads(hub).values()) == len(repo.files)  # nothing downloaded again


def test_download_head_runs_on_the_head_with_the_token_and_the_chain_sends_it_on(
    nodes: list[ChainNode],  # noqa: F811
    hub: StandinHub,
    repo: StandinRepo,
    ssh_lab: SshLab,
) -> None:
    hub.cut_once.add("model.safetensors")  # the head's program resumes it
    model = Model(name=NAME, download="head")
    line = send_hub_model(nodes, model, TOKEN, SilentReporter())
    head = ssh_lab.host("node01").address
    assert {r.client for r in hub.requests} == {head}  # only the head spoke to the hub
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    assert file_downloads(hub) == {**dict.fromkeys(repo.files, 1), "model.safetensors": 2}
    assert_every_node_has_the_snapshot(nodes, repo)
    assert "downloaded once on node01)" in line
    assert line.startswith(f"{NAME}: 5 file(s) verified on 4 node(s)")


def test_a_wrong_revision_on_the_head_names_the_model_the_revision_and_the_head(
    nodes: list[ChainNode],  # noqa: F811
    hub: StandinHub,
) -> None:
    model = Model(name=NAME, download="head", revision="v9-missing")
    with pytest.raises(Exception) as raised:
        send_hub_model(nodes, model, TOKEN, SilentReporter())
    assert raised.value.args[0] == f"{NAME} has no revision 'v9-missing' on the hub"
    assert str(raised.value).startswith(f"node01: {NAME} has no revision 'v9-missing'")
