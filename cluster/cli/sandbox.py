"""`vcluster sandbox up / down / demo`: the local GPU-less cluster. Parse, call, render."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import click

from cluster.cli.common import reports_errors, stderr_console
from cluster.cli.lifecycle import ConsoleReporter, curl_line
from cluster.cli.live import progress_output
from cluster.decide.inventory import Inventory, load_inventory
from cluster.errors import VclusterError
from cluster.sandbox import storage
from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.images import build_images
from cluster.sandbox.model import ensure_tiny_model
from cluster.sandbox.sandbox import (
    DEFAULT_NAME,
    DEFAULT_NODES,
    MAX_NODES,
    Sandbox,
    default_workdir,
    sandbox_down,
    sandbox_up,
)
from cluster.steps.down import down as run_down
from cluster.steps.up import up as run_up

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
NODE_STORAGE = click.option(
    "--node-storage",
    type=click.Choice(storage.CHOICES),
    default=storage.AUTO,
    show_default=True,
    help="Where nodes keep their Docker data: memory (tmpfs, faster) or disk (volumes); auto "
    f"picks memory when it fits in {storage.MEMORY_SHARE:.0%} of this machine's memory.",
)


def _bring_up(nodes: int, workdir: Path | None, name: str, node_storage: str) -> Sandbox:
    started = time.monotonic()
    result = sandbox_up(nodes, workdir, name, progress=progress_output(), node_storage=node_storage)
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
@NODE_STORAGE
@reports_errors
def up(nodes: int, workdir: Path | None, name: str, node_storage: str) -> None:
    """Start the nodes, with the workload image and the tiny model on each (idempotent)."""
    _bring_up(nodes, workdir, name, node_storage)


@sandbox.command()
@WORKDIR
@NAME
@reports_errors
def down(workdir: Path | None, name: str) -> None:
    """Remove the sandbox's containers, volumes and network (idempotent); keys are kept."""
    sandbox_down(name, workdir, progress=click.echo)


@sandbox.command()
@reports_errors
def build() -> None:
    """Build (or find cached) the sandbox's images and tiny model; no node is started."""
    local = ensure_local_docker()
    progress = progress_output()
    for record in build_images(progress=progress, docker=local):
        click.echo(f"{record.image}: {record.action} ({record.image_id[:19]})")
    click.echo(f"model: {ensure_tiny_model(docker=local, progress=progress)}")


@sandbox.command()
@NODES
@WORKDIR
@NAME
@NODE_STORAGE
@click.option(
    "--keep/--no-keep", default=True, show_default=True, help="Leave the cluster serving."
)
@reports_errors
def demo(nodes: int, workdir: Path | None, name: str, node_storage: str, keep: bool) -> None:
    """What `make demo` runs: the sandbox, `vcluster up` on it, and one chat completion."""
    result = _bring_up(nodes, workdir, name, node_storage)
    inventory = load_inventory(result.inventory)
    served = run_up(inventory, ConsoleReporter(stderr_console()))
    reply = chat_once(inventory, served.endpoint, served.served_model_name)
    click.echo(f"endpoint: {served.endpoint}  model: {served.served_model_name}")
    click.echo(f"asked: {DEMO_PROMPT!r}")
    click.echo(f"answer (a tiny model with random weights: expect gibberish): {reply!r}")
    click.echo(f"try:   {curl_line(inventory, served.endpoint, served.served_model_name)}")
    click.echo(f"then:  vcluster status {result.inventory}")
    if not keep:
        run_down(inventory, ConsoleReporter(stderr_console()))
    click.echo(
        f"remove it all: vcluster down {result.inventory} && vcluster sandbox down --name {name}"
    )


DEMO_PROMPT = "Say hello to the cluster."


def chat_once(inventory: Inventory, endpoint: str, model: str) -> str:
    """One chat completion from the endpoint, as any OpenAI client would ask it."""
    key = inventory.secrets.api_key.resolve() if inventory.secrets.api_key else None
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": DEMO_PROMPT}], "max_tokens": 16}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{endpoint}/chat/completions", body, headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            answer = json.loads(response.read())
    except OSError as exc:
        raise VclusterError(
            f"the chat completion failed: {exc}",
            where=endpoint,
            fix=f"vcluster status {inventory.source} and vcluster logs {inventory.source}",
        ) from None
    return answer["choices"][0]["message"]["content"]
