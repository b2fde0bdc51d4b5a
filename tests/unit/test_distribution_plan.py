"""The chain's plan, the manifest of a model folder, and the relay's refusals (pure, or on
local files)."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest

from cluster.decide.chain import (
    NoRoom,
    chain_order,
    lacking,
    require_room,
    room_problems,
    routed_items,
)
from cluster.decide.manifest import Item, SourceError, hub_folder, model_items
from cluster.nodes.transfer import ChainNode, NodeReport, plan_hops
from cluster.remote import relay


@pytest.fixture(autouse=True)
def own_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest keeps file hashes in vcluster's state folder: a fresh one per test."""
    monkeypatch.setenv("VCLUSTER_STATE_DIR", str(tmp_path / "state"))


def file(path: str, size: int = 10) -> Item:
    return Item("file", path, size, hashlib.sha256(path.encode()).hexdigest())


A, B, REF = file("blobs/a", 100), file("blobs/b", 200), file("refs/main", 40)
LINK = Item("link", "snapshots/r/a", target="../../blobs/a")
ITEMS = [REF, LINK, A, B]


def test_a_node_lacks_every_item_not_ok_there():
    states = {"n1": {"blobs/a": "ok", "blobs/b": "sha256"}, "n2": {}}
    needs = lacking(ITEMS, states)
    assert [i.path for i in needs["n1"]] == ["refs/main", "snapshots/r/a", "blobs/b"]
    assert len(needs["n2"]) == 4


def test_only_nodes_that_lack_something_are_in_the_chain_in_inventory_order():
    needs = {"head": [], "n2": [A], "n3": [B]}
    assert chain_order(["head", "n2", "n3"], needs) == ["n2", "n3"]


def test_the_stream_carries_files_then_links_then_refs_each_to_the_nodes_that_lack_it():
    needs = {"n1": [A, LINK, REF], "n2": [B, A, LINK, REF]}
    stream = routed_items(ITEMS, needs, ["n1", "n2"])
    assert [(r.item.path, r.sinks) for r in stream] == [
        ("blobs/a", ("n1", "n2")),
        ("blobs/b", ("n2",)),
        ("snapshots/r/a", ("n1", "n2")),
        ("refs/main", ("n1", "n2")),
    ]


def test_a_node_without_room_for_what_it_lacks_is_named_with_both_sizes():
    needs = {"n1": [A, B], "n2": [A]}
    assert room_problems(needs, {"n1": 250, "n2": 1000}) == [
        "n1 needs 300 B under the model cache and has 250 B free"
    ]
    with pytest.raises(NoRoom) as error:
        require_room(needs, {"n1": 250, "n2": 50})
    assert error.value.where == "n1, n2"


def test_a_hub_model_is_laid_out_as_the_hugging_face_cache(tmp_path: Path):
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "sub" / "weights.safetensors").write_bytes(b"w" * 64)
    (source / ".git").mkdir()
    (source / ".git" / "HEAD").write_text("not the model's")
    items = model_items(source, "org/name", "/data/hf")
    folder = hub_folder("org/name")
    assert folder == "hub/models--org--name"
    digest = hashlib.sha256(b"w" * 64).hexdigest()
    by_path = {i.path: i for i in items}
    assert by_path[f"{folder}/blobs/{digest}"].size == 64
    revision = by_path[f"{folder}/refs/main"].content.decode()
    link = by_path[f"{folder}/snapshots/{revision}/sub/weights.safetensors"]
    assert link.kind == "link" and link.target == f"../../../blobs/{digest}"
    top = by_path[f"{folder}/snapshots/{revision}/config.json"]
    assert top.target.startswith("../../blobs/")
    assert not any(".git" in path for path in by_path)


def test_the_same_files_give_the_same_revision(tmp_path: Path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    first = {i.path for i in model_items(tmp_path / "one", "org/name", "/data/hf")}
    second = {i.path for i in model_items(tmp_path / "two", "org/name", "/data/hf")}
    assert first == second


def test_a_model_at_a_path_keeps_its_layout_under_the_cache(tmp_path: Path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    [item] = model_items(tmp_path / "model", "/data/hf/models/tiny", "/data/hf")
    assert item.path == "models/tiny/config.json"
    assert item.source == str(tmp_path / "model" / "config.json")


def test_a_missing_or_empty_source_is_an_error_with_its_fix(tmp_path: Path):
    with pytest.raises(SourceError, match="is not a folder on this machine"):
        model_items(tmp_path / "nope", "org/name", "/data/hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no file"):
        model_items(tmp_path / "empty", "org/name", "/data/hf")


def test_a_nodes_report_says_whether_it_failed_itself_or_was_cut_off():
    assert NodeReport(finished=True).failure() is None
    assert NodeReport(upstream_lost=True, item="blobs/a").failure() is None  # served next round
    assert NodeReport(item="blobs/a", exit_status=-9).failure() == (
        "its relay ended during blobs/a (exit -9)"
    )
    assert NodeReport(errors={"blobs/a": "No space left on device"}).failure() == (
        "could not write blobs/a: No space left on device"
    )
    assert "open TCP between the nodes" in NodeReport(no_upstream=True).failure()
    knocked = NodeReport(no_upstream=True, refused_connections=3).failure()
    assert knocked.startswith(
        "the node before it never connected to it (3 connection(s) without its token were "
        "refused): "
    )
    assert NodeReport(bad_stream="a frame of 4294967295 bytes (at most 4194304)").failure() == (
        "refused the stream it received: a frame of 4294967295 bytes (at most 4194304)"
    )


def test_each_relay_but_the_first_listens_with_a_token_of_its_own():
    chain = [ChainNode(f"n{i}", f"10.0.0.{i}", None, "/data/hf") for i in range(4)]  # type: ignore[arg-type]
    hops = plan_hops(chain)
    assert [(h.node.name, h.listen) for h in hops] == [
        ("n0", None), ("n1", "10.0.0.1"), ("n2", "10.0.0.2"), ("n3", "10.0.0.3")
    ]  # fmt: skip
    assert hops[0].token is None
    tokens = [h.token for h in hops[1:]]
    assert len(set(tokens)) == 3 and all(len(t) == 32 for t in tokens)  # 128 bits each


def test_the_relay_is_python_3_8():
    ast.parse(Path(relay.__file__).read_text(), feature_version=(3, 8))


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc/passwd", "not inside the model cache"),
        ("hub/../../etc", "not inside the model cache"),
        ("./hub/x", "not inside the model cache"),
        ("hub//x", "not inside the model cache"),
        ("hub/x/", "not inside the model cache"),
        (".vcluster-verified/hub/x.json", "the stamps folder is written by the relay only"),
        ("hub/x.vcluster-partial", ".vcluster-partial names are the relay's own"),
    ],
)
def test_the_relay_refuses_paths_that_leave_the_cache_or_are_its_own(path, why):
    with pytest.raises(relay.Refused, match=f"refused path {path!r}: {why}"):
        relay.components(path)


def test_the_relay_takes_a_path_inside_the_cache_name_by_name():
    assert relay.components("hub/models--a--b/blobs/x") == ["hub", "models--a--b", "blobs", "x"]
    assert relay.components("hub/.vcluster-verified") == ["hub", ".vcluster-verified"]


@pytest.mark.parametrize(
    ("path", "target", "inside"),
    [
        ("snapshots/r/config.json", "../../blobs/a", True),  # the hub layout's own
        ("snapshots/r/sub/w", "../../../blobs/a", True),
        ("link", "blobs/a", True),
        ("snapshots/r/config.json", "../../../outside", False),  # climbs above the cache
        ("link", "/etc/passwd", False),
        ("snapshots/r/x", "a/../../../..", False),  # `..` after a name
        ("snapshots/r/x", "../.", False),
        ("snapshots/r/x", "..", False),  # a folder of the cache, not a file in it
        ("snapshots/r/x", "", False),
    ],
)
def test_a_links_target_must_stay_inside_the_cache(path, target, inside):
    if inside:
        relay.check_target(path, target)
    else:
        with pytest.raises(relay.Refused, match="its target is not inside the model cache"):
            relay.check_target(path, target)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\xff not json", "a header that is not JSON"),
        (b"[" * 100_000, "a header that is not JSON"),
        (json.dumps({"kind": "exe", "path": "x"}).encode(), "a header without a known kind"),
        (json.dumps({"kind": "file", "path": "x", "sinks": [], "size": -1, "sha256": ""}).encode(),
         "a header with fields of the wrong types for 'x'"),
        (json.dumps({"kind": "file", "path": "x", "sinks": [], "size": True, "sha256": ""}).encode(),
         "a header with fields of the wrong types for 'x'"),
        (json.dumps({"kind": "link", "path": "x", "sinks": []}).encode(),
         "a header with fields of the wrong types for 'x'"),
    ],
)  # fmt: skip
def test_a_header_that_breaks_the_format_stops_the_relay(raw, why):
    with pytest.raises(relay.BadStream, match=why):
        relay.parse_header(raw)
