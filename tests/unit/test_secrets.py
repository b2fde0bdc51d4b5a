"""Secrets by reference, and the token vcluster makes for a cluster's Ray."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cluster.decide.secrets import SecretRef, ensure_token_file
from cluster.decide.state_paths import agent_token_path, generated_ray_token_path
from cluster.errors import VclusterError


def test_a_made_token_is_random_long_and_readable_by_its_owner_only(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "ray-token", tmp_path / "b" / "ray-token"
    assert ensure_token_file(first) and ensure_token_file(second)
    token = SecretRef("file", str(first)).resolve()
    assert len(token) >= 43 and token != SecretRef("file", str(second)).resolve()
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700


def test_an_existing_token_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "ray-token"
    ensure_token_file(path)
    before = path.read_text()
    assert ensure_token_file(path) is False
    assert path.read_text() == before


def test_a_token_file_others_may_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "ray-token"
    ensure_token_file(path)
    path.chmod(0o644)
    with pytest.raises(VclusterError) as caught:
        ensure_token_file(path)
    assert "may be read by other users" in str(caught.value)
    assert f"chmod 600 {path}" in caught.value.fix


@pytest.mark.parametrize("token_exists", [False, True])
def test_a_cluster_folder_that_already_existed_open_to_others_is_made_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token_exists: bool
) -> None:
    monkeypatch.setenv("VCLUSTER_STATE_DIR", str(tmp_path / "state"))
    ray_token, agent_token = generated_ray_token_path("prod"), agent_token_path("prod")
    folder = ray_token.parent
    assert agent_token.parent == folder
    folder.mkdir(parents=True)
    for made in (tmp_path / "state", folder):
        made.chmod(0o755)  # as `mkdir -p` or an older vcluster left it
    if token_exists:
        ray_token.write_text("kept\n")
        ray_token.chmod(0o600)
    assert ensure_token_file(ray_token) is not token_exists
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o750)
    assert ensure_token_file(agent_token)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o755  # only the token's folder
