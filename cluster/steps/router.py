"""Steps with several models: the router's and agents' files in the containers, and waiting
until the router serves and every model kept loaded is loaded."""

from __future__ import annotations

import io
import tarfile
import time
from typing import Any

from cluster.decide.model_plan import SERVING_CONFIG_NAME
from cluster.errors import VclusterError
from cluster.nodes.router_client import call_router, router_path
from cluster.nodes.vllm import http_get
from cluster.remote.serving.bundle import BUNDLE_NAME, bundle_bytes
from cluster.remote.serving.catalog import ServingConfig
from cluster.steps.base import wait_until
from cluster.steps.context import UpContext

POLL_INTERVAL_S = 2.0


class RouterFailed(VclusterError):
    """The router did not serve, or a model kept loaded did not load."""


def put_serving_files(container: Any, serving: ServingConfig) -> None:
    """The serving bundle and its configuration, into the container's state folder."""
    files = {BUNDLE_NAME: bundle_bytes(), SERVING_CONFIG_NAME: serving.to_json().encode()}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    container.exec_run(["mkdir", "-p", serving.state_dir])
    if not container.put_archive(serving.state_dir, archive.getvalue()):
        raise RouterFailed(f"could not write {BUNDLE_NAME} into {container.name}")


def wait_for_router(context: UpContext) -> str:
    """Until the router answers and the models kept loaded serve (their failure stops `up`)."""
    plan = context.require_plan()
    serving = plan.serving
    assert serving is not None
    head = plan.head
    container = context.session.docker(head.name).containers.get(head.container.name)
    state_dir = head.container.supervisor.state_dir

    def router_missing() -> str | None:
        try:
            reply = http_get(
                context.session.ssh(head.name), head.facts.address, serving.port, "/health"
            )
        except OSError:
            return "the router is not listening yet"
        return None if reply.status == 200 else f"/health answers {reply.status}"

    timeout_s = context.options.ready_timeout_s
    still = wait_until(
        router_missing,
        timeout_s=min(timeout_s, 120.0),
        interval_s=POLL_INTERVAL_S,
        reporter=context.reporter,
        waiting_for="the router",
    )
    if still is not None:
        raise RouterFailed(
            f"the router did not answer ({still})",
            where=head.name,
            fix="read `vcluster logs --component vllm` on the head (the router logs there)",
        )
    kept = [m.served for m in serving.models if m.keep_loaded]
    for served in kept:
        call_router(container, state_dir, "POST", router_path("load", model=served, wait=0))

    def models_missing() -> str | None:
        reply = call_router(container, state_dir, "GET", router_path("models"))
        if reply.status != 200:
            return f"the router answers {reply.status}: {reply.message}"
        states = {m["name"]: m for m in reply.data["models"]}
        for served in kept:
            if states[served]["state"] == "failed":
                raise RouterFailed(
                    f"model {served!r} (keep_loaded) failed to start: {states[served]['failure']}",
                    where=head.name,
                    fix="fix the model's entry in models:, then run `vcluster up` again",
                )
        loading = [s for s in kept if states[s]["state"] != "loaded"]
        return f"loading {', '.join(loading)}" if loading else None

    still = wait_until(
        models_missing,
        timeout_s=timeout_s,
        interval_s=POLL_INTERVAL_S,
        reporter=context.reporter,
        waiting_for="the models kept loaded",
    )
    if still is not None:
        raise RouterFailed(
            f"the models kept loaded did not serve within {timeout_s:g}s ({still})",
            where=head.name,
            fix="large models take long: raise --wait; see `vcluster models` and the model logs",
        )
    on_demand = [m.served for m in serving.models if not m.keep_loaded]
    return (
        f"router serves {len(serving.models)} model(s) at {plan.endpoint}: loaded "
        f"{', '.join(kept) or 'none'}; on demand {', '.join(on_demand) or 'none'}"
    )
