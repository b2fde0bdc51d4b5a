"""A hub model downloaded once: here with the real `huggingface_hub` client, and by the program
shipped to the head, both against a local stand-in of the hub (tests/support/standin_hub.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.decide.hub import HubError, hub_error
from cluster.decide.inventory import Model
from cluster.decide.manifest import hub_folder, hub_items, snapshot_items
from cluster.nodes.hub import HUB_DOWNLOAD_SOURCE, download_here
from cluster.progress import ProgressBoard, bytes_of
from tests.support.standin_hub import StandinHub, StandinRepo, running

NAME = "acme/tiny-chat"
TOKEN = "hf_standin_token_0123456789"
WEIGHTS_MIB = 24
"""Over the client's 10 MiB read size, so that a cut after half of it leaves bytes to resume."""


def tiny_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "tokenizer.json": b'{"version": "1.0"}' * 100,  # over the LFS threshold
        "model.safetensors": os.urandom(WEIGHTS_MIB << 20),
        "nested/generation_config.json": b'{"do_sample": false}',
        ".gitattributes": b"*.safetensors filter=lfs\n",
    }


@pytest.fixture(autouse=True)
def quiet_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VCLUSTER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture
def repo() -> StandinRepo:
    return StandinRepo(NAME, tiny_files(), refs={"v1.0": ""})


@pytest.fixture
def hub(repo: StandinRepo) -> Iterator[StandinHub]:
    repo.refs["v1.0"] = repo.commit
    weights = os.urandom(64 << 10)  # an LFS file: the hub sends it from its CDN
    gated = StandinRepo(
        "acme/gated-chat", {"config.json": b"{}", "model.safetensors": weights}, gated=True
    )
    with running([repo, gated], token=TOKEN) as server:
        yield server


def here(hub: StandinHub, model: Model, token: str | None, cache: Path, lines: list[str]):
    board = ProgressBoard(lines.append, plain_interval_s=0.0)
    return download_here(model, token, board, cache_dir=cache, environ={"HF_ENDPOINT": hub.url})


def read_snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def visible(files: dict[str, bytes]) -> dict[str, bytes]:
    return {p: d for p, d in files.items() if not p.startswith(".")}


# --- here, with huggingface_hub ---------------------------------------------------------------


def test_the_controller_downloads_the_revision_into_the_hub_cache_layout(
    hub: StandinHub, repo: StandinRepo, tmp_path: Path
) -> None:
    lines: list[str] = []
    got = here(hub, Model(name=NAME), None, tmp_path / "cache", lines)
    assert got.commit == repo.commit
    assert got.snapshot == tmp_path / "cache" / f"models--acme--tiny-chat/snapshots/{repo.commit}"
    assert read_snapshot(got.snapshot) == visible(repo.files)
    assert (got.snapshot.parents[1] / "refs" / "main").read_text() == repo.commit
    assert any(line.startswith(f"{NAME}: downloading on this machine: ") for line in lines)
    total = sum(len(data) for data in repo.files.values())
    assert lines[-1].startswith(f"{NAME}: downloading on this machine: {bytes_of(total, total)}")


def test_what_is_sent_is_the_snapshot_under_its_commit_with_blobs_named_by_sha256(
    hub: StandinHub, repo: StandinRepo, tmp_path: Path
) -> None:
    got = here(hub, Model(name=NAME), None, tmp_path / "cache", [])
    assert got.snapshot is not None
    items = {i.path: i for i in snapshot_items(got.snapshot, NAME)}
    folder = hub_folder(NAME)
    for path, data in visible(repo.files).items():
        digest = hashlib.sha256(data).hexdigest()
        assert items[f"{folder}/blobs/{digest}"].size == len(data)
        link = items[f"{folder}/snapshots/{repo.commit}/{path}"]
        assert link.kind == "link" and link.target is not None
        assert link.target.endswith(f"blobs/{digest}")
    assert items[f"{folder}/refs/main"].content == repo.commit.encode()
    assert not any(".gitattributes" in path for path in items)  # hidden: not the model's


def test_a_download_cut_mid_file_resumes_from_where_it_stopped(
    hub: StandinHub, repo: StandinRepo, tmp_path: Path
) -> None:
    hub.cut_once.add("model.safetensors")
    got = here(hub, Model(name=NAME), None, tmp_path / "cache", [])
    assert got.snapshot is not None
    first, second = hub.file_requests("model.safetensors")
    assert first.range is None
    assert second.range is not None and second.range.startswith("bytes=")
    assert int(second.range.removeprefix("bytes=").rstrip("-")) > 0  # not from the start
    expected = repo.files["model.safetensors"]
    assert (got.snapshot / "model.safetensors").read_bytes() == expected


def test_a_second_download_fetches_no_file_again(hub: StandinHub, tmp_path: Path) -> None:
    here(hub, Model(name=NAME), None, tmp_path / "cache", [])
    before = len(hub.requests)
    here(hub, Model(name=NAME), None, tmp_path / "cache", [])
    again = hub.requests[before:]
    assert not [r for r in again if r.method == "GET" and "/resolve/" in r.path]


def test_a_named_revision_is_downloaded_and_recorded_as_its_commit(
    hub: StandinHub, repo: StandinRepo, tmp_path: Path
) -> None:
    got = here(hub, Model(name=NAME, revision="v1.0"), None, tmp_path / "cache", [])
    assert got.commit == repo.commit
    assert any(r.path.endswith("/revision/v1.0") for r in hub.requests)


def test_a_wrong_revision_is_one_line_naming_the_model_and_the_revision(
    hub: StandinHub, tmp_path: Path
) -> None:
    with pytest.raises(HubError) as raised:
        here(hub, Model(name=NAME, revision="v9-missing"), None, tmp_path / "cache", [])
    line = raised.value.one_line()
    assert line.startswith(f"this machine: {NAME} has no revision 'v9-missing' on the hub")
    assert "revision:" in line and "\n" not in line


def test_a_model_the_hub_does_not_have_is_named(hub: StandinHub, tmp_path: Path) -> None:
    with pytest.raises(HubError) as raised:
        here(hub, Model(name="acme/no-such-model"), None, tmp_path / "cache", [])
    assert "acme/no-such-model: no such model on the hub" in raised.value.one_line()


def test_a_gated_model_without_a_token_says_the_token_is_missing(
    hub: StandinHub, tmp_path: Path
) -> None:
    with pytest.raises(HubError) as raised:
        here(hub, Model(name="acme/gated-chat"), None, tmp_path / "cache", [])
    line = raised.value.one_line()
    assert "acme/gated-chat is gated and no Hugging Face token was given" in line
    assert "secrets.hf_token" in line


def test_a_gated_model_with_a_token_that_lacks_access_says_so(
    hub: StandinHub, tmp_path: Path
) -> None:
    with pytest.raises(HubError) as raised:
        here(hub, Model(name="acme/gated-chat"), "hf_other_token", tmp_path / "cache", [])
    line = raised.value.one_line()
    assert "acme/gated-chat is gated and the token lacks access to it" in line
    assert "hf_other_token" not in line


def test_a_gated_model_is_downloaded_with_the_token(hub: StandinHub, tmp_path: Path) -> None:
    got = here(hub, Model(name="acme/gated-chat"), TOKEN, tmp_path / "cache", [])
    assert got.snapshot is not None and (got.snapshot / "config.json").read_bytes() == b"{}"
    calls = [r for r in hub.requests if "gated-chat" in r.path and r.method == "GET"]
    assert calls and all(r.authorization == f"Bearer {TOKEN}" for r in calls)


def test_the_token_does_not_follow_a_redirect_to_the_cdn(hub: StandinHub, tmp_path: Path) -> None:
    hub.cdn_host = "localhost"  # another host name than the hub's 127.0.0.1
    got = here(hub, Model(name="acme/gated-chat"), TOKEN, tmp_path / "cache", [])
    assert got.snapshot is not None
    gated = hub.repos["acme/gated-chat"]
    assert (got.snapshot / "model.safetensors").read_bytes() == gated.files["model.safetensors"]
    assert_the_token_stayed_on_the_hub(hub)


def assert_the_token_stayed_on_the_hub(hub: StandinHub) -> None:
    from_cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert from_cdn and all(r.authorization is None for r in from_cdn)
    on_hub = [r for r in hub.requests if "gated-chat" in r.path and r not in from_cdn]
    assert on_hub and all(r.authorization == f"Bearer {TOKEN}" for r in on_hub)


def test_an_unreachable_hub_suggests_downloading_on_the_head_or_a_source(tmp_path: Path) -> None:
    closed = "http://127.0.0.1:9"  # discard: nothing listens there
    with pytest.raises(HubError) as raised:
        download_here(Model(name=NAME), None, cache_dir=tmp_path, environ={"HF_ENDPOINT": closed})
    line = raised.value.one_line()
    assert f"{NAME}: the hub ({closed}) cannot be reached from here" in line
    assert "download: head" in line and "source:" in line


@pytest.mark.parametrize("name", ["acme/tiny/chat", "acme/tiny-chat:latest"])
def test_a_name_the_hub_cannot_hold_is_one_line_naming_it(
    hub: StandinHub, tmp_path: Path, name: str
) -> None:
    with pytest.raises(HubError) as raised:
        here(hub, Model(name=name), None, tmp_path / "cache", [])
    line = raised.value.one_line()
    assert line.startswith(f"this machine: {name} is not a Hugging Face model id: ")
    assert "ORG/NAME" in line and "\n" not in line
    assert hub.requests == []  # refused before the hub is asked


# --- on the head: the shipped program, standard library only ----------------------------------


def run_program(hub: StandinHub, root: Path, repo: str = NAME, **config: object) -> list[dict]:
    document = {"endpoint": hub.url, "repo": repo, "revision": "main", "root": str(root), **config}
    result = subprocess.run(
        [sys.executable, "-c", HUB_DOWNLOAD_SOURCE],
        input=json.dumps(document) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_head_program_writes_the_layout_the_chain_sends(
    hub: StandinHub, repo: StandinRepo, tmp_path: Path
) -> None:
    events = run_program(hub, tmp_path)
    done = events[-1]
    assert done["event"] == "done" and done["commit"] == repo.commit
    files = [tuple(f) for f in done["files"]]
    expected = visible(repo.files)
    assert sorted(p for p, _, _ in files) == sorted(expected)
    for path, size, digest in files:
        assert (size, digest) == (len(expected[path]), hashlib.sha256(expected[path]).hexdigest())
    for item in hub_items(NAME, repo.commit, files, None):
        target = tmp_path / item.path
        if item.kind == "link":
            assert os.readlink(target) == item.target
        else:
            assert hashlib.sha256(target.read_bytes()).hexdigest() == item.sha256
    assert any(e["event"] == "progress" for e in events)


def test_the_head_program_resumes_a_cut_file_with_a_range(
    hub: StandinHub, repo: StandinRepo, tmp_path: Path
) -> None:
    hub.cut_once.add("model.safetensors")
    assert run_program(hub, tmp_path)[-1]["event"] == "done"
    first, second = hub.file_requests("model.safetensors")
    half = len(repo.files["model.safetensors"]) // 2
    assert (first.range, second.range) == (None, f"bytes={half}-")
    blob = tmp_path / hub_folder(NAME) / "blobs" / repo.etag("model.safetensors")
    assert blob.read_bytes() == repo.files["model.safetensors"]


def test_the_head_program_drops_the_token_on_a_redirect_to_the_cdn(
    hub: StandinHub, tmp_path: Path
) -> None:
    hub.cdn_host = "localhost"
    events = run_program(hub, tmp_path, "acme/gated-chat", token=TOKEN)
    assert events[-1]["event"] == "done"
    assert_the_token_stayed_on_the_hub(hub)
    weights = hub.repos["acme/gated-chat"].files["model.safetensors"]
    blob = tmp_path / hub_folder("acme/gated-chat") / "blobs" / hashlib.sha256(weights).hexdigest()
    assert blob.read_bytes() == weights


def test_the_head_program_refuses_a_file_whose_sha256_is_not_the_one_the_hub_lists(
    hub: StandinHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = StandinRepo.etag
    monkeypatch.setattr(
        StandinRepo,
        "etag",
        lambda self, path: "0" * 64 if path == "model.safetensors" else listed(self, path),
    )
    event = run_program(hub, tmp_path)[-1]
    assert (event["event"], event["kind"]) == ("error", "http")
    assert event["message"] == (
        "model.safetensors: sha256 "
        + hashlib.sha256(hub.repos[NAME].files["model.safetensors"]).hexdigest()[:12]
        + "... arrived, the hub lists 000000000000..."
    )


def test_a_model_cache_the_head_cannot_write_is_an_error_event_not_a_traceback(
    hub: StandinHub, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    root = tmp_path / "a-file" / "cache"
    event = run_program(hub, root)[-1]
    assert (event["event"], event["kind"]) == ("error", "disk")
    assert event["message"] == f"Not a directory under {root}"
    line = hub_error(Model(name=NAME), "disk", where="node01", detail=event["message"]).one_line()
    assert line.startswith(f"node01: {NAME}: the download could not be written: Not a directory")
    assert "free space under model_cache there" in line


def test_the_head_program_downloads_nothing_twice(hub: StandinHub, tmp_path: Path) -> None:
    run_program(hub, tmp_path)
    before = len(hub.requests)
    assert run_program(hub, tmp_path)[-1]["event"] == "done"
    assert not [r for r in hub.requests[before:] if "/resolve/" in r.path]


@pytest.mark.parametrize(
    ("repo_id", "config", "kind", "status", "said"),
    [
        (NAME, {"revision": "v9-missing"}, "revision", 404, "has no revision 'v9-missing'"),
        ("acme/no-such-model", {}, "repo", 404, "no such model on the hub"),
        ("acme/gated-chat", {}, "gated", 401, "is gated and no Hugging Face token was given"),
        ("acme/gated-chat", {"token": "hf_other"}, "gated", 403, "the token lacks access"),
    ],
)
def test_the_head_program_reports_each_failure_as_the_controller_words_it(
    hub: StandinHub,
    tmp_path: Path,
    repo_id: str,
    config: dict,
    kind: str,
    status: int,
    said: str,
) -> None:
    event = run_program(hub, tmp_path, repo_id, **config)[-1]
    assert (event["event"], event["kind"], event["status"]) == ("error", kind, status)
    model = Model(name=repo_id, revision=config.get("revision"))
    line = hub_error(model, kind, where="node01", status=status).one_line()
    assert line.startswith(f"node01: {repo_id}") and said in line
    assert "hf_other" not in json.dumps(event)


def test_the_head_program_reports_an_unreachable_hub_as_a_network_failure(
    tmp_path: Path,
) -> None:
    document = {"endpoint": "http://127.0.0.1:9", "repo": NAME, "revision": "main",
                "root": str(tmp_path)}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", HUB_DOWNLOAD_SOURCE],
        input=json.dumps(document) + "\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    event = json.loads(result.stdout.splitlines()[-1])
    assert (result.returncode, event["kind"]) == (1, "network")
    assert "127.0.0.1:9" in event["message"]
