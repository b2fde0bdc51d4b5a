"""`vcluster models`: each model's state; `models load` / `models unload` one by hand."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cluster.cli.common import INVENTORY, JSON, reports_errors, stderr_console
from cluster.cli.lifecycle import ConsoleReporter, one_node_session
from cluster.decide.hub import hub_models
from cluster.decide.inventory import load_inventory
from cluster.decide.manifest import models_with_source
from cluster.errors import UsageError
from cluster.nodes.lock import ClusterLock
from cluster.nodes.model_admin import load_model, models_report, unload_model
from cluster.nodes.router_client import ModelStatus
from cluster.nodes.session import Session
from cluster.nodes.transport.fanout import FanOutError
from cluster.steps.hub_models import send_hub_models
from cluster.steps.model_files import send_models


class _ListByDefault(click.Group):
    """`vcluster models INVENTORY` lists; `vcluster models load INVENTORY NAME` acts."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["list", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=_ListByDefault)
def models() -> None:
    """Several models on one endpoint: list them, load or unload one."""


@models.command(name="list")
@INVENTORY
@JSON
@reports_errors
def list_(inventory: Path, as_json: bool) -> None:
    """Each model's state, GPUs and nodes, last use, requests and activations."""
    loaded = load_inventory(inventory)
    with one_node_session(loaded, loaded.head.node_name) as session:
        report = models_report(loaded, session)
    if as_json:
        click.echo(json.dumps({"models": [asdict(m) for m in report]}, indent=2))
        return
    console = Console()
    if not console.is_terminal:
        console.width = 200  # whole cells in a log or a pipe
    console.print(models_table(report))
    for model in report:
        if model.state == "failed" or (model.failure and model.state != "loaded"):
            click.echo(f"{model.name}: {model.failure}")
        if model.wake_failure:
            click.echo(
                f"{model.name}: its last wake failed, it was started cold: {model.wake_failure}"
            )


@models.command()
@INVENTORY
@click.argument("name")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds to wait for the model to serve.",
)
@reports_errors
def load(inventory: Path, name: str, wait_s: float) -> None:
    """Load NAME now (idle models give way if its GPUs are taken)."""
    loaded = load_inventory(inventory)
    with one_node_session(loaded, loaded.head.node_name) as session:
        model = load_model(loaded, session, name, wait_s)
    click.echo(f"{model.name}: {model.state} on {model.where}")


@models.command()
@INVENTORY
@click.argument("names", nargs=-1)
@reports_errors
def pull(inventory: Path, names: tuple[str, ...]) -> None:
    """Send each model's source folder, or its download from the hub (made once), to every
    node (only the NAMES when given), once, through the nodes."""
    loaded = load_inventory(inventory)
    chosen = models_with_source(loaded, names)
    from_hub = hub_models(loaded, names)
    unknown = sorted(set(names) - {m.served for m in loaded.model_list})
    unknown += sorted(set(names) - {m.served for m in chosen + from_hub} - set(unknown))
    if unknown or not (chosen or from_hub):
        with_source = [m.served for m in models_with_source(loaded) + hub_models(loaded)]
        raise UsageError(
            f"no model {', '.join(unknown)} with a source folder or a hub download in {inventory}"
            if unknown
            else f"no model in {inventory} has a source folder or a hub download",
            fix=f"models vcluster sends: {', '.join(with_source)}"
            if with_source
            else "add source: /folder/on/this/machine to a model, or name it by its hub id "
            "(without download: nodes)",
        )
    with Session(loaded) as session:
        outcome = session.open()
        if outcome.failed:
            raise FanOutError(outcome.failed, "connecting")
        reporter = ConsoleReporter(stderr_console())
        # not while `up` or `down` changes the cluster
        with ClusterLock(session.ssh(loaded.head.node_name), loaded.cluster, "models pull"):
            lines = send_models(loaded, session, reporter, chosen)
            lines += send_hub_models(loaded, session, reporter, from_hub)
    for line in lines:
        click.echo(line)


@models.command()
@INVENTORY
@click.argument("name")
@reports_errors
def unload(inventory: Path, name: str) -> None:
    """Unload NAME now (requests in flight to it fail)."""
    loaded = load_inventory(inventory)
    with one_node_session(loaded, loaded.head.node_name) as session:
        model = unload_model(loaded, session, name)
    click.echo(f"{model.name}: {model.state}")


def models_table(report: tuple[ModelStatus, ...]) -> Table:
    table = Table(title="models")
    for column in (
        "model",
        "state",
        "TP x PP",
        "GPUs",
        "last used",
        "in flight",
        "requests",
        "activations",
        "last start",
        "host memory",
        "last wake",
    ):
        table.add_column(column, no_wrap=column in ("model", "state"))
    for model in report:
        state = model.shown_state + (" (kept)" if model.keep_loaded else "")
        table.add_row(
            model.name,
            state if model.state != "failed" else "FAILED (below)",
            f"{model.tensor_parallel} x {model.pipeline_parallel}",
            model.where,
            _ago(model.last_used),
            str(model.in_flight),
            str(model.requests),
            str(model.activations),
            "-" if model.last_activation_s is None else f"{model.last_activation_s:g} s",
            _gib(model.host_memory_bytes) if model.state == "sleeping" else "-",
            "-"
            if model.last_wake_s is None
            else f"{model.last_wake_s:g} s, {_ago(model.last_wake_at)} ({model.wakes} wake(s))",
        )
    return table


def _gib(size: int | None) -> str:
    return "-" if size is None else f"{size / 1024**3:.1f} GiB"


def _ago(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    seconds = int(dt.datetime.now(dt.UTC).timestamp() - epoch)
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"
