"""Secrets by reference, and the token vcluster makes for a cluster's Ray."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cluster.errors import VclusterError
from cluster.inventory import generated_ray_token_path
from cluster.secrets import SecretRef, ensure_token_file, state_dir


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


def test_the_state_folder_follows_the_usual_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert state_dir({"VCLUSTER_STATE_DIR": "/srv/vc"}) == Path("/srv/vc")
    assert state_dir({"XDG_STATE_HOME": "/home/u/.st"}) == Path("/home/u/.st/vcluster")
    monkeypatch.setenv("HOME", "/home/u")
    assert state_dir({}) == Path("/home/u/.local/state/vcluster")
    monkeypatch.setenv("VCLUSTER_STATE_DIR", "/srv/vc")
    assert generated_ray_token_path("prod") == Path("/srv/vc/clusters/prod/ray-token")
