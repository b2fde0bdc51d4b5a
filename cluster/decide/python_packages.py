"""Python packages by name and version, and wheel file names (pure): what the sandbox's
wheelhouse and the Ray-ready image's recipe both read."""

from __future__ import annotations

import re

_WHEEL_NAME = re.compile(
    r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<python>[^-]+)-(?P<abi>[^-]+)"
    r"-(?P<platform>[^-]+)\.whl$"
)


def normalize_name(name: str) -> str:
    """PEP 503 normalization: `Typing_Extensions` and `typing-extensions` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel_name(filename: str) -> dict[str, str]:
    """A wheel file name's parts (name, version, python, abi, platform); {} for another file."""
    match = _WHEEL_NAME.match(filename)
    return match.groupdict() if match else {}


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a version (`2.60.0+cpu` -> (2, 60, 0), `20.10.24+dfsg1` ->
    (20, 10, 24)), for comparing releases; stops at the first part that is not a number."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
    return tuple(numbers)
