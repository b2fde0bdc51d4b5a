"""Every program vcluster sends to a node or a container and runs there, with that machine's python3.

The controller runs Python 3.11; these run on the hosts' and the images' Python, as old as
OLDEST_PYTHON, so they keep to its grammar and library (tests/unit/test_shipped_programs.py
parses each one under it). A program reaches a node in one of three ways:

- a module of this package sent as its text, run as `python3 -c SOURCE ARGS` (the supervisor,
  the collective check, the relay, the multicast probe): `source(PATH)` reads it;
- the serving package zipped into `serving.pyz` (`cluster.remote.serving.bundle`), run as
  `python3 serving.pyz ...`: `serving_files()` lists what the zip holds;
- a short program kept in a string constant beside the parser of its output (SHIPPED_SOURCES).
"""

from __future__ import annotations

import importlib
from pathlib import Path

OLDEST_PYTHON = (3, 8)
"""The oldest Python a host or an image may have for vcluster's programs."""

PACKAGE = Path(__file__).parents[1]
"""The `cluster` package: every path below is under it."""

SUPERVISOR = "remote/supervisor.py"
"""Each container's first process: Ray, vLLM and the front, kept running."""
COLLECTIVE = "remote/collective.py"
"""The all-reduce check, run in every node's container."""
RELAY = "remote/relay.py"
"""One link of the chain that carries model files and images, run on each host."""
MULTICAST = "remote/multicast_probe.py"
"""The NVLink multicast probe, run on each host by the host probe."""
HUB_DOWNLOAD = "remote/hub_download.py"
"""A model's download from the Hugging Face hub, on the head (`download: head`)."""

_NOT_SERVED = frozenset({"bundle.py"})  # the controller's zipper, never inside the zip


def serving_files() -> list[str]:
    """The serving package's files that `serving.pyz` holds, as paths under this package."""
    folder = PACKAGE / "remote/serving"
    return [
        f"remote/serving/{path.name}"
        for path in sorted(folder.glob("*.py"))
        if path.name not in _NOT_SERVED
    ]


SHIPPED_FILES: tuple[str, ...] = (
    SUPERVISOR,
    COLLECTIVE,
    RELAY,
    MULTICAST,
    HUB_DOWNLOAD,
    "__init__.py",  # the bare packages the serving zip imports through
    "remote/__init__.py",
    *serving_files(),
)
"""Every module of this package that runs on a node, as a path under the package."""

SHIPPED_SOURCES: tuple[tuple[str, str], ...] = (
    ("cluster.facts.image", "PROBE_SOURCE"),  # in a throw-away container of the image
    ("cluster.decide.listeners", "LISTENERS_SCRIPT"),  # in each node's container (`docker exec`)
    ("cluster.facts.ray", "RAY_NODES_SCRIPT"),  # in the head container
    ("cluster.nodes.router_client", "ROUTER_CALL_SCRIPT"),  # in the head container
)
"""Every program kept in a string: (module, constant), run as `python3 -c CONSTANT ARGS`."""


def source(path: str) -> str:
    """The text of a shipped module (a path in SHIPPED_FILES), as the node receives it."""
    if path not in SHIPPED_FILES:
        raise ValueError(f"{path} is not a shipped program (cluster.remote.registry.SHIPPED_FILES)")
    return (PACKAGE / path).read_text()


def shipped_sources() -> dict[str, str]:
    """`module.CONSTANT` -> the program's text, for each program kept in a string."""
    return {
        f"{module}.{name}": getattr(importlib.import_module(module), name)
        for module, name in SHIPPED_SOURCES
    }
