"""The checks' result model: PASS / WARN / FAIL / SKIP, one result per rule and node, what the
rules read, and the helpers every rule family builds its results with."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cluster.decide.inventory import Inventory
from cluster.decide.runtime import Runtime
from cluster.facts.host import HostFacts


class Status(enum.StrEnum):
    """A check's outcome; FAIL stops `up`."""

    PASS = "PASS"  # noqa: S105 (an outcome, not a password)
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    """One rule's verdict on one node (or on the cluster when `node` is None)."""

    name: str
    status: Status
    detail: str
    node: str | None = None
    remedy: str | None = None
    data: Mapping[str, Any] | None = None
    """Figures behind the verdict, for `--json` (the collective check's measurements)."""

    def to_dict(self) -> dict[str, Any]:
        """As JSON-able data."""
        data: dict[str, Any] = {
            "name": self.name,
            "node": self.node,
            "status": self.status.value,
            "detail": self.detail,
            "remedy": self.remedy,
        }
        if self.data is not None:
            data["data"] = dict(self.data)
        return data


@dataclass(frozen=True)
class CheckInput:
    """What the rules read: the inventory and each reachable node's facts.

    `unreachable` gives, for nodes that could not be probed, the reason (the SSH error).
    `cluster_running_on_head`: this cluster's own container already runs on the head, so
    its ports are expected to be in use. `runtime`: Ray or not, and vLLM's executor, when the
    image's facts are known (else the inventory's default, with Ray).
    """

    inventory: Inventory
    facts: Mapping[str, HostFacts]
    unreachable: Mapping[str, str] = field(default_factory=dict)
    cluster_running_on_head: bool = False
    runtime: Runtime | None = None

    def probed(self) -> Iterator[tuple[str, HostFacts]]:
        """(node name, facts) of every probed node, in inventory order."""
        for node in self.inventory.nodes:
            if node.node_name in self.facts:
                yield node.node_name, self.facts[node.node_name]


Rule = Callable[[CheckInput], list[CheckResult]]
T = TypeVar("T")


def passes(name: str, node: str | None, detail: str) -> CheckResult:
    """A PASS: what was found."""
    return CheckResult(name, Status.PASS, detail, node)


def warns(name: str, node: str | None, detail: str, fix: str | None = None) -> CheckResult:
    """A WARN: what was found, and what to do about it if anything."""
    return CheckResult(name, Status.WARN, detail, node, fix)


def fails(name: str, node: str | None, detail: str, fix: str) -> CheckResult:
    """A FAIL (it stops `up`): what was found and the fix."""
    return CheckResult(name, Status.FAIL, detail, node, fix)


def skips(name: str, node: str | None, detail: str) -> CheckResult:
    """A SKIP: why the rule did not apply."""
    return CheckResult(name, Status.SKIP, detail, node)


def majority(values: Mapping[str, T]) -> T:
    """The most common value (the first seen among equals)."""
    return Counter(values.values()).most_common(1)[0][0]


def gpu_mode_only(rule: Rule) -> Rule:
    """In `accelerator: cpu` mode the rule gives one SKIP with the reason instead."""

    def checked(given: CheckInput) -> list[CheckResult]:
        if given.inventory.accelerator == "cpu":
            name = rule.__name__.removeprefix("check_").replace("_", " ")
            return [skips(name, None, "accelerator: cpu, no GPUs to check")]
        return rule(given)

    checked.__name__ = rule.__name__
    checked.__doc__ = rule.__doc__
    return checked


def failed(results: list[CheckResult]) -> list[CheckResult]:
    """The results that FAIL."""
    return [result for result in results if result.status is Status.FAIL]


def exit_code(results: list[CheckResult]) -> int:
    """1 when any check FAILs, else 0."""
    return 1 if failed(results) else 0


def results_as_dicts(results: list[CheckResult]) -> list[dict[str, Any]]:
    """The results as JSON-able data, for `--json`."""
    return [result.to_dict() for result in results]
