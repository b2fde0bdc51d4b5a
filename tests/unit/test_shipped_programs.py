"""Every program vcluster runs on a node keeps to the oldest Python it promises there (3.8).

The controller runs 3.11, so nothing else would notice a newer construct before a host does.
Three checks per program of `cluster.remote.registry`: its grammar (`ast.parse(feature_version=)`), a walk
for the newer library uses that pass the grammar check (`str.removeprefix`, `list[int]` or
`int | None` evaluated at run time, `zip(strict=)`, ...), and, where a Python 3.8 interpreter is
installed, the program compiled and its top level run by it. And the registry is complete: no
other module reads code beside itself, every program in a string is listed, and every
`python3 ... -c PROGRAM` takes its program from the registry.
"""

from __future__ import annotations

import ast
import glob
import io
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.remote.registry import (
    COLLECTIVE,
    HUB_DOWNLOAD,
    MULTICAST,
    OLDEST_PYTHON,
    PACKAGE,
    RELAY,
    SHIPPED_FILES,
    SHIPPED_SOURCES,
    SUPERVISOR,
    serving_files,
    shipped_sources,
    source,
)
from cluster.remote.serving.bundle import bundle_bytes

PROGRAMS = [(path, source(path)) for path in SHIPPED_FILES] + sorted(shipped_sources().items())

ONLY_READ_BESIDE_ITSELF = {
    "cluster/remote/registry.py": "the registry: it reads the shipped modules",
    "cluster/sandbox/images.py": "the sandbox's image recipes (images/), used on the controller",
}
"""The modules that may name `__file__`: any other one that reads code beside itself would be
shipping a program outside the registry."""

THIRD_PARTY_ON_NODES = {"aiohttp", "uvloop", "torch", "ray"}
"""What the images bring and the 3.8 interpreter here lacks: a module that needs one of them is
only compiled by it, and checked by the walk."""


# --- the walk for library uses newer than 3.8 -------------------------------------------------

NEWER_ATTRIBUTES = {
    "removeprefix": "3.9", "removesuffix": "3.9", "is_relative_to": "3.9", "with_stem": "3.9",
    "waitstatus_to_exitcode": "3.9", "randbytes": "3.9", "to_thread": "3.9",
    "pidfd_open": "3.9", "bit_count": "3.10", "hardlink_to": "3.10", "pairwise": "3.10",
    "packages_distributions": "3.10",
}  # fmt: skip
"""Methods and functions whose names are their own: flagged on whatever object."""
NEWER_NAMES = {
    ("math", "lcm"): "3.9", ("functools", "cache"): "3.9", ("ast", "unparse"): "3.9",
    ("typing", "Annotated"): "3.9", ("typing", "TypeAlias"): "3.10",
    ("typing", "ParamSpec"): "3.10", ("typing", "TypeGuard"): "3.10",
    ("typing", "Concatenate"): "3.10", ("typing", "Self"): "3.11", ("typing", "Never"): "3.11",
    ("typing", "LiteralString"): "3.11", ("typing", "assert_never"): "3.11",
    ("asyncio", "timeout"): "3.11", ("asyncio", "TaskGroup"): "3.11",
    ("datetime", "UTC"): "3.11", ("enum", "StrEnum"): "3.11", ("contextlib", "chdir"): "3.11",
}  # fmt: skip
"""(module, name): as `module.name` or `from module import name`."""
NEWER_MODULES = {"zoneinfo": "3.9", "graphlib": "3.9", "tomllib": "3.11"}
NEWER_KEYWORDS = {
    ("zip", "strict"): "3.10", ("dataclass", "slots"): "3.10", ("dataclass", "kw_only"): "3.10",
    ("Popen", "process_group"): "3.11", ("run", "process_group"): "3.11",
}  # fmt: skip
"""(function, keyword argument)."""
GENERIC_ONLY_FROM_3_9 = {
    "builtins": {"list", "dict", "tuple", "set", "frozenset", "type"},
    "collections.abc": {"*"},
    "collections": {"deque", "defaultdict", "OrderedDict", "Counter", "ChainMap"},
    "re": {"Pattern", "Match"},
    "subprocess": {"Popen", "CompletedProcess"},
    "os": {"PathLike"},
    "queue": {"Queue"},
    "asyncio": {"Queue", "Future", "Task"},
}
"""Classes that can be subscripted (`list[int]`) at run time only from 3.9 on."""
TYPES = {"int", "str", "float", "bool", "bytes", "complex", "object", "bytearray"}


class _NewerApis(ast.NodeVisitor):
    """Finds library uses newer than 3.8 where they are evaluated at run time: annotations
    under `from __future__ import annotations` and `if TYPE_CHECKING:` blocks are never run."""

    def __init__(self, tree: ast.Module) -> None:
        self.findings: list[str] = []
        self.lazy_annotations = any(
            isinstance(node, ast.ImportFrom)
            and node.module == "__future__"
            and any(alias.name == "annotations" for alias in node.names)
            for node in tree.body
        )
        self.generic = set(GENERIC_ONLY_FROM_3_9["builtins"])  # names that subscript at 3.9
        self.typing_names: set[str] = set()
        self.visit(tree)

    def _found(self, node: ast.AST, what: str, version: str) -> None:
        self.findings.append(f"line {getattr(node, 'lineno', '?')}: {what} needs Python {version}")

    def _annotation(self, node: ast.expr | None) -> None:
        if node is not None and not self.lazy_annotations:
            self.visit(node)

    # imports
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in NEWER_MODULES:
                self._found(node, f"import {alias.name}", NEWER_MODULES[alias.name.split(".")[0]])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in NEWER_MODULES:
            self._found(node, f"from {module} import", NEWER_MODULES[module.split(".")[0]])
        for alias in node.names:
            name = alias.asname or alias.name
            if (module, alias.name) in NEWER_NAMES:
                self._found(node, f"{module}.{alias.name}", NEWER_NAMES[module, alias.name])
            classes = GENERIC_ONLY_FROM_3_9.get(module, set())
            if "*" in classes or alias.name in classes:
                self.generic.add(name)
            if module == "typing":
                self.typing_names.add(name)

    # code that 3.8 never runs: a type checker's only, or behind a newer version
    def visit_If(self, node: ast.If) -> None:
        test = node.test
        type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        newer = (  # `if sys.version_info >= (3, 11):`
            isinstance(test, ast.Compare)
            and ast.unparse(test.left) == "sys.version_info"
            and isinstance(test.ops[0], ast.GtE | ast.Gt)
            and isinstance(test.comparators[0], ast.Tuple)
            and ast.literal_eval(test.comparators[0]) > OLDEST_PYTHON
        )
        if type_checking or newer:
            for statement in node.orelse:
                self.visit(statement)
            return
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            if not _is_dotted_call(decorator):
                self._found(decorator, "a decorator that is not a dotted name or its call", "3.9")
            self.visit(decorator)
        self.visit(node.args)
        self._annotation(node.returns)
        for statement in node.body:
            self.visit(statement)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_arg(self, node: ast.arg) -> None:
        self._annotation(node.annotation)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        self._annotation(node.annotation)
        if node.value is not None:
            self.visit(node.value)

    # library uses
    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in NEWER_ATTRIBUTES:
            self._found(node, f".{node.attr}()", NEWER_ATTRIBUTES[node.attr])
        if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in NEWER_NAMES:
            self._found(node, ast.unparse(node), NEWER_NAMES[node.value.id, node.attr])
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        function = _last_name(node.func)
        for keyword in node.keywords:
            if (function, keyword.arg) in NEWER_KEYWORDS:
                version = NEWER_KEYWORDS[function, keyword.arg]
                self._found(node, f"{function}({keyword.arg}=)", version)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if self._is_generic(node.value):
            self._found(node, f"{ast.unparse(node)} evaluated at run time", "3.9")
        if isinstance(node.slice, ast.Starred) or (
            isinstance(node.slice, ast.Tuple)
            and any(isinstance(item, ast.Starred) for item in node.slice.elts)
        ):
            self._found(node, "a starred expression in a subscript", "3.11")
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.BitOr):
            if self._is_type(node.left) or self._is_type(node.right):
                self._found(node, f"{ast.unparse(node)} (a union of types)", "3.10")
            elif _is_dict(node.left) or _is_dict(node.right):
                self._found(node, f"{ast.unparse(node)} (a union of dicts)", "3.9")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.op, ast.BitOr) and _is_dict(node.value):
            self._found(node, f"{ast.unparse(node)} (a union of dicts)", "3.9")
        self.generic_visit(node)

    def _is_generic(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.generic
        if isinstance(node, ast.Attribute):
            module = ast.unparse(node.value)
            classes = GENERIC_ONLY_FROM_3_9.get(module, set())
            return "*" in classes or node.attr in classes
        return False

    def _is_type(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Constant):
            return node.value is None
        if isinstance(node, ast.Name):
            return node.id in TYPES | self.generic | self.typing_names
        if isinstance(node, ast.Subscript):
            return self._is_type(node.value)
        return (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.BitOr)
            and (self._is_type(node.left) or self._is_type(node.right))
        )


def _last_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else ""


def _is_dotted_call(node: ast.expr) -> bool:
    """The decorator grammar before 3.9: `name`, `a.b.c`, or either called."""
    if isinstance(node, ast.Call):
        node = node.func
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def _is_dict(node: ast.expr) -> bool:
    return isinstance(node, ast.Dict | ast.DictComp) or (
        isinstance(node, ast.Call) and _last_name(node.func) == "dict"
    )


def newer_apis(text: str) -> list[str]:
    return _NewerApis(ast.parse(text)).findings


# --- the programs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), PROGRAMS, ids=[name for name, _ in PROGRAMS])
def test_it_parses_under_the_oldest_python_it_promises(name: str, text: str):
    ast.parse(text, filename=name, feature_version=OLDEST_PYTHON)


@pytest.mark.parametrize(("name", "text"), PROGRAMS, ids=[name for name, _ in PROGRAMS])
def test_it_uses_nothing_newer_where_it_runs(name: str, text: str):
    assert newer_apis(text) == [], f"{name} needs a newer Python than {OLDEST_PYTHON}"


@pytest.mark.parametrize(
    ("snippet", "needs"),
    [
        ('"vcluster-x".removeprefix("vcluster-")', "3.9"),
        ("Connection = tuple[int, str, int]", "3.9"),
        ("from collections.abc import Callable\nHandler = Callable[[int], int]", "3.9"),
        ("import subprocess\nsubprocess.Popen[bytes]", "3.9"),
        ("def f(x: list[int]) -> None: ...", "3.9"),  # annotations are evaluated without the future import
        ("isinstance(x, list | tuple)", "3.10"),
        ("Optional = int | None", "3.10"),
        ("merged = {'a': 1} | other", "3.9"),
        ("environment |= dict(PATH='/bin')", "3.9"),
        ("for a, b in zip(x, y, strict=True): ...", "3.10"),
        ("from functools import cache", "3.9"),
        ("import math\nmath.lcm(2, 3)", "3.9"),
        ("import zoneinfo", "3.9"),
        ("@buttons[0].clicked\ndef f(): ...", "3.9"),
        ("subprocess.Popen(argv, process_group=0)", "3.11"),
        ("a[*b]", "3.11"),
    ],
)  # fmt: skip
def test_the_walk_finds_what_a_3_8_host_would_refuse(snippet: str, needs: str):
    found = newer_apis(snippet)
    assert len(found) == 1 and found[0].endswith(f"needs Python {needs}"), found


@pytest.mark.parametrize(
    "snippet",
    [
        "from __future__ import annotations\ndef f(x: list[int] | None) -> dict[str, int]: ...",
        "from __future__ import annotations\nclass A:\n    rows: list[tuple[str, int]] = []",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    Connection = tuple[int, str]",
        "import typing\nPlacement = typing.Tuple[typing.Tuple[str, int], ...]",
        "import os\nflags = os.O_RDONLY | os.O_DIRECTORY",
        "gone = closed | peers(x)",
        "@contextlib.contextmanager\ndef f(): ...",
        "@web.middleware\nasync def f(): ...",
        "value[1:2]",
        "if sys.version_info >= (3, 11):\n    Popen(argv, process_group=0)\nelse:\n    Popen(argv)",
    ],
)
def test_the_walk_lets_3_8_code_pass(snippet: str):
    assert newer_apis(snippet) == []


# --- with a Python 3.8 interpreter, where there is one ---------------------------------------


def python_3_8() -> str | None:
    """A python3.8 on PATH, or pyenv's (tests/unit runs as root on the dev machines)."""
    for candidate in [
        *sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.8*/bin/python3.8"))),
        shutil.which("python3.8"),
    ]:
        if candidate and subprocess.run([candidate, "-c", ""], check=False).returncode == 0:
            return candidate
    return None


PYTHON_3_8 = python_3_8()
needs_python_3_8 = pytest.mark.skipif(
    PYTHON_3_8 is None,
    reason="no python3.8 here (PATH, ~/.pyenv/versions/3.8*): grammar and walk only",
)

RUN_UNDER_3_8 = """\
import importlib, runpy, sys
kind, target, name, bundle = sys.argv[1:5]
text = sys.stdin.read()
compile(text, name, "exec")
if kind == "program":  # its top level, not its main: as a module, not as __main__
    runpy.run_path(target, run_name="vcluster_shipped_check")
elif kind == "bundled":
    sys.path.insert(0, bundle)
    try:
        importlib.import_module(target)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in sys.argv[5].split(","):
            raise
        print("compiled only: it needs " + str(error.name))
print("ok")
"""


@pytest.fixture(scope="module")
def serving_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("bundle") / "serving.pyz"
    bundle.write_bytes(bundle_bytes())
    return bundle


@needs_python_3_8
@pytest.mark.parametrize(("name", "text"), PROGRAMS, ids=[name for name, _ in PROGRAMS])
def test_python_3_8_compiles_it_and_runs_its_top_level(name: str, text: str, serving_zip: Path):
    if name.endswith("__main__.py") or name not in SHIPPED_FILES:
        kind, target = "compile", ""  # a main without its arguments, or a program in a string
    elif name in serving_files() or name == "__init__.py":
        module = ("cluster/" + name).removesuffix(".py").removesuffix("/__init__")
        kind, target = "bundled", module.replace("/", ".")
    else:
        kind, target = "program", str(PACKAGE / name)
    assert PYTHON_3_8 is not None
    done = subprocess.run(
        [PYTHON_3_8, "-c", RUN_UNDER_3_8, kind, target, name, str(serving_zip),
         ",".join(sorted(THIRD_PARTY_ON_NODES))],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.rstrip().endswith("ok"), done.stderr[-2000:]


@needs_python_3_8
def test_python_3_8_refuses_what_the_walk_refuses():
    """The interpreter check is real: the supervisor's alias as it was fails under 3.8."""
    assert PYTHON_3_8 is not None
    done = subprocess.run([PYTHON_3_8, "-c", "PeerConnection = tuple[int, str, int]"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode != 0 and "not subscriptable" in done.stderr


# --- the registry is complete -----------------------------------------------------------------


def package_modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE.parent)), ast.parse(path.read_text())


def test_no_module_but_the_registry_reads_code_beside_itself():
    naming_file = {
        module
        for module, tree in package_modules()
        if any(isinstance(node, ast.Name) and node.id == "__file__" for node in ast.walk(tree))
    }
    assert naming_file == set(ONLY_READ_BESIDE_ITSELF), (
        "a module that reads a file beside itself to send it to a node: add the file to "
        "cluster.remote.registry.SHIPPED_FILES and read it with cluster.remote.registry.source()"
    )


def _python_program(text: str) -> bool:
    """A string that is a Python program: it parses and imports something."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return False
    return any(isinstance(node, ast.Import | ast.ImportFrom) for node in ast.walk(tree))


def test_every_program_kept_in_a_string_is_registered():
    found = set()
    for module, tree in package_modules():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and _python_program(node.value.value)
            ):
                name = module.removesuffix(".py").replace("/", ".")
                found |= {(name, t.id) for t in node.targets if isinstance(t, ast.Name)}
    assert found == set(SHIPPED_SOURCES), "add it to cluster.remote.registry.SHIPPED_SOURCES"


def _from_registry(tree: ast.Module, module: str) -> set[str]:
    """Names in `module` that hold a registered program: its registered constants, what is
    assigned `source(...)` or one of these, and functions that return one of these."""
    names = {name for owner, name in SHIPPED_SOURCES if owner == module}
    known = {"source()"}
    while True:
        before = len(names)
        for node in ast.walk(tree):
            value, targets = None, []
            if isinstance(node, ast.Assign):
                value, targets = node.value, [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.FunctionDef) and isinstance(node.body[-1], ast.Return):
                value, targets = node.body[-1].value, [node.name + "()"]
            if value is not None and _shape(value) in known | names:
                names |= set(targets)
                known |= {t for t in targets if t.endswith("()")}
        if len(names) == before:
            return names | known


def _shape(node: ast.expr) -> str:
    """`f(...)` as `f()`, a name as itself."""
    if isinstance(node, ast.Call):
        return _last_name(node.func) + "()"
    return _last_name(node)


def test_every_python_dash_c_takes_its_program_from_the_registry():
    unregistered = []
    for module, tree in package_modules():
        registered = _from_registry(tree, module.removesuffix(".py").replace("/", "."))
        for node in ast.walk(tree):
            if not isinstance(node, ast.List | ast.Tuple):
                continue
            words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            if "-c" not in words or "python3" not in words[: words.index("-c")]:
                continue
            program = node.elts[words.index("-c") + 1]
            if _shape(program) not in registered:
                unregistered.append(f"{module}:{node.lineno}: python3 -c {ast.unparse(program)}")
    assert unregistered == [], (
        "take the program from cluster.remote.registry (SHIPPED_FILES, SHIPPED_SOURCES)"
    )


def test_the_serving_zip_holds_the_registered_files_and_no_other():
    with zipfile.ZipFile(io.BytesIO(bundle_bytes())) as archive:
        names = set(archive.namelist())
    assert names == {"__main__.py"} | {f"cluster/{path}" for path in SHIPPED_FILES} - {
        f"cluster/{path}" for path in (SUPERVISOR, COLLECTIVE, RELAY, MULTICAST, HUB_DOWNLOAD)
    }
