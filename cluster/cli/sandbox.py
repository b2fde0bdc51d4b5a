"""`vcluster sandbox up / down / demo`: the local GPU-less cluster."""

from __future__ import annotations

import time
from pathlib import Path

import click

from cluster.cli.common import reports_errors
from cluster.sandbox.sandbox import DEFAULT_NAME, DEFAULT_NODES, MAX_NODES, sandbox_down, sandbox_up

NAME = click.option(
    "--name", default=DEFAULT_NAME, show_default=True, help="Sandbox name (labels, network)."
)
WORKDIR = click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where keys and the inventory go [default: ./.work/NAME].",
)


def _progress(line: str) -> None:
    click.echo(line, err=True)


@click.group()
def sandbox() -> None:
    """A local cluster of containers standing in for GPU servers (no GPU needed)."""


@sandbox.command()
@click.option(
    "--nodes",
    type=click.IntRange(1, MAX_NODES),
    default=DEFAULT_NODES,
    show_default=True,
)
@WORKDIR
@NAME
@reports_errors
def up(nodes: int, workdir: Path | None, name: str) -> None:
    """Start the sandbox's nodes, with the workload image and the tiny model on each."""
    started = time.monotonic()
    result = sandbox_up(nodes, workdir, name, progress=_progress)
    click.echo(f"sandbox {name}: {nodes} node(s) up in {time.monotonic() - started:.0f}s")
    for node in result.nodes:
        click.echo(f"  {node.name}  {node.address}")
    click.echo(f"inventory: {result.inventory}")


@sandbox.command()
@NAME
@reports_errors
def down(name: str) -> None:
    """Remove the sandbox's containers, volumes and network (idempotent)."""
    sandbox_down(name, progress=click.echo)


@sandbox.command()
@WORKDIR
@NAME
@reports_errors
def demo(workdir: Path | None, name: str) -> None:
    """What `make demo` runs: the sandbox, then the cluster on it, then a chat completion."""
    result = sandbox_up(DEFAULT_NODES, workdir, name, progress=_progress)
    click.echo(f"sandbox up; inventory: {result.inventory}")
    click.echo(f"next: vcluster up {result.inventory}")
