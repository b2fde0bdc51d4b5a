"""`vcluster up / status / down / exec / logs`: parse options, call the lifecycle, render."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click
from prometheus_client import CollectorRegistry, start_http_server
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.status import Status
from rich.text import Text

from cluster.cli.common import INVENTORY, JSON, reports_errors, stderr_console
from cluster.cli.tables import figures_table, results_table, status_view
from cluster.decide.checks import exit_code as checks_exit_code
from cluster.decide.checks import results_as_dicts
from cluster.decide.inventory import Inventory, load_inventory
from cluster.decide.node_commands import COMPONENTS, Component, exec_argv, logs_argv
from cluster.decide.plan import container_name
from cluster.errors import ExitCode, UsageError
from cluster.nodes.containers import inspect_container
from cluster.nodes.session import Session
from cluster.nodes.transport.fanout import FanOutError
from cluster.nodes.transport.terminal import interact, stream, terminal_size
from cluster.report.exporter import (
    DEFAULT_ADDRESS,
    DEFAULT_INTERVAL_S,
    DEFAULT_PORT,
    ClusterCollector,
)
from cluster.report.status import gather_status
from cluster.steps.context import DEFAULT_RAY_TIMEOUT_S, DEFAULT_READY_TIMEOUT_S, UpOptions
from cluster.steps.down import down as run_down
from cluster.steps.up import gather_checks
from cluster.steps.up import up as run_up


class ConsoleReporter:
    """Step status lines on stderr: a live line while a step runs, then its outcome."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._status: Status | None = None
        self.live = console.is_terminal and not console.is_dumb_terminal

    def start(self, title: str) -> None:
        self._status = self._console.status(title)
        self._status.start()

    def progress(self, text: str) -> None:
        if self._status is not None:
            self._status.update(escape(text))

    def finish(self, title: str, ok: bool, detail: str, duration_s: float) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        suffix = f": {escape(detail)}" if detail else ""
        self._console.print(f"{mark} {title}{suffix} [dim]({duration_s:.1f}s)[/]", highlight=False)

    def note(self, text: str) -> None:
        self._console.print(escape(text), highlight=False)


def _node_name(inventory: Inventory, node: str | None) -> str:
    names = [n.node_name for n in inventory.nodes]
    if node is None:
        return inventory.head.node_name
    if node not in names:
        raise UsageError(f"no node named {node!r}", fix=f"use one of: {', '.join(names)}")
    return node


@click.command()
@INVENTORY
@click.option("--recreate", is_flag=True, help="Replace containers whose spec changed.")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=1),
    default=DEFAULT_READY_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for vLLM to serve (large models load for minutes).",
)
@click.option(
    "--ray-wait",
    "ray_wait_s",
    type=click.FloatRange(min=1),
    default=DEFAULT_RAY_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for every node to join Ray.",
)
@click.option(
    "--ray-image/--no-ray-image",
    "ray_image",
    default=True,
    show_default=True,
    help="Derive a Ray-ready image when the inventory's image has no Ray "
    "(without it: vLLM's own multi-node mode).",
)
@reports_errors
def up(inventory: Path, recreate: bool, wait_s: float, ray_wait_s: float, ray_image: bool) -> None:
    """Bring the cluster up and serve the model (repairs what is missing; idempotent)."""
    loaded = load_inventory(inventory)
    started = time.monotonic()
    options = UpOptions(
        recreate=recreate,
        ray_timeout_s=ray_wait_s,
        ready_timeout_s=wait_s,
        derive_ray_image=ray_image,
    )
    result = run_up(loaded, ConsoleReporter(stderr_console()), options)
    took = time.monotonic() - started
    if result.changes:
        click.echo(f"changed: {'; '.join(result.changes)} ({took:.1f}s)")
    else:
        click.echo(f"already up, nothing changed ({took:.1f}s)")
    click.echo(f"endpoint: {result.endpoint}")
    click.echo(f"model:    {result.served_model_name}")
    click.echo(f"try:      {curl_line(loaded, result.endpoint, result.served_model_name)}")


def curl_line(inventory: Inventory, endpoint: str, model: str) -> str:
    """A ready-to-paste chat request; the API key is read from where the inventory keeps it."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}]})
    parts = ["curl", shlex.quote(f"{endpoint}/chat/completions")]
    parts += ["-H", shlex.quote("Content-Type: application/json")]
    key = inventory.secrets.api_key
    if key is not None:
        value = f"${key.name}" if key.source == "env" else f"$(cat {shlex.quote(key.name)})"
        parts += ["-H", f'"Authorization: Bearer {value}"']
    return " ".join([*parts, "-d", shlex.quote(body)])


@click.command()
@INVENTORY
@JSON
@click.option(
    "--watch",
    "watch_s",
    type=click.FloatRange(min=1),
    help="Refresh in place every N seconds (Ctrl-C stops).",
)
@reports_errors
def status(inventory: Path, as_json: bool, watch_s: float | None) -> None:
    """Show SSH, container, GPU, Ray and vLLM health of every node (exit 3 when unhealthy)."""
    loaded = load_inventory(inventory)
    if watch_s is not None and not as_json:
        _watch(loaded, watch_s)
        return
    with Session(loaded) as session:
        snapshot = gather_status(loaded, session)
    if as_json:
        click.echo(json.dumps(snapshot.to_dict(), indent=2))
    else:
        console = Console(width=None if sys.stdout.isatty() else 140)
        for part in status_view(snapshot):
            console.print(escape(part) if isinstance(part, str) else part, highlight=False)
    if not snapshot.healthy:
        sys.exit(int(ExitCode.UNHEALTHY))


def _watch(inventory: Inventory, interval_s: float) -> None:
    """Redraw the status every interval until Ctrl-C."""
    with Live(Text("gathering ..."), auto_refresh=False) as live:
        try:
            while True:
                started = time.monotonic()
                with Session(inventory) as session:
                    snapshot = gather_status(inventory, session)
                taken = time.strftime("%H:%M:%S")
                parts = [
                    *status_view(snapshot),
                    f"(at {taken}, every {interval_s:g}s; Ctrl-C stops)",
                ]
                live.update(Group(*parts), refresh=True)
                time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass


@click.command()
@INVENTORY
@JSON
@click.option(
    "--collective",
    is_flag=True,
    help="Also all-reduce across every GPU (or node) in the cluster's running containers.",
)
@click.option(
    "--max-size",
    "max_size_mib",
    type=click.IntRange(1, 16384),
    default=None,
    help="The collective check's largest all-reduce in MiB (default: collective.max_size_mib).",
)
@reports_errors
def check(inventory: Path, as_json: bool, collective: bool, max_size_mib: int | None) -> None:
    """Run the preflight checks on every node, changing nothing (exit 1 on any FAIL)."""
    loaded = load_inventory(inventory)
    if max_size_mib is not None:
        settings = loaded.collective.model_copy(update={"max_size_mib": max_size_mib})
        loaded = loaded.model_copy(update={"collective": settings})
    report = gather_checks(loaded, ConsoleReporter(stderr_console()), collective=collective)
    results = report.results
    if as_json:
        click.echo(json.dumps(results_as_dicts(results), indent=2))
    else:
        console = Console(width=None if sys.stdout.isatty() else 160)
        if report.collective is not None and report.collective.run.measurements:
            console.print(figures_table(report.collective.run))
        console.print(results_table(results))
    sys.exit(checks_exit_code(results))


@click.command()
@INVENTORY
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--address",
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="Address to listen on (the metrics have no authentication: 0.0.0.0 is everyone's).",
)
@click.option(
    "--interval",
    "interval_s",
    type=click.FloatRange(min=1),
    default=DEFAULT_INTERVAL_S,
    show_default=True,
    help="Seconds between refreshes.",
)
@reports_errors
def exporter(inventory: Path, port: int, address: str, interval_s: float) -> None:
    """Serve Prometheus metrics of the cluster (nodes, GPUs, Ray, vLLM) on PORT."""
    loaded = load_inventory(inventory)
    collector = ClusterCollector(loaded, interval_s)
    registry = CollectorRegistry()
    registry.register(collector)
    collector.refresh()
    start_http_server(port, addr=address, registry=registry)
    click.echo(f"serving metrics of {loaded.cluster} on http://{address}:{port}/metrics", err=True)
    collector.run_forever()


@click.command()
@INVENTORY
@click.option("--remove-images", is_flag=True, help="Also remove the image from every node.")
@reports_errors
def down(inventory: Path, remove_images: bool) -> None:
    """Stop vLLM, Ray and the containers on every node (keeps the model cache and images)."""
    loaded = load_inventory(inventory)
    run_down(loaded, ConsoleReporter(stderr_console()), remove_images=remove_images)
    click.echo(f"cluster {loaded.cluster} is down")


def one_node_session(loaded: Inventory, node: str) -> Session:
    session = Session(loaded)
    outcome = session.open([n for n in loaded.nodes if n.node_name == node])
    if outcome.failed:
        session.close()
        raise FanOutError(outcome.failed, "connecting")
    return session


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@INVENTORY
@click.option("--node", help="The node's name (default: the head).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@reports_errors
def exec_(inventory: Path, node: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND in a node's container, or open a shell there without one."""
    loaded = load_inventory(inventory)
    name = _node_name(loaded, node)
    argv = exec_argv(container_name(loaded.cluster), list(command))
    with one_node_session(loaded, name) as session:
        ssh = session.ssh(name)
        if command:
            code = stream(ssh.open_channel(argv), sys.stdout.buffer, sys.stderr.buffer)
        else:
            width, height = terminal_size()
            code = interact(ssh.interactive_channel(argv, term="xterm", width=width, height=height))
    sys.exit(code)


@click.command()
@INVENTORY
@click.option("--node", help="The node's name (default: the head).")
@click.option("--component", type=click.Choice(COMPONENTS), default="vllm", show_default=True)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
@click.option("--tail", "-n", type=click.IntRange(min=1), default=100, show_default=True)
@reports_errors
def logs(inventory: Path, node: str | None, component: Component, follow: bool, tail: int) -> None:
    """Show vLLM's, Ray's or the container's log on a node."""
    loaded = load_inventory(inventory)
    name = _node_name(loaded, node)
    container = container_name(loaded.cluster)
    argv = logs_argv(container, component, tail=tail, follow=follow)
    with one_node_session(loaded, name) as session:
        state = inspect_container(session.docker(name), container)
        if component == "ray" and state is not None and not state.ray:
            raise UsageError(
                f"{container} on {name} runs no Ray (vLLM's own multi-node mode): no Ray logs",
                fix="use --component vllm or --component container",
            )
        code = stream(session.ssh(name).open_channel(argv), sys.stdout.buffer, sys.stderr.buffer)
    sys.exit(code)
