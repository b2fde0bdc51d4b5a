"""Which models vcluster downloads once from the hub, where, and what the containers get
(cluster/decide/hub.py, the inventory's `download` and `revision` keys)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.decide.checks.models import check_model_present
from cluster.decide.checks.result import Status
from cluster.decide.hub import (
    hub_error,
    hub_models,
    served_offline,
    token_on_nodes,
    where_downloaded,
)
from cluster.decide.inventory import Inventory, Model
from cluster.decide.up.models import SendModels, decide_model_files
from cluster.decide.up.outcome import Unchanged


def inventory(*models: dict, token: bool = True) -> Inventory:
    return Inventory.model_validate(
        {
            "cluster": "hub",
            "image": "vllm/vllm-openai:v0.11.0",
            "nodes": [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
            "model_cache": "/data/hf",
            "models": list(models),
            **({"secrets": {"hf_token": "env:HF_TOKEN"}} if token else {}),
        }
    )


def test_a_hub_model_without_source_is_downloaded_once_here_by_default() -> None:
    assert where_downloaded(Model(name="acme/chat")) == "controller"
    assert where_downloaded(Model(name="acme/chat", download="head")) == "head"
    assert where_downloaded(Model(name="acme/chat", download="nodes")) == "nodes"
    assert where_downloaded(Model(name="acme/chat", source="/srv/chat")) is None
    assert where_downloaded(Model(name="/data/hf/models/chat")) is None


def test_only_models_downloaded_once_are_chosen_and_names_narrow_them() -> None:
    cluster = inventory(
        {"name": "acme/a", "served_name": "a"},
        {"name": "acme/b", "served_name": "b", "download": "head"},
        {"name": "acme/c", "served_name": "c", "download": "nodes"},
        {"name": "acme/d", "served_name": "d", "source": "/srv/d"},
        {"name": "/data/hf/models/e", "served_name": "e"},
    )
    assert [m.served for m in hub_models(cluster)] == ["a", "b"]
    assert [m.served for m in hub_models(cluster, ["b", "c"])] == ["b"]


def test_the_containers_read_the_hub_offline_when_every_hub_model_is_sent() -> None:
    assert served_offline(inventory({"name": "acme/a"}, {"name": "acme/b", "source": "/srv/b"}))
    assert not served_offline(
        inventory({"name": "acme/a"}, {"name": "acme/b", "download": "nodes"})
    )
    assert not served_offline(inventory({"name": "/data/hf/models/a"}))


def test_the_token_reaches_the_containers_only_for_a_model_each_node_downloads() -> None:
    assert not token_on_nodes(inventory({"name": "acme/a"}, {"name": "acme/b", "download": "head"}))
    assert token_on_nodes(inventory({"name": "acme/a"}, {"name": "acme/b", "download": "nodes"}))
    assert not token_on_nodes(inventory({"name": "acme/b", "download": "nodes"}, token=False))


@pytest.mark.parametrize(
    ("model", "said"),
    [
        ({"name": "/data/hf/models/a", "download": "head"}, "a model named by a path"),
        ({"name": "acme/a", "source": "/srv/a", "revision": "v1"}, "a model with source:"),
        ({"name": "acme/a", "download": "nodes", "revision": "v1"}, "--revision REV"),
        ({"name": "acme/a", "revision": "../x"}, "a branch, tag or commit"),
        ({"name": "acme/a", "revision": "v1 --trust-remote-code"}, "a branch, tag or commit"),
        ({"name": "acme/a", "download": "everywhere"}, "'controller', 'head' or 'nodes'"),
    ],
)
def test_download_and_revision_are_refused_where_they_mean_nothing(model: dict, said: str) -> None:
    with pytest.raises(ValidationError, match=said.replace("-", r"\-")):
        Model.model_validate(model)


def test_a_revision_may_be_a_branch_a_tag_or_a_commit() -> None:
    for revision in ("main", "v1.0", "refs/pr/3", "0123456789abcdef0123456789abcdef01234567"):
        assert Model(name="acme/a", revision=revision).revision == revision


@pytest.mark.parametrize(
    ("kind", "status", "said"),
    [
        (
            "revision",
            None,
            "acme/a has no revision 'v2' on the hub (fix: set the model's revision:",
        ),
        ("repo", 404, "acme/a: no such model on the hub"),
        (
            "gated",
            401,
            "acme/a is gated and no Hugging Face token was given (fix: set secrets.hf_token",
        ),
        ("gated", 403, "acme/a is gated and the token lacks access to it (fix: accept"),
        ("network", None, "download: head"),
    ],
)
def test_each_download_failure_is_one_line_naming_the_model_and_the_fix(
    kind: str, status: int | None, said: str
) -> None:
    line = hub_error(Model(name="acme/a", revision="v2"), kind, where="node01", status=status)
    assert said in line.one_line() and "\n" not in line.one_line()
    assert line.one_line().startswith("node01: ")


def test_up_sends_the_models_downloaded_once_after_those_with_a_source() -> None:
    decided = decide_model_files(
        inventory(
            {"name": "acme/a", "served_name": "a"},
            {"name": "acme/b", "served_name": "b", "source": "/srv/b"},
            {"name": "acme/c", "served_name": "c", "download": "nodes"},
        )
    )
    assert isinstance(decided, SendModels)
    assert [m.served for m in decided.models] == ["b"]
    assert [m.served for m in decided.from_hub] == ["a"]


def test_the_model_files_step_has_nothing_to_do_when_each_node_downloads() -> None:
    decided = decide_model_files(inventory({"name": "acme/c", "download": "nodes"}))
    assert decided == Unchanged("not applicable: no model has a source folder")


@pytest.mark.parametrize(
    ("download", "said"),
    [
        (None, "acme/a is in no node's cache: `up` downloads it once (on this machine)"),
        ("head", "acme/a is in no node's cache: `up` downloads it once (on the head)"),
        ("nodes", "acme/a is in no node's cache: each node downloads it at start"),
    ],
)
def test_the_model_row_of_check_says_who_downloads_a_hub_model(download: str, said: str) -> None:
    cluster = inventory({"name": "acme/a", "download": download})
    [result] = check_model_present(cluster, {"a": False, "b": False}, cluster.primary_model)
    assert result.status is Status.WARN and result.detail.startswith(said)
