"""The bearer check of the router and the agents: the right key passes, nothing else, and no
header value, however malformed, raises."""

from __future__ import annotations

import pytest

from cluster.remote.serving.auth import bearer_matches

SECRET = "s3cret-key"


@pytest.mark.parametrize("header", [f"Bearer {SECRET}", f"bearer {SECRET}", f"BEARER {SECRET}"])
def test_the_key_after_the_bearer_scheme_matches_whatever_the_scheme_case(header):
    assert bearer_matches(header, SECRET)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        SECRET,
        f"Basic {SECRET}",
        f"Bearer  {SECRET}",
        f"Bearer {SECRET} ",
        f"Bearer {SECRET[:-1]}",
        f"Bearer {SECRET}x",
        # what aiohttp makes of the bytes `Bearer \xff\xfe` (UTF-8 with surrogateescape)
        b"Bearer \xff\xfe".decode("utf-8", "surrogateescape"),
        "Bearer \ud800",  # a lone surrogate that surrogateescape never makes
        "Bearer é" + SECRET[1:],
        "Bearer \x00",
    ],
)
def test_anything_else_does_not_match_and_nothing_raises(header):
    assert not bearer_matches(header, SECRET)


def test_an_empty_secret_matches_nothing():
    assert not bearer_matches("Bearer ", "")
    assert not bearer_matches("Bearer", "")


def test_a_non_ascii_secret_matches_itself():
    assert bearer_matches("Bearer clé", "clé")
