"""The `vcluster` command line: parse options, call one function, render. No logic here."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cluster import __version__
from cluster.cli.common import INVENTORY, JSON, reports_errors
from cluster.errors import NotYetAvailable
from cluster.inventory import Inventory, load_inventory
from cluster.plan import build_plan, declared_facts, render_text


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
        f"head {loaded.head.node_name}, {loaded.accelerator}, executor {loaded.executor}"
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
    if not offline:
        raise NotYetAvailable(
            "planning from live host facts comes with `vcluster up` (not yet available)",
            fix="use `vcluster plan --offline` with gpus: declared on each node",
        )
    cluster_plan = build_plan(loaded, declared_facts(loaded))
    if as_json:
        click.echo(json.dumps(cluster_plan.to_dict(), indent=2))
    else:
        click.echo(render_text(cluster_plan))


def _not_yet(name: str, issue: str) -> Callable[..., None]:
    @reports_errors
    def command(**_: Any) -> None:
        raise NotYetAvailable(f"`vcluster {name}` is not yet available ({issue})")

    return command


for _name, _help in [
    ("up", "Bring the cluster up and serve the model."),
    ("status", "Show GPU, Ray and vLLM health of every node."),
    ("down", "Stop vLLM, Ray and the containers on every node."),
]:
    main.command(name=_name, help=_help)(INVENTORY(JSON(_not_yet(_name, "lifecycle issue"))))

main.command(name="exec", help="Run a command or a shell in a node's container.")(
    INVENTORY(
        click.option("--node")(
            click.argument("command", nargs=-1)(_not_yet("exec", "lifecycle issue"))
        )
    )
)
main.command(name="logs", help="Show vLLM, Ray or container logs.")(
    INVENTORY(click.option("--node")(_not_yet("logs", "lifecycle issue")))
)
