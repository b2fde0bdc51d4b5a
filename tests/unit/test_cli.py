"""The command line: exit codes, one-line errors and no tracebacks for expected failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cluster import __version__
from cluster.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "inventory").glob("*.yaml"))


def vcluster(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_version_is_printed():
    result = vcluster("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


@pytest.mark.parametrize("inventory", EXAMPLES, ids=lambda p: p.name)
def test_every_example_inventory_is_valid(inventory):
    result = vcluster("validate", inventory)
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


@pytest.mark.parametrize("inventory", EXAMPLES, ids=lambda p: p.name)
def test_every_example_inventory_plans_offline(inventory):
    result = vcluster("plan", "--offline", inventory)
    assert result.exit_code == 0, result.output
    assert "vllm" in result.output


def test_invalid_inventory_gives_every_problem_with_its_line_and_exit_code_2(tmp_path):
    inventory = tmp_path / "bad.yaml"
    inventory.write_text(
        "cluster: demo\n"
        "image: vllm/vllm-openai:v0.11.0\n"
        "nodes:\n"
        "  - {address: 10.0.0.1, gpus: 8, colour: red}\n"
        "  - {address: 10.0.0.1, gpus: 8}\n"
        "model_cache: data\n"
        "model: {name: m}\n"
    )
    result = vcluster("validate", inventory)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [
        f"error: {inventory}:4: nodes[0].colour: unknown key (check its spelling in docs/inventory.md)",
        f"error: {inventory}:5: nodes[1].address: duplicate address '10.0.0.1' (also nodes[0])",
        f"error: {inventory}:6: model_cache: must be an absolute path on the hosts, got 'data'",
    ]
    assert "Traceback" not in result.output


def test_missing_inventory_file_is_one_line_and_exit_code_2(tmp_path):
    result = vcluster("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "nope.yaml" in result.output


def test_validate_json_returns_the_normalised_inventory():
    result = vcluster("validate", "--json", REPO / "inventory" / "cpu-2.yaml")
    assert result.exit_code == 0
    document = json.loads(result.output)
    assert document["valid"] is True
    assert document["inventory"]["executor"] is None, "left out: chosen on the image's facts"
    assert document["inventory"]["accelerator"] == "cpu"


def test_plan_json_masks_secrets_even_when_they_are_set():
    secret = "sk-this-must-never-be-printed"
    result = vcluster(
        "plan",
        "--offline",
        "--json",
        REPO / "inventory" / "gpu-4x8.yaml",
        env={"HF_TOKEN": secret, "VLLM_API_KEY": secret},
    )
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    plan = json.loads(result.output)
    head = plan["nodes"][0]
    assert "--tensor-parallel-size" in head["serve"]["argv"]


def test_console_script_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "validate", str(REPO / "inventory" / "gpu-2x8.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
