"""vLLM's known traps, as data: (vLLM versions, a condition on the facts and the plan) ->
(a mitigation, the WARN text, the public source). Pure: no network, no side effects.

`TRAPS` is the table; adding a trap is adding one row (and a test). `choose_mitigations` picks
the rows that apply to one model's plan, `mitigated_argv` applies them to a `vllm serve` argv
without ever overriding a value the user gave. The inventory turns a row off with
`traps: {NAME: off}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.decide.python_packages import version_tuple
from cluster.facts.fabric import Multicast

COMPILATION_CONFIG = "--compilation-config"


@dataclass(frozen=True)
class TrapFacts:
    """What the traps' conditions read, besides one model's parallelism and arguments."""

    vllm_version: str | None
    """The image's vLLM (None: not known, the image was not probed)."""
    accelerator: str = "nvidia"
    multicast: Mapping[str, tuple[Multicast, str]] = field(default_factory=dict)
    """Node name -> NVLink multicast's verdict and why (nodes without facts are absent)."""
    nodes: tuple[str, ...] = ()
    """Every node of the cluster: one absent from `multicast` is UNKNOWN."""
    image_has_ray: bool | None = None
    turned_off: frozenset[str] = frozenset()
    """Traps the inventory turned off (`traps: {NAME: off}`)."""


@dataclass(frozen=True)
class ModelShape:
    """The one model a trap is judged for."""

    tensor_parallel: int
    args: tuple[str, ...] = ()
    """The user's own `vllm serve` arguments (`model.args`)."""
    name: str | None = None


@dataclass(frozen=True)
class Versions:
    """A range of vLLM versions: at least `since`, below `before` (None: open)."""

    since: str
    before: str | None = None

    def contains(self, version: str) -> bool:
        number = version_tuple(version)
        if number < version_tuple(self.since):
            return False
        return self.before is None or number < version_tuple(self.before)

    def __str__(self) -> str:
        return f">= {self.since}" + (f", < {self.before}" if self.before else "")


@dataclass(frozen=True)
class CompilationConfig:
    """Merge this fragment into `--compilation-config` (keys the user set are kept)."""

    fragment: Mapping[str, Any]

    def describe(self) -> str:
        return f"{COMPILATION_CONFIG} {json.dumps(self.fragment, separators=(',', ':'))}"


@dataclass(frozen=True)
class HandledElsewhere:
    """No change to the argv: another part of vcluster handles it (named here)."""

    where: str

    def describe(self) -> str:
        return self.where


Action = CompilationConfig | HandledElsewhere
Condition = Callable[[TrapFacts, ModelShape], str | None]
"""The finding (one line) when the trap's condition holds; None when it does not."""


@dataclass(frozen=True)
class Trap:
    name: str
    """The inventory's key: `traps: {NAME: off}`."""
    versions: Versions
    condition: Condition
    action: Action
    warn: str
    source: str


@dataclass(frozen=True)
class Mitigation:
    """A trap that applies to one model, and what vcluster does about it."""

    trap: str
    action: str
    """What vcluster changes (or where it is handled), in one line."""
    why: str
    """The finding, with the vLLM version (and `not known` where it was assumed)."""
    warn: str
    source: str
    model: str | None = None
    fragment: Mapping[str, Any] | None = None
    """The `--compilation-config` fragment to merge (None: nothing to change in the argv)."""
    kept: tuple[str, ...] = ()
    """Keys of the fragment the user already set: their values stay."""
    skipped: str | None = None
    """Why the argv is left as the user wrote it (a config vcluster cannot merge into)."""

    def line(self) -> str:
        """`plan`'s line: the trap, what is done, why, and the source."""
        model = f" (model {self.model!r})" if self.model else ""
        if self.skipped:
            done = f"NOT applied ({self.skipped}); add {self.action} yourself"
        else:
            kept = f", the user's own {', '.join(self.kept)} kept" if self.kept else ""
            done = f"{self.action}{kept}"
        return f"{self.trap}{model}: {done}. Why: {self.why}. Source: {self.source}"


# --- conditions ----------------------------------------------------------------------------


def _tensor_parallel_without_multicast(facts: TrapFacts, model: ModelShape) -> str | None:
    if facts.accelerator != "nvidia" or model.tensor_parallel < 2:
        return None
    verdicts = {
        node: facts.multicast.get(node, (Multicast.UNKNOWN, "no facts"))
        for node in facts.nodes or facts.multicast
    }
    without = [f"{node} ({why})" for node, (v, why) in verdicts.items() if v is Multicast.NO]
    unknown = [f"{node} ({why})" for node, (v, why) in verdicts.items() if v is Multicast.UNKNOWN]
    if without:
        return f"tensor parallel {model.tensor_parallel} without NVLink multicast on " + "; ".join(
            without
        )
    if unknown:
        return (
            f"tensor parallel {model.tensor_parallel}, NVLink multicast not known on "
            + "; ".join(unknown)
            + " (taken as absent)"
        )
    return None


def _image_without_ray(facts: TrapFacts, model: ModelShape) -> str | None:
    if facts.image_has_ray is False:
        return "the image has no Ray (vLLM no longer depends on it)"
    return None


# --- the table -----------------------------------------------------------------------------

TRAPS: tuple[Trap, ...] = (
    Trap(
        name="flashinfer-allreduce-without-multicast",
        versions=Versions(since="0.25.0"),
        condition=_tensor_parallel_without_multicast,
        action=CompilationConfig({"pass_config": {"fuse_allreduce_rms": False}}),
        warn="vLLM's fused all-reduce + RMSNorm uses FlashInfer's mnnvl all-reduce by default, "
        "which crashes (an illegal memory access, then CUBLAS_STATUS_INTERNAL_ERROR) where "
        "NVLink multicast is missing",
        source="vLLM PR 47219 (mnnvl the single-node default), issues 48071 and 49158 (the "
        "crash), PR 49043 (falls back to the slower trtllm), PR 48075 (fusion off: fast)",
    ),
    Trap(
        name="ray-missing-from-image",
        versions=Versions(since="0.19.1"),
        condition=_image_without_ray,
        action=HandledElsewhere(
            "handled by the runtime choice: a Ray-ready image is derived, or vLLM's own "
            "multi-node mode runs (see `image` above)"
        ),
        warn="vLLM images no longer carry Ray: `ray start` fails in them",
        source="vLLM 0.19.1 dropped Ray from its dependencies (ai-dynamo/dynamo PR 8515)",
    ),
)
"""Every known trap; the first condition that holds gives the finding."""

TRAP_NAMES: frozenset[str] = frozenset(trap.name for trap in TRAPS)


def choose_mitigations(
    facts: TrapFacts, model: ModelShape, traps: Sequence[Trap] = TRAPS
) -> tuple[Mitigation, ...]:
    """The traps that apply to this model on these facts, each with its mitigation.

    A trap applies when its condition holds and the image's vLLM is in its range; with the
    version unknown it applies too (conservatively), and `why` says so.
    """
    chosen = []
    for trap in traps:
        if trap.name in facts.turned_off:
            continue
        finding = trap.condition(facts, model)
        if finding is None:
            continue
        if facts.vllm_version is None:
            version = "the image's vLLM version is not known: applied to be safe"
        elif trap.versions.contains(facts.vllm_version):
            version = f"vLLM {facts.vllm_version} ({trap.versions})"
        else:
            continue
        fragment = trap.action.fragment if isinstance(trap.action, CompilationConfig) else None
        kept = _user_keys(model.args, fragment) if fragment is not None else ()
        skipped = _users_config(model.args)[1] if fragment is not None else None
        chosen.append(
            Mitigation(
                trap=trap.name,
                action=trap.action.describe(),
                why=f"{finding}; {version}",
                warn=trap.warn,
                source=trap.source,
                model=model.name,
                fragment=fragment,
                kept=kept,
                skipped=skipped,
            )
        )
    return tuple(chosen)


# --- the argv ------------------------------------------------------------------------------


def mitigated_argv(argv: Sequence[str], mitigations: Sequence[Mitigation]) -> list[str]:
    """`argv` with every mitigation's compilation-config fragment merged in.

    The user's own `--compilation-config JSON` (or `=JSON`, or `-cc`) is parsed and merged:
    keys the user set keep their values. A config vcluster cannot merge (not a JSON object,
    or dotted `-cc.KEY=VALUE` options) is left exactly as it is, and vcluster adds nothing
    (`Mitigation.skipped` says so). Not a `vllm serve` argv: unchanged.
    """
    fragments = [m.fragment for m in mitigations if m.fragment is not None]
    argv = list(argv)
    if not fragments or argv[:2] != ["vllm", "serve"]:
        return argv
    merged: dict[str, Any] = {}
    for fragment in fragments:
        merged = _merge(merged, fragment)
    users, unmergeable = _users_config(argv)
    if unmergeable is not None:
        return argv
    found = _find_compilation_config(argv)
    if found is None:  # right after `vllm serve MODEL`: the user's own options come later
        ours = [COMPILATION_CONFIG, json.dumps(merged, separators=(",", ":"))]
        return [*argv[:3], *ours, *argv[3:]]
    start, length, _ = found
    combined = json.dumps(_merge(merged, users), separators=(",", ":"))
    return [*argv[:start], COMPILATION_CONFIG, combined, *argv[start + length :]]


_CONFIG_FLAGS = (COMPILATION_CONFIG, "-cc")


def _find_compilation_config(argv: Sequence[str]) -> tuple[int, int, str] | None:
    """(position, how many items, the value) of the user's compilation config, if any."""
    for position, arg in enumerate(argv):
        for flag in _CONFIG_FLAGS:
            if arg == flag and position + 1 < len(argv):
                return position, 2, argv[position + 1]
            if arg.startswith(flag + "="):
                return position, 1, arg[len(flag) + 1 :]
    return None


def _dotted(arg: str) -> str | None:
    """`-cc.pass_config.fuse_allreduce_rms=false` -> `pass_config.fuse_allreduce_rms`."""
    match = re.match(r"^(?:--compilation-config|-cc)\.([\w.]+)", arg)
    return match[1] if match else None


def _users_config(args: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """The user's compilation config as a dict, and why vcluster cannot merge into it (None:
    it can: no config, or a JSON object)."""
    if any(_dotted(arg) for arg in args):
        return {}, "the user sets compilation options one by one (-cc.KEY=VALUE)"
    found = _find_compilation_config(args)
    if found is None:
        return {}, None
    try:
        users = json.loads(found[2])
    except ValueError:
        return {}, f"the user's {COMPILATION_CONFIG} is not JSON"
    if not isinstance(users, dict):
        return {}, f"the user's {COMPILATION_CONFIG} is not a JSON object"
    return users, None


def _merge(ours: Mapping[str, Any], users: Mapping[str, Any]) -> dict[str, Any]:
    """`ours` deep-merged under `users`: where both have a key, the user's value wins."""
    merged = dict(ours)
    for key, value in users.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _user_keys(args: Sequence[str], fragment: Mapping[str, Any]) -> tuple[str, ...]:
    """The fragment's leaf keys (`pass_config.fuse_allreduce_rms`) the user's args set."""
    dotted = {key for arg in args if (key := _dotted(arg))}
    users, _ = _users_config([arg for arg in args if not _dotted(arg)])
    return tuple(path for path in _leaf_paths(fragment) if path in dotted or _has_path(users, path))


def _leaf_paths(fragment: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in fragment.items():
        path = f"{prefix}{key}"
        paths += _leaf_paths(value, path + ".") if isinstance(value, Mapping) else [path]
    return paths


def _has_path(data: Any, path: str) -> bool:
    for part in path.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True
