"""Package names, wheel file names and versions, as pip and Docker write them."""

from __future__ import annotations

from cluster.decide.python_packages import normalize_name, parse_wheel_name, version_tuple


def test_names_are_compared_as_pep_503_says():
    assert (
        normalize_name("Typing_Extensions")
        == normalize_name("typing.extensions")
        == ("typing-extensions")
    )


def test_a_wheel_name_gives_its_parts_and_another_file_none():
    wheel = parse_wheel_name("ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl")
    assert (wheel["name"], wheel["version"], wheel["python"], wheel["platform"]) == (
        "ray", "2.60.0", "cp311", "manylinux2014_x86_64",
    )  # fmt: skip
    assert parse_wheel_name("README.txt") == {}


def test_versions_compare_by_their_leading_numbers():
    assert version_tuple("2.60.0+cpu") == (2, 60, 0)
    assert version_tuple("20.10.24+dfsg1") == (20, 10, 24)  # Debian's docker.io
    assert version_tuple("1.0.0rc1") == (1, 0, 0)
    assert version_tuple("v20") == ()
