"""The import layering of `cluster/`: what decides never reaches a node, nothing imports back up.

Layers, from the top: the CLI (`cluster/cli`), the steps of `up` and `down` (`cluster/steps`),
the modules that touch nodes (over `cluster.session`, `cluster.transport`, paramiko, docker),
and the pure modules that decide (inventory, plan, checks, parsers of facts). Read from each
module's own imports (`ast`, every import in the file, `TYPE_CHECKING` ones too): a module
imports what it names, and through it everything that one imports.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from cluster.shipped import PACKAGE, SHIPPED_FILES

IMPORTS_CLI = {
    "cluster.__main__": "`python -m cluster` is the CLI's entry point",
}
"""Modules outside `cluster/cli` that may import it, each with its reason."""

IMPORTS_STEPS: dict[str, str] = {}
"""Modules outside `cluster/steps` and `cluster/cli` that may import `cluster.steps`, each with
its reason (none today)."""

PURE = [
    "cluster.checks",
    "cluster.collective_report",
    "cluster.errors",
    "cluster.facts.fabric",
    "cluster.facts.gpu",
    "cluster.facts.host",
    "cluster.facts.image",
    "cluster.facts.probe",
    "cluster.firewall",
    "cluster.inventory",
    "cluster.distribution.chain",
    "cluster.model_plan",
    "cluster.plan",
    "cluster.python_packages",
    "cluster.ray",
    "cluster.ray_image",
    "cluster.runtime",
    "cluster.serving.catalog",
    "cluster.serving.placement",
    "cluster.serving.routes",
    "cluster.traps",
    "cluster.yaml_positions",
]
"""The modules that decide: data in, data out, no node reached."""

NODE_LAYER = ("paramiko", "docker", "cluster.transport", "cluster.session")


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


def test_only_the_cli_imports_the_cli():
    found = importers_of("cluster.cli", ("cluster.cli",))
    assert set(found) == set(IMPORTS_CLI), found


def test_only_the_cli_and_the_steps_import_the_steps():
    found = importers_of("cluster.steps", ("cluster.steps", "cluster.cli"))
    assert set(found) == set(IMPORTS_STEPS), found


@pytest.mark.parametrize("module", PURE)
def test_a_module_that_decides_reaches_no_node(module: str):
    reaching = sorted(i for i in reached(module) if any(within(i, n) for n in NODE_LAYER))
    assert reaching == [], f"{module} imports the node layer"


def test_the_pure_modules_named_here_exist():
    assert set(PURE) <= set(imports())


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
        if within(module, "cluster.serving"):
            outside = {i for i in ours if not within(i, "cluster.serving") and i != "cluster"}
        else:
            outside = ours
        assert outside == set(), f"{path} imports {sorted(outside)}, which is not shipped with it"


def test_the_layering_reads_real_imports():
    """The reading itself: a known import of a step, and a known path to paramiko."""
    assert "cluster.steps.model_files" in imports()["cluster.cli.models"]
    assert "paramiko" in reached("cluster.session")
