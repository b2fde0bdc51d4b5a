"""Load YAML while remembering the line of every key, so errors can say `file:line key.path`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.errors import InventoryError, Problem

KeyPath = tuple[str | int, ...]


def format_key_path(path: KeyPath) -> str:
    """`("nodes", 1, "ssh", "port")` -> `nodes[1].ssh.port`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


@dataclass
class PositionedDocument:
    """A YAML document's data plus the 1-based line of each key path."""

    source: Path
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)
    duplicate_keys: list[tuple[KeyPath, int]] = field(default_factory=list)

    def line_of(self, path: KeyPath) -> int:
        """The line of `path`, or of its nearest ancestor that has one (1 if none)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return 1

    def problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(f"{self.source}:{self.line_of(path)}", format_key_path(path), message)


def load_positioned_yaml(path: Path) -> PositionedDocument:
    """Parse `path` (safe loader) and index the line of every mapping key and list item."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InventoryError([Problem(str(path), "", f"cannot read the file: {reason}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        message = f"invalid YAML: {exc.problem or exc.context}"
        raise InventoryError([Problem(f"{path}:{line}", "", message)]) from None
    document = PositionedDocument(source=path, data=data)
    if node is not None:
        _index(node, (), document)
    return document


def _index(node: yaml.Node, path: KeyPath, document: PositionedDocument) -> None:
    document.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = (*path, key)
            line = key_node.start_mark.line + 1
            if key in seen:
                document.duplicate_keys.append((child, line))
                continue
            seen.add(key)
            document.lines[child] = line
            _index(value_node, child, document)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index(item, (*path, index), document)
