"""Gather what the preflight rules need beyond the probe (image IDs, model files, reachability
of the head from each worker), all hosts at once, then run every rule.

Used by the preflight step of `up` and by `vcluster check`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import paramiko

from cluster.decide.checks import (
    CheckInput,
    CheckResult,
    Status,
    check_image,
    check_model_files,
    check_model_present,
    check_runtime,
    check_workers_reach_head,
    head_port,
    run_checks,
)
from cluster.decide.inventory import Inventory, Model
from cluster.decide.listeners import (
    Listener,
    check_listeners,
    classify,
    listeners_argv,
    parse_listeners,
)
from cluster.decide.manifest import SourceError, model_items
from cluster.decide.plan import container_name
from cluster.decide.runtime import Runtime
from cluster.errors import VclusterError
from cluster.facts.host import HostFacts
from cluster.facts.image import ImageFacts
from cluster.nodes.containers import inspect_container
from cluster.nodes.images import image_id
from cluster.nodes.session import Session
from cluster.nodes.transfer import chain_nodes, check_node

REACH_TIMEOUT_S = 5.0


def preflight_results(
    inventory: Inventory,
    session: Session,
    facts: Mapping[str, HostFacts],
    *,
    cluster_running_on_head: bool,
    image_facts: ImageFacts | None = None,
    runtime: Runtime | None = None,
    probe_error: VclusterError | None = None,
) -> list[CheckResult]:
    """Every preflight result for the connected nodes; unreachable nodes FAIL the ssh rule.

    `image_facts` and `runtime`: what the image holds and the cluster it leads to, when the
    image is on a node (the `executor` rule skips otherwise)."""
    unreachable = {name: error.one_line() for name, error in session.failed.items()}
    results = run_checks(
        CheckInput(
            inventory=inventory,
            facts=facts,
            unreachable=unreachable,
            cluster_running_on_head=cluster_running_on_head,
            runtime=runtime,
        )
    )
    reachable = [n for n in facts if n in session.connections]
    ids = session.on_each(lambda n: image_id(session.docker(n), inventory.image), reachable)
    results += check_image(inventory, ids.succeeded)
    results += check_runtime(inventory, image_facts, runtime, probe_error)
    for model in inventory.model_list:
        if model.source:
            results += _model_file_results(inventory, session, model, reachable)
            continue
        present = session.on_each(
            functools.partial(_model_present, session, inventory=inventory, model=model), reachable
        )
        results += check_model_present(inventory, present.succeeded, model)
    results += _reach_head(inventory, session, facts, runtime)
    return results


def model_files(inventory: Inventory, model: Model) -> str:
    """The host path whose presence shows the model is in a node's cache."""
    name = model.name
    if name.startswith("/"):
        return str(PurePosixPath(name) / "config.json")
    # Hugging Face's cache layout: <cache>/hub/models--ORG--NAME
    return str(PurePosixPath(inventory.model_cache) / "hub" / f"models--{name.replace('/', '--')}")


def _model_file_results(
    inventory: Inventory, session: Session, model: Model, nodes: list[str]
) -> list[CheckResult]:
    """Which of the model's files each node has, verified (by size and sha256)."""
    assert model.source is not None
    try:
        items = model_items(Path(model.source).expanduser(), model.name, inventory.model_cache)
    except SourceError as error:
        return [CheckResult("model files", Status.FAIL, error.message, None, error.fix)]
    chain = chain_nodes(inventory, session, reachable_only=True)
    states = session.on_each(
        lambda name: check_node(next(n for n in chain if n.name == name), items)[0], nodes
    )
    return check_model_files(model.served, items, states.succeeded)


def _model_present(session: Session, node: str, inventory: Inventory, model: Model) -> bool:
    return session.ssh(node).run(["test", "-e", model_files(inventory, model)]).ok


def _reach_head(
    inventory: Inventory,
    session: Session,
    facts: Mapping[str, HostFacts],
    runtime: Runtime | None,
) -> list[CheckResult]:
    """From each worker's own side (its sshd opens the TCP connection), reach the head.

    The head's Ray (or rendezvous) port is tried when something listens there (the cluster is
    up); before that, the head's SSH port shows at least that the route and firewall let the
    worker through.
    """
    head = inventory.head
    port = head_port(inventory, runtime)
    head_facts = facts.get(head.node_name)
    if head_facts is None or port not in head_facts.listening_ports:
        port = (
            session.ssh(head.node_name).target.port if head.node_name in session.connections else 22
        )
        probed_port_note = " (the Ray port is not open before `up`: tested the head's SSH port)"
    else:
        probed_port_note = ""
    workers = [w.node_name for w in inventory.workers if w.node_name in session.connections]

    def attempt(name: str) -> str | None:
        try:
            channel = session.ssh(name).transport.open_channel(
                "direct-tcpip", (head.address, port), ("127.0.0.1", 0), timeout=REACH_TIMEOUT_S
            )
        except (paramiko.ChannelException, paramiko.SSHException, OSError) as exc:
            return f"connecting to {head.address}:{port} failed ({exc})"
        channel.close()
        return None

    reached = session.on_each(attempt, workers).succeeded
    if probed_port_note:
        return [
            CheckResult(
                "reach head",
                Status.PASS if error is None else Status.FAIL,
                f"{head.address}:{port} reached{probed_port_note}" if error is None else error,
                name,
                None if error is None else "check the route and firewall between the nodes",
            )
            for name, error in reached.items()
        ]
    return check_workers_reach_head(inventory, reached, runtime)


def port_results(inventory: Inventory, session: Session) -> list[CheckResult]:
    """The `ports` check on every node whose container runs: what listens, what protects it."""
    name = container_name(inventory.cluster)

    def listening(node: str) -> list[Listener] | None:
        client = session.docker(node)
        state = inspect_container(client, name)
        if state is None or not state.running:
            return None
        result = client.containers.get(name).exec_run(listeners_argv())
        found = parse_listeners(result.output.decode(errors="replace"))
        return [classify(address, port, process, inventory) for address, port, process in found]

    outcome = session.on_each(listening, list(session.connections))
    running = {node: found for node, found in outcome.succeeded.items() if found is not None}
    results = check_listeners(inventory, running)
    results += [
        CheckResult("ports", Status.SKIP, "the cluster's container does not run here", node)
        for node, found in outcome.succeeded.items()
        if found is None
    ]
    results += [
        CheckResult("ports", Status.WARN, f"could not list the ports: {error.one_line()}", node)
        for node, error in outcome.failed.items()
    ]
    return results
