"""The import layering of `cluster/`: what decides never reaches a node, nothing imports back up.

The package's folders are layers (LAYERS, from the bottom up): the programs shipped to nodes,
the probes of facts, the pure decisions, the node layer, the reports, the steps of `up` and
`down`, the CLI. Read from each module's own imports (`ast`, every import in the file,
`TYPE_CHECKING` ones too): a module imports what it names, and through it everything that one
imports.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from cluster.remote.registry import PACKAGE, SHIPPED_FILES

LAYERS = (
    ("cluster.remote", "programs shipped to nodes: standard library and each other only"),
    ("cluster.errors", "the error types every layer raises"),
    ("cluster.progress", "the progress lines every layer writes"),
    ("cluster.facts", "probes: what to run on a node, and pure parsers of what it printed"),
    ("cluster.decide", "pure decisions: inventory, plan, checks, runtime, traps"),
    ("cluster.nodes", "effects on nodes: transport, session, containers, images, clients"),
    ("cluster.sandbox", "the local GPU-less cluster, built on the node layer"),
    ("cluster.report", "status, metrics and the exporter, gathered over the node layer"),
    ("cluster.steps", "the steps of `up` and `down`"),
    ("cluster.cli", "commands and every table a person reads"),
    ("cluster.__main__", "`python -m cluster`"),
)
"""The package's folders from the bottom up, each with its job: a module imports only from its
own folder and the folders below it."""

ALLOWED_UPWARD: dict[tuple[str, str], str] = {}
"""(importing module, imported module) pairs that run against the layers, each with its reason
(none today)."""

PURE_LAYERS = ("cluster.facts", "cluster.decide")
"""The layers that decide: data in, data out, no node reached."""

NODE_LAYER = ("paramiko", "docker", "cluster.nodes.transport", "cluster.nodes.session")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def imports() -> dict[str, frozenset[str]]:
    """Each module of the package -> every module it imports (`from a import b` names `a` and,
    where `a.b` is a module, `a.b`)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names = found.setdefault(module_name(path), set())
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}:{node.lineno}: a relative import"
                names.add(node.module or "")
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name: frozenset(imported - {name}) for name, imported in found.items()}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def reached(module: str) -> set[str]:
    """Every module `module` imports, directly or through modules of the package."""
    graph = imports()
    seen: set[str] = set()
    todo = [module]
    while todo:
        for imported in graph[todo.pop()]:
            if imported not in seen:
                seen.add(imported)
                if imported in graph:
                    todo.append(imported)
    return seen


def importers_of(package: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        module: sorted(i for i in imported if within(i, package))
        for module, imported in imports().items()
        if not any(within(module, a) for a in allowed) and any(within(i, package) for i in imported)
    }


def layer_of(module: str) -> int:
    """The module's place in LAYERS (the package's bare `__init__` sits below them all)."""
    if module == "cluster":
        return -1
    for rank, (folder, _job) in enumerate(LAYERS):
        if within(module, folder):
            return rank
    raise AssertionError(f"{module} is in no layer: give its folder a place in LAYERS")


def test_every_module_is_in_a_layer():
    for module in imports():
        layer_of(module)


def test_no_import_runs_up_the_layers():
    upward = sorted(
        (module, imported)
        for module, imported_modules in imports().items()
        for imported in imported_modules
        if imported in imports()  # a module, not a name imported from one
        and layer_of(imported) > layer_of(module)
        and (module, imported) not in ALLOWED_UPWARD
    )
    assert upward == [], "imports that run up the layers: " + ", ".join(
        f"{module} -> {imported}" for module, imported in upward
    )


def pure_modules() -> list[str]:
    return sorted(m for m in imports() if any(within(m, layer) for layer in PURE_LAYERS))


@pytest.mark.parametrize("module", pure_modules())
def test_a_module_that_decides_reaches_no_node(module: str):
    reaching = sorted(i for i in reached(module) if any(within(i, n) for n in NODE_LAYER))
    assert reaching == [], f"{module} imports the node layer"


def test_no_module_imports_itself_back():
    """No cycle: a module never reaches, through its imports, a module that imports it."""
    cycles = sorted(m for m in imports() if m in reached(m))
    assert cycles == []


def test_a_program_shipped_to_a_node_imports_only_what_is_shipped_with_it():
    """The supervisor, the relay... travel as one file; the serving modules as one zip with
    `cluster/__init__.py`: an import of any other vcluster module fails there."""
    for path in SHIPPED_FILES:
        module = module_name(PACKAGE / path)
        ours = {i for i in imports()[module] if within(i, "cluster")}
        if within(module, "cluster.remote.serving"):
            outside = {
                i for i in ours if not within(i, "cluster.remote.serving") and i != "cluster"
            }
        else:
            outside = ours
        assert outside == set(), f"{path} imports {sorted(outside)}, which is not shipped with it"


def test_the_layering_reads_real_imports():
    """The reading itself: a known import of a step, a known path to paramiko, and an upward
    import seen as one."""
    assert "cluster.steps.model_files" in imports()["cluster.cli.models"]
    assert "paramiko" in reached("cluster.nodes.session")
    assert (
        layer_of("cluster.steps.up")
        > layer_of("cluster.nodes.session")
        > layer_of("cluster.decide.plan")
    )
    assert len(pure_modules()) > 20
