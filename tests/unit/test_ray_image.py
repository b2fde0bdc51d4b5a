"""The Ray-ready image's recipe: which Ray, from where, under which tag, built how."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

import pytest

from cluster.decide.ray_image import (
    DEFAULT_INDEX_URL,
    RayImageError,
    constraints_text,
    derived_tag,
    dockerfile,
    index_address,
    ray_requirement,
    recipe_for,
)
from cluster.facts.image import parse_image_probe
from cluster.nodes.image_build import build_context

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "image-facts"
SOURCE_ID = "sha256:2ad7ec1c6bbc52fb488edd7caca61df5324dab0d5408bde7cee25ea657ab5ccf"
NO_RAY = parse_image_probe((FIXTURES / "vllm-cpu-noray-0.32.0.txt").read_text(), SOURCE_ID)
WHEELHOUSE = Path("/wheels")
RAY_311 = "ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl"


@pytest.mark.parametrize(
    ("vllm", "requirement"),
    [
        ("0.11.0", "ray[cgraph]>=2.48.0"),  # vLLM required Ray itself then
        ("0.19.0", "ray[cgraph]>=2.48.0"),
        ("0.19.1", "ray[default]==2.60.0"),  # the first vLLM without Ray
        ("0.26.0", "ray[default]==2.60.0"),
        ("0.32.0+cpu", "ray[default]==2.60.0"),
        ("1.0.0rc1", "ray[default]==2.60.0"),
    ],
)
def test_the_ray_release_follows_the_images_vllm(vllm: str, requirement: str):
    assert ray_requirement(vllm) == requirement


def test_a_ray_version_in_the_inventory_wins():
    assert ray_requirement("0.26.0", override="2.55.1") == "ray[default]==2.55.1"


@pytest.mark.parametrize(
    ("source", "tag"),
    [
        ("vllm/vllm-openai:v0.26.0", "vcluster/vllm-openai-ray:v0.26.0-2ad7ec1c6bbc-ray2.60.0"),
        ("registry.local:5000/ml/vllm:v1", "vcluster/vllm-ray:v1-2ad7ec1c6bbc-ray2.60.0"),
        ("vllm/vllm-openai", "vcluster/vllm-openai-ray:latest-2ad7ec1c6bbc-ray2.60.0"),
        ("vllm/vllm-openai@sha256:" + "9f" * 32,
         "vcluster/vllm-openai-ray:9f9f9f9f9f9f-2ad7ec1c6bbc-ray2.60.0"),
        ("vllm/vllm-openai:v0.26.0@sha256:" + "9f" * 32,
         "vcluster/vllm-openai-ray:v0.26.0-2ad7ec1c6bbc-ray2.60.0"),
    ],
)  # fmt: skip
def test_the_derived_tag_names_the_source_its_id_and_the_ray_version(source: str, tag: str):
    assert derived_tag(source, SOURCE_ID, "ray[default]==2.60.0") == tag


def test_a_long_source_tag_is_cut_so_the_tag_stays_valid():
    tag = derived_tag("vllm/vllm-openai:" + "v" * 200, SOURCE_ID, "ray[default]==2.60.0")
    assert len(tag.split(":", 1)[1]) <= 128 and tag.endswith("-2ad7ec1c6bbc-ray2.60.0")


def test_from_a_wheelhouse_only_rays_wheel_for_the_images_python_and_what_it_lacks_are_sent():
    names = [
        RAY_311,
        "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl",  # another Python
        "ray-2.60.0-cp311-cp311-manylinux2014_aarch64.whl",  # another machine
        "ray-2.50.0-cp311-cp311-manylinux2014_x86_64.whl",  # older
        f"torch-{NO_RAY.packages['torch']}-cp311-cp311-linux_x86_64.whl",  # in the image already
        "opencensus-0.11.4-py2.py3-none-any.whl",  # in the image already (Ray's former dependency)
        "ray_only_dependency-1.0-py3-none-any.whl",  # not in the image: Ray may need it
        "ray_only_dependency-1.0-cp312-cp312-manylinux2014_x86_64.whl",  # another Python
        "ray-2.60.0-cp311-cp311-macosx_12_0_x86_64.whl",  # another system
        "ray-2.60.0-cp311-cp311-musllinux_1_2_x86_64.whl",  # another C library
        "ray_only_dependency-2.0-cp312-abi3-manylinux2014_x86_64.whl",  # a newer Python's abi3
        "README.txt",
    ]
    recipe = recipe_for(NO_RAY, "vcluster/vllm-cpu-noray:0.32.0", wheelhouse=WHEELHOUSE,
                        wheel_names=names)  # fmt: skip
    assert recipe.requirement == "ray[default]==2.60.0"
    assert recipe.from_wheelhouse and recipe.index_url is None
    sent = {w.name for w in recipe.wheels}
    assert sent == {RAY_311, "ray_only_dependency-1.0-py3-none-any.whl"}
    assert recipe.tag == "vcluster/vllm-cpu-noray-ray:0.32.0-2ad7ec1c6bbc-ray2.60.0"


def test_a_wheelhouse_without_a_fitting_ray_wheel_names_what_to_add():
    names = ["ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"]
    with pytest.raises(RayImageError) as raised:
        recipe_for(NO_RAY, "img:1", wheelhouse=WHEELHOUSE, wheel_names=names)
    assert "Python 3.11.2" in raised.value.message and "x86_64" in raised.value.message
    fix = raised.value.fix or ""
    assert "pip download" in fix and "--python-version 3.11" in fix
    assert "--platform manylinux2014_x86_64" in fix and "--no-deps" not in fix  # Ray's own too


def test_a_pinned_ray_version_must_be_in_the_wheelhouse():
    with pytest.raises(RayImageError, match=r"at version 2\.55\.0"):
        recipe_for(NO_RAY, "img:1", wheelhouse=WHEELHOUSE, wheel_names=[RAY_311],
                   ray_version="2.55.0")  # fmt: skip


def test_an_image_python_ray_does_not_publish_for_is_refused():
    old = dataclasses.replace(NO_RAY, python="3.8.18")
    with pytest.raises(RayImageError, match=r"Python 3\.8\.18"):
        recipe_for(old, "img:1")


def test_from_an_index_the_head_pips_the_matching_ray():
    recipe = recipe_for(NO_RAY, "vllm/vllm-openai:v0.32.0")
    assert recipe.index_url == DEFAULT_INDEX_URL and recipe.wheels == ()
    text = dockerfile(recipe)
    assert text.startswith("FROM vllm/vllm-openai:v0.32.0\n")
    assert f"--index-url {DEFAULT_INDEX_URL} 'ray[default]==2.60.0'" in text
    assert "--no-index" not in text
    assert "&& ray --version" in text  # the build fails if `ray` did not land on PATH


def test_pip_may_add_packages_but_never_change_one_the_image_has():
    recipe = recipe_for(NO_RAY, "vllm/vllm-openai:v0.32.0")
    assert "--constraint /tmp/vcluster-ray/constraints.txt" in dockerfile(recipe)
    pins = constraints_text(recipe).splitlines()
    assert f"torch=={NO_RAY.packages['torch']}" in pins
    assert "vllm==0.32.0+cpu" in pins and not any(p.startswith("ray==") for p in pins)


def test_from_a_wheelhouse_pip_never_goes_to_an_index():
    recipe = recipe_for(NO_RAY, "img:1", wheelhouse=WHEELHOUSE, wheel_names=[RAY_311])
    text = dockerfile(recipe)
    assert "COPY . /tmp/vcluster-ray" in text
    assert "--no-index --find-links /tmp/vcluster-ray/wheels" in text and "--index-url" not in text


def test_a_user_index_url_is_one_quoted_word_in_the_dockerfile():
    recipe = recipe_for(NO_RAY, "img:1", index_url="https://mirror.example/simple; rm -rf /")
    assert "'https://mirror.example/simple; rm -rf /'" in dockerfile(recipe)


def test_the_recipe_hash_changes_with_the_source_image_and_the_ray():
    one = recipe_for(NO_RAY, "img:1")
    other_source = recipe_for(dataclasses.replace(NO_RAY, image_id="sha256:" + "00" * 32), "img:1")
    other_ray = recipe_for(NO_RAY, "img:1", ray_version="2.55.1")
    hashes = {one.recipe_hash, other_source.recipe_hash, other_ray.recipe_hash}
    assert len(hashes) == 3 and one.recipe_hash == recipe_for(NO_RAY, "img:1").recipe_hash
    assert one.labels["io.vcluster.source-image"] == "img:1"


def test_the_build_context_holds_the_dockerfile_and_the_wheels(tmp_path: Path):
    wheel = tmp_path / RAY_311
    wheel.write_bytes(b"wheel bytes")
    recipe = recipe_for(NO_RAY, "img:1", wheelhouse=tmp_path, wheel_names=[RAY_311])
    buffer = io.BytesIO()
    build_context(recipe, buffer)
    with tarfile.open(fileobj=buffer) as tar:
        assert sorted(tar.getnames()) == ["Dockerfile", "constraints.txt", f"wheels/{RAY_311}"]
        dockerfile_member = tar.extractfile("Dockerfile")
        assert dockerfile_member is not None
        assert dockerfile_member.read().decode() == dockerfile(recipe)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("https://pypi.org/simple", ("pypi.org", 443)),
        ("http://mirror.local:8080/simple/", ("mirror.local", 8080)),
        ("https://nexus.corp/repository/pypi/simple", ("nexus.corp", 443)),
    ],
)
def test_the_index_is_reached_at_its_host_and_port(url: str, address: tuple[str, int]):
    assert index_address(url) == address
