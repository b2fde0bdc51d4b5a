"""`vcluster sandbox up / down / demo`: the local GPU-less cluster. Parse, call, render."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cluster.cli.common import reports_errors
from cluster.sandbox.sandbox import (
    DEFAULT_NAME,
    DEFAULT_NODES,
    MAX_NODES,
    Sandbox,
    default_workdir,
    sandbox_down,
    sandbox_up,
)

NAME = click.option(
    "--name",
    default=DEFAULT_NAME,
    show_default=True,
    help="Sandbox name: labels, network and container names.",
)
WORKDIR = click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Keys, known_hosts and the inventory [default: {default_workdir('NAME')}].",
)
NODES = click.option(
    "--nodes", type=click.IntRange(1, MAX_NODES), default=DEFAULT_NODES, show_default=True
)


def _progress(line: str) -> None:
    click.echo(line, err=True)


def _bring_up(nodes: int, workdir: Path | None, name: str) -> Sandbox:
    started = time.monotonic()
    result = sandbox_up(nodes, workdir, name, progress=_progress)
    click.echo(f"sandbox {name}: {nodes} node(s) up in {time.monotonic() - started:.0f}s")
    for node in result.nodes:
        click.echo(f"  {node.name}  {node.address}  (container {node.container})")
    click.echo(f"inventory: {result.inventory}")
    return result


@click.group()
def sandbox() -> None:
    """A local cluster of containers standing in for GPU servers (no GPU needed)."""


@sandbox.command()
@NODES
@WORKDIR
@NAME
@reports_errors
def up(nodes: int, workdir: Path | None, name: str) -> None:
    """Start the nodes, with the workload image and the tiny model on each (idempotent)."""
    _bring_up(nodes, workdir, name)


@sandbox.command()
@WORKDIR
@NAME
@reports_errors
def down(workdir: Path | None, name: str) -> None:
    """Remove the sandbox's containers, volumes and network (idempotent); keys are kept."""
    sandbox_down(name, workdir, progress=click.echo)


@sandbox.command()
@NODES
@WORKDIR
@NAME
@reports_errors
def demo(nodes: int, workdir: Path | None, name: str) -> None:
    """What `make demo` runs: build what is missing, bring the sandbox up, say what is next."""
    result = _bring_up(nodes, workdir, name)
    click.echo("")
    click.echo("next: serve the tiny model on it with")
    click.echo(f"  vcluster up {result.inventory}")
    click.echo(f"and remove it all with: vcluster sandbox down --name {name}")
