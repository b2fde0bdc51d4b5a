"""The Ray-ready image: `FROM <the inventory's image>` plus the Ray that matches it (pure).

vLLM's images have had no Ray since vLLM 0.19.1. vcluster derives one layer on top of the
user's image: Ray from a package index (the head builds it, where GPU servers usually reach
one) or from a wheelhouse folder on the controller (air-gapped sites; its wheels travel in the
build context). The tag names the source image's ID and the Ray version, so one source always
gives the same tag, and a recipe label lets a later run find it built.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from cluster.decide.python_packages import normalize_name, parse_wheel_name, version_tuple
from cluster.errors import VclusterError
from cluster.facts.image import ImageFacts

DEFAULT_INDEX_URL = "https://pypi.org/simple"
RECIPE_LABEL = "io.vcluster.ray-recipe"
SOURCE_LABEL = "io.vcluster.source-image"
SOURCE_ID_LABEL = "io.vcluster.source-id"
"""The source image's ID: a later run finds the Ray-ready image of its image by it."""
WHEELS_DIR = "wheels"
"""Where the wheels sit in the build context."""
CONSTRAINTS_FILE = "constraints.txt"
"""Every package of the source image at its version: pip may add, never change one."""
_PEP440 = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[A-Za-z0-9.]+)?$")

RAY_FOR_VLLM: tuple[tuple[tuple[int, ...], str], ...] = (
    ((0, 19, 1), "ray[default]==2.60.0"),  # checked with vLLM 0.26.0 (2 x H200) and 0.32.0 (CPU)
    ((0,), "ray[cgraph]>=2.48.0"),  # what vLLM itself required before 0.19.1
)
"""The Ray requirement by the first vLLM version it applies to, newest first."""
RAY_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
"""The Pythons Ray 2.60 publishes wheels for."""


class RayImageError(VclusterError):
    """No Ray-ready image can be derived (no Ray for the image's Python, no wheel for it)."""


@dataclass(frozen=True)
class RayImageRecipe:
    """How to derive the Ray-ready image of one source image."""

    source: str
    source_id: str
    tag: str
    requirement: str
    """What pip installs, e.g. `ray[default]==2.60.0`."""
    index_url: str | None
    """The package index pip uses; None when the wheels come in the build context."""
    wheels: tuple[Path, ...] = ()
    """Wheels from the controller's wheelhouse, sent in the build context."""
    constraints: tuple[str, ...] = ()
    """`name==version` of every package in the source image (Ray's own excepted)."""

    @property
    def from_wheelhouse(self) -> bool:
        return self.index_url is None

    @property
    def labels(self) -> dict[str, str]:
        """The labels the build adds: where the image comes from, and its recipe."""
        return {
            SOURCE_LABEL: self.source,
            SOURCE_ID_LABEL: self.source_id,
            RECIPE_LABEL: self.recipe_hash,
        }

    @property
    def recipe_hash(self) -> str:
        """A digest of everything the build depends on (the wheels by name)."""
        parts = [self.source_id, self.requirement, self.index_url or "", dockerfile(self)]
        parts += sorted(w.name for w in self.wheels) + list(self.constraints)
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """`TAG (+ ray[default]==2.60.0 from 1 wheel(s) of the wheelhouse)`."""
        origin = f"{len(self.wheels)} wheel(s) of the wheelhouse" if self.wheels else self.index_url
        return f"{self.tag} (+ {self.requirement} from {origin})"


def ray_requirement(vllm_version: str | None, override: str | None = None) -> str:
    """The Ray requirement for an image of `vllm_version` (`override`: a Ray version to pin)."""
    if override:
        return f"ray[default]=={override}"
    version = version_tuple(vllm_version or "0")
    return next(req for first, req in RAY_FOR_VLLM if version >= first)


def derived_tag(source: str, source_id: str, requirement: str) -> str:
    """`vcluster/<name>-ray:<tag>-<id12>-ray<version>`: one tag per source image and Ray."""
    repository, _, tag = _split_reference(source)
    name = repository.rsplit("/", 1)[-1]
    ray = re.sub(r"[^A-Za-z0-9_.-]", "", requirement.split("=")[-1].split(">")[-1]) or "latest"
    digest = source_id.removeprefix("sha256:")[:12]
    suffix = f"-{digest}-ray{ray}"
    return f"vcluster/{name}-ray:{tag[: 128 - len(suffix)]}{suffix}"


def dockerfile(recipe: RayImageRecipe) -> str:
    """The derived image's Dockerfile; pip adds Ray and what Ray lacks, and changes nothing.

    The constraints pin every package the image has: a Ray that needs another version of one
    of them fails the build, rather than changing vLLM's dependencies under it. The source is
    named as the inventory names it: `up` has checked that it is one image ID on every node
    before anything is built from it. A wheelhouse's wheels stay in a layer of their own (a few
    hundred MB at most): without BuildKit there is no mount to install from instead.
    """
    context = "/tmp/vcluster-ray"  # in the build only; removed in the same RUN
    install = [
        "python3",
        "-m",
        "pip",
        "install",
        "--no-cache-dir",
        "--constraint",
        f"{context}/{CONSTRAINTS_FILE}",
    ]
    if recipe.from_wheelhouse:
        install += ["--no-index", "--find-links", f"{context}/{WHEELS_DIR}"]
    else:
        install += ["--index-url", recipe.index_url or DEFAULT_INDEX_URL]
    run = shlex.join([*install, recipe.requirement])
    lines = [
        f"FROM {recipe.source}",
        # images with an externally managed Python (PEP 668) refuse pip without this
        "ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1",
        f"COPY . {context}",
        f"RUN {run} && rm -rf {context} && ray --version",
    ]
    return "\n".join(lines) + "\n"


def constraints_text(recipe: RayImageRecipe) -> str:
    return "".join(f"{line}\n" for line in recipe.constraints)


def recipe_for(
    facts: ImageFacts,
    source: str,
    *,
    wheelhouse: Path | None = None,
    wheel_names: list[str] | None = None,
    index_url: str | None = None,
    ray_version: str | None = None,
) -> RayImageRecipe:
    """The recipe from a wheelhouse (when given) or from an index.

    `wheel_names` are the wheelhouse's file names (read by the caller); the wheels sent are Ray's
    own for the image's Python and machine, and every wheel of a package the image lacks at that
    version (Ray's own dependencies), so pip resolves offline without the whole wheelhouse.
    """
    if facts.python[:4].rstrip(".") not in RAY_PYTHONS:
        raise RayImageError(
            f"the image's Python {facts.python} has no Ray release vcluster knows "
            f"(Ray publishes wheels for Python {', '.join(RAY_PYTHONS)})",
            fix="use an image with Ray in it, or executor: mp",
        )
    if wheelhouse is not None:
        names = wheel_names or []
        ray_wheels = [n for n in names if _fits_ray(n, facts, ray_version)]
        if not ray_wheels:
            raise RayImageError(
                f"the wheelhouse {wheelhouse} has no Ray wheel for Python {facts.python} on "
                f"{facts.machine}" + (f" at version {ray_version}" if ray_version else ""),
                fix=f"add Ray and its dependencies: pip download --only-binary=:all: "
                f"--python-version {facts.python[:4].rstrip('.')} --platform "
                f"manylinux2014_{facts.machine} --dest {wheelhouse} 'ray[default]'",
            )
        # the newest Ray; of its wheels, a manylinux one before a plain linux one
        ray_wheel = max(
            ray_wheels,
            key=lambda n: (
                version_tuple(parse_wheel_name(n)["version"]),
                "manylinux" in parse_wheel_name(n)["platform"],
            ),
        )
        version = parse_wheel_name(ray_wheel)["version"]
        extra = [
            n
            for n in names
            if normalize_name(parse_wheel_name(n).get("name", "ray")) != "ray"
            and _fits(n, facts)
            and not _installed(n, facts)
        ]
        requirement = f"ray[default]=={version}"
        wheels = tuple(wheelhouse / n for n in sorted([ray_wheel, *extra]))
        tag = derived_tag(source, facts.image_id, requirement)
        return RayImageRecipe(
            source, facts.image_id, tag, requirement, None, wheels, _constraints(facts)
        )
    requirement = ray_requirement(facts.vllm, ray_version)
    tag = derived_tag(source, facts.image_id, requirement)
    return RayImageRecipe(
        source,
        facts.image_id,
        tag,
        requirement,
        index_url or DEFAULT_INDEX_URL,
        (),
        _constraints(facts),
    )


def _constraints(facts: ImageFacts) -> tuple[str, ...]:
    return tuple(
        f"{name}=={version}"
        for name, version in sorted(facts.packages.items())
        if normalize_name(name) != "ray" and _PEP440.match(version)
    )


def index_address(index_url: str) -> tuple[str, int]:
    """The host and port a package index URL is reached at."""
    match = re.match(
        r"^(?P<scheme>https?)://(?:[^@/]*@)?(?P<host>[^:/]+)(?::(?P<port>\d+))?", index_url
    )
    if match is None:
        raise RayImageError(f"{index_url!r} is not an http(s) URL", fix="set ray.index_url to one")
    default = 443 if match["scheme"] == "https" else 80
    return match["host"], int(match["port"] or default)


def _fits_ray(name: str, facts: ImageFacts, version: str | None) -> bool:
    wheel = parse_wheel_name(name)
    if not wheel or normalize_name(wheel["name"]) != "ray":
        return False
    if version and wheel["version"] != version:
        return False
    return _fits(name, facts)


def _fits(name: str, facts: ImageFacts) -> bool:
    """A wheel that installs on the image's Python and machine (glibc Linux)."""
    wheel = parse_wheel_name(name)
    if not wheel:
        return False
    pythons = wheel["python"].split(".")
    own = int(facts.python_tag.removeprefix("cp3") or 0)
    abi3 = wheel["abi"] == "abi3" and any(
        p.startswith("cp3") and p[3:].isdigit() and int(p[3:]) <= own for p in pythons
    )
    if facts.python_tag not in pythons and "py3" not in pythons and not abi3:
        return False
    return any(_linux_platform(p, facts.machine) for p in wheel["platform"].split("."))


def _linux_platform(platform: str, machine: str) -> bool:
    """`any`, or a glibc Linux tag for `machine` (not macOS, Windows or musl)."""
    if platform == "any":
        return True
    linux = platform.startswith(("manylinux", "linux_"))
    return linux and platform.endswith(f"_{machine}")


def _installed(name: str, facts: ImageFacts) -> bool:
    wheel = parse_wheel_name(name)
    if not wheel:
        return True  # not a wheel: never sent
    return facts.packages.get(normalize_name(wheel["name"])) == wheel["version"]


def _split_reference(image: str) -> tuple[str, str, str]:
    """(repository, separator, tag) of `repo:tag` or `repo@sha256:...`; tag `latest` if none."""
    if "@" in image:
        repository, digest = image.split("@", 1)
        if ":" in repository.rsplit("/", 1)[-1]:  # repo:tag@sha256:...: the tag names it
            repository, tag = repository.rsplit(":", 1)
            return repository, ":", tag
        return repository, "@", digest.removeprefix("sha256:")[:12]
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = image.rsplit(":", 1)
        return repository, ":", tag
    return image, ":", "latest"
