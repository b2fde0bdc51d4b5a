"""`vcluster image build`: the Ray-ready image of the inventory's image, on every node."""

from __future__ import annotations

from pathlib import Path

import click

from cluster.cli.common import INVENTORY, reports_errors, stderr_console
from cluster.cli.lifecycle import ConsoleReporter
from cluster.decide.inventory import load_inventory
from cluster.steps.ray_image import build_ray_image


@click.group()
def image() -> None:
    """The workload image: a Ray-ready one derived from the inventory's."""


@image.command()
@INVENTORY
@reports_errors
def build(inventory: Path) -> None:
    """Derive the Ray-ready image (the inventory's image plus the Ray that matches it), build it
    once on the head and put it on every node."""
    loaded = load_inventory(inventory)
    tag = build_ray_image(loaded, ConsoleReporter(stderr_console()))
    if tag == loaded.image:
        click.echo(f"{tag} has Ray already: nothing to build")
        return
    click.echo(f"image: {tag} on every node")
    click.echo(f"to use it by name from now on, set in {inventory}:  image: {tag}")
