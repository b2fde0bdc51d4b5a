"""The controller's state paths (`cluster/decide/state_paths.py`): one folder, one layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.decide.state_paths import (
    agent_token_path,
    collective_run_path,
    file_hashes_path,
    generated_ray_token_path,
    image_facts_dir,
    state_dir,
)


def test_the_state_folder_follows_the_usual_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert state_dir({"VCLUSTER_STATE_DIR": "/srv/vc"}) == Path("/srv/vc")
    assert state_dir({"XDG_STATE_HOME": "/home/u/.st"}) == Path("/home/u/.st/vcluster")
    monkeypatch.setenv("HOME", "/home/u")
    assert state_dir({}) == Path("/home/u/.local/state/vcluster")


def test_every_file_lies_in_the_state_folder_and_a_clusters_own_in_its_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VCLUSTER_STATE_DIR", "/srv/vc")
    assert generated_ray_token_path("prod") == Path("/srv/vc/clusters/prod/ray-token")
    assert agent_token_path("prod") == Path("/srv/vc/clusters/prod/agent-token")
    assert collective_run_path("prod") == Path("/srv/vc/clusters/prod/collective.json")
    assert file_hashes_path() == Path("/srv/vc/file-hashes.json")
    assert image_facts_dir() == Path("/srv/vc/image-facts")


def test_no_other_module_computes_a_state_path() -> None:
    """The state folder's names appear in `state_paths.py` only, so its layout is read there."""
    package = Path(__file__).resolve().parents[2] / "cluster"
    # (the tokens' file names are also the secret files' names in the containers: not listed)
    names = (
        "state_dir()",
        "XDG_STATE_HOME",
        '"clusters"',
        "file-hashes.json",
        "collective.json",
        '"image-facts"',
    )
    found = [
        f"{path.relative_to(package.parent)}: {name}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "state_paths.py"
        for name in names
        if name in path.read_text()
    ]
    assert found == []
