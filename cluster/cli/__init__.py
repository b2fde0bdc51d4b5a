"""The `vcluster` command line: parse options, call one function, render. No logic here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from cluster import __version__
from cluster.cli.common import INVENTORY, JSON, reports_errors, stderr_console
from cluster.cli.lifecycle import (
    ConsoleReporter,
    check,
    down,
    exec_,
    exporter,
    logs,
    status,
    up,
)
from cluster.cli.plan_text import render_text
from cluster.decide.inventory import Inventory, load_inventory
from cluster.decide.plan import build_plan, declared_facts
from cluster.steps.up import live_plan


def _load(path: Path) -> Inventory:
    return load_inventory(path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vcluster")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs on stderr.")
def main(verbose: bool) -> None:
    """Turn GPU servers reachable over SSH into one vLLM OpenAI-compatible endpoint."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


@main.command()
@INVENTORY
@JSON
@reports_errors
def validate(inventory: Path, as_json: bool) -> None:
    """Check an inventory file without contacting any host."""
    loaded = _load(inventory)
    if as_json:
        click.echo(
            json.dumps({"valid": True, "inventory": loaded.model_dump(mode="json")}, indent=2)
        )
        return
    click.echo(
        f"{inventory}: valid: cluster {loaded.cluster}, {len(loaded.nodes)} node(s), "
        f"head {loaded.head.node_name}, {loaded.accelerator}, executor "
        + (loaded.executor or f"{loaded.default_executor} (the default)")
    )


@main.command()
@INVENTORY
@JSON
@click.option(
    "--offline", is_flag=True, help="Use the GPU counts declared in the inventory; no SSH."
)
@reports_errors
def plan(inventory: Path, as_json: bool, offline: bool) -> None:
    """Print what `up` would run on every node (secrets masked)."""
    loaded = _load(inventory)
    if offline:
        cluster_plan = build_plan(loaded, declared_facts(loaded))
    else:
        cluster_plan = live_plan(loaded, ConsoleReporter(stderr_console()))
    if as_json:
        click.echo(json.dumps(cluster_plan.to_dict(), indent=2))
    else:
        click.echo(render_text(cluster_plan))


main.add_command(check)
main.add_command(up)
main.add_command(status)
main.add_command(down)
main.add_command(exec_)
main.add_command(logs)
main.add_command(exporter)

from cluster.cli.image import image  # noqa: E402
from cluster.cli.models import models  # noqa: E402
from cluster.cli.sandbox import sandbox  # noqa: E402

main.add_command(image)
main.add_command(models)
main.add_command(sandbox)
