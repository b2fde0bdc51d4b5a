"""The sandbox's tiny model, made locally (no model hub is reachable) and cached by recipe.

The model is made by `images/tiny-model/make_tiny_model.py` run in the workload image, so the
controller needs neither torch nor transformers. The result lands in `<cache>/models/tiny-llama`
with a `vcluster-recipe` file holding the hash of what made it (the script and the pinned
packages of the image); a later call with the same recipe returns at once.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from cluster.errors import VclusterError
from cluster.sandbox.dockerd import LocalDocker, ensure_local_docker
from cluster.sandbox.images import CACHE_DIR, IMAGES_DIR, WORKLOAD_IMAGE, Progress, recipe_hash

TINY_MODEL_NAME = "tiny-llama"
SECOND_MODEL_NAME = "tiny-llama-b"
"""The same recipe with another seed: a second model for clusters that serve several."""
TINY_MODEL_SEEDS = {TINY_MODEL_NAME: 1234, SECOND_MODEL_NAME: 4321}
RECIPE_FILE = "vcluster-recipe"
MAKE_MODEL_TIMEOUT_S = 600.0
SCRIPT_IN_CONTAINER = "/opt/vcluster/make_tiny_model.py"


def _quiet(_: str) -> None:
    """The default progress callback: say nothing."""


def tiny_model_recipe(images_dir: Path = IMAGES_DIR, name: str = TINY_MODEL_NAME) -> str:
    """The hash of what makes a model: the script, its seed and the workload image's pins."""
    return recipe_hash(
        [
            ("make_tiny_model.py", (images_dir / "tiny-model" / "make_tiny_model.py").read_bytes()),
            ("requirements.lock", (images_dir / "vllm-cpu" / "requirements.lock").read_bytes()),
            ("seed", str(TINY_MODEL_SEEDS[name]).encode()),
        ]
    )


def is_made(model_dir: Path, recipe: str) -> bool:
    """True when `model_dir` holds a complete model made with `recipe`."""
    marker = model_dir / RECIPE_FILE
    return marker.is_file() and marker.read_text().strip() == recipe


def make_model_argv(
    docker: LocalDocker, script: Path, models_dir: Path, target: str, seed: int
) -> list[str]:
    """`docker run` of the workload image that writes the model into models_dir/target."""
    return docker.argv(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python3",
        "--volume",
        f"{script}:{SCRIPT_IN_CONTAINER}:ro",
        "--volume",
        f"{models_dir}:/out",
        WORKLOAD_IMAGE,
        SCRIPT_IN_CONTAINER,
        f"/out/{target}",
        str(seed),
    )


def ensure_tiny_model(
    cache_dir: Path = CACHE_DIR,
    *,
    docker: LocalDocker | None = None,
    progress: Progress = _quiet,
    images_dir: Path = IMAGES_DIR,
    name: str = TINY_MODEL_NAME,
) -> Path:
    """Return `<cache_dir>/models/NAME`, making it first unless made with this recipe."""
    models_dir = cache_dir / "models"
    model_dir = models_dir / name
    recipe = tiny_model_recipe(images_dir, name)
    if is_made(model_dir, recipe):
        progress(f"{name}: cached (recipe {recipe[:12]})")
        return model_dir
    docker = docker or ensure_local_docker()
    started = time.monotonic()
    progress(f"{name}: making it in {model_dir}")
    staging = models_dir / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    _run_make(
        make_model_argv(
            docker,
            images_dir / "tiny-model" / "make_tiny_model.py",
            models_dir,
            staging.name,
            TINY_MODEL_SEEDS[name],
        )
    )
    (staging / RECIPE_FILE).write_text(recipe + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)  # the model appears complete or not at all
    progress(f"{name}: made in {time.monotonic() - started:.0f} s")
    return model_dir


def _run_make(argv: list[str]) -> None:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=MAKE_MODEL_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise VclusterError(
            f"making the tiny model failed: {done.stderr.strip()[-800:]}",
            where="localhost",
            fix=f"build {WORKLOAD_IMAGE} first (cluster.sandbox.images.build_images)",
        )
