"""Several models on one endpoint, on the sandbox: real router and agents; tiny-a and `broken`
are real vLLM (CPU), tiny-b is the stand-in vLLM (tests/support/standin_node.py: what is under
test with it is the router's and agents' state machine, not vLLM). The image is the one without
Ray (as vLLM's own images are from vLLM 0.19.1 on): several models need no Ray cluster, each
runs in vLLM's own multi-node mode, so tiny-a is real vLLM serving from an image without Ray.

Two tiny models (tiny-a, tiny-b) each span both nodes (pipeline parallel 2) and so cannot be
loaded together; `broken` has a bad argument and fits beside one of them (the head has two
device slots). The tests run in order, as one story: each model is loaded on demand.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml

from cluster.decide.inventory import Inventory, load_inventory
from cluster.sandbox.images import WORKLOAD_IMAGE_WITHOUT_RAY
from tests.support.cli import UP_TIMEOUT_S, vcluster
from tests.support.images import put_on_nodes
from tests.support.routed import MODEL_B, tiny, write_routed_inventory
from tests.support.standin_node import install_standin, standin_model, with_standin_path

pytestmark = [pytest.mark.e2e, pytest.mark.stage("routed")]

IDLE_UNLOAD_S = 20
"""tiny-b's idle time: the two tests after its load must see it loaded still."""
LOAD_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def inventory(
    sandbox_inventory: Path, sandbox_cluster, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    target = tmp_path_factory.mktemp("routed") / "models.yaml"
    models = [
        tiny("tiny-a"),
        standin_model(tiny("tiny-b", MODEL_B, unload_after_s=IDLE_UNLOAD_S)),
        tiny("broken", MODEL_B, "--no-such-flag", pipeline_parallel=1),
    ]
    install_standin(sandbox_inventory)
    put_on_nodes(sandbox_inventory, WORKLOAD_IMAGE_WITHOUT_RAY)
    write_routed_inventory(sandbox_inventory, target, models, image=WORKLOAD_IMAGE_WITHOUT_RAY)
    target.write_text(yaml.safe_dump(with_standin_path(yaml.safe_load(target.read_text()))))
    # Another module's cluster may run with one model: its containers are replaced.
    sandbox_cluster.changed()
    up = vcluster("up", "--recreate", str(target), timeout=UP_TIMEOUT_S)
    assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
    return target


@pytest.fixture(scope="module")
def loaded(inventory: Path) -> Inventory:
    return load_inventory(inventory)


@pytest.fixture(scope="module")
def client(loaded: Inventory) -> openai.OpenAI:
    assert loaded.secrets.api_key is not None
    return openai.OpenAI(
        base_url=f"http://{loaded.head.address}:{loaded.ports.vllm}/v1",
        api_key=loaded.secrets.api_key.resolve(),
        timeout=LOAD_TIMEOUT_S,
        max_retries=0,
    )


def states(inventory: Path) -> dict[str, dict]:
    result = vcluster("models", str(inventory), "--json")
    assert result.returncode == 0, result.stderr
    return {m["name"]: m for m in json.loads(result.stdout)["models"]}


def ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    return reply.model


def test_up_loads_nothing_and_every_model_is_listed_unloaded(inventory, client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["tiny-a", "tiny-b", "broken"]
    assert {m.id: m.model_extra["vcluster"]["state"] for m in listed.data} == dict.fromkeys(
        ["tiny-a", "tiny-b", "broken"], "unloaded"
    )


def test_a_wrong_key_gets_401(loaded):
    wrong = openai.OpenAI(
        base_url=f"http://{loaded.head.address}:{loaded.ports.vllm}/v1", api_key="wrong"
    )
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "x"}])


def test_an_unknown_model_gets_404_listing_the_known_ones(client):
    with pytest.raises(openai.NotFoundError) as error:
        ask(client, "no-such-model")
    assert "known: tiny-a, tiny-b, broken" in str(error.value)


def test_a_request_for_an_unloaded_model_loads_it_and_is_served(inventory, client):
    assert ask(client, "tiny-a") == "tiny-a"
    model = states(inventory)["tiny-a"]
    assert model["state"] == "loaded"
    assert model["activations"] == 1
    assert [node for node, _ in model["placement"]] == ["node-1", "node-2"]


def test_streaming_chat_passes_through_the_endpoint(client):
    stream = client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "Hello"}], max_tokens=16, stream=True
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    assert len(chunks) > 2
    assert chunks[-1].choices[0].finish_reason is not None


def test_a_model_with_bad_args_fails_its_requests_with_its_cause_and_the_other_serves(
    inventory, client
):
    with pytest.raises(openai.APIStatusError) as error:
        ask(client, "broken")
    assert error.value.status_code == 502
    assert "unrecognized arguments: --no-such-flag" in str(error.value)
    assert "a bad vllm serve argument" in str(error.value)
    assert ask(client, "tiny-a") == "tiny-a"
    now = states(inventory)
    assert now["broken"]["state"] == "failed"
    assert now["tiny-a"]["state"] == "loaded"
    assert now["tiny-a"]["activations"] == 1  # it was never unloaded


def test_five_concurrent_requests_for_an_unloaded_model_cause_one_activation(inventory, client):
    answers: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            answers.append(ask(client, "tiny-b"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert answers == ["tiny-b"] * 5
    now = states(inventory)
    assert now["tiny-b"]["activations"] == 1
    assert now["tiny-b"]["requests"] == 5
    # tiny-b spans both nodes: tiny-a, idle, gave way.
    assert now["tiny-a"]["state"] == "unloaded"


def test_models_shows_each_state_in_a_table(inventory):
    result = vcluster("models", str(inventory))
    assert result.returncode == 0, result.stderr
    for expected in ("tiny-a", "unloaded", "tiny-b", "loaded", "broken", "FAILED"):
        assert expected in result.stdout
    assert "unrecognized arguments" in result.stdout  # the failure, under the table


def test_status_shows_every_model(inventory):
    result = vcluster("status", str(inventory), "--json")
    document = json.loads(result.stdout)
    assert {m["name"]: m["state"] for m in document["models"]}["tiny-b"] == "loaded"


def test_an_idle_model_is_unloaded_after_its_time(inventory):
    deadline = time.monotonic() + IDLE_UNLOAD_S + 60
    while states(inventory)["tiny-b"]["state"] != "unloaded":
        assert time.monotonic() < deadline, "tiny-b was not unloaded"
        time.sleep(2)
    processes = vcluster("exec", str(inventory), "--node", "node-2", "--", "ps", "-eo", "args")
    assert "tiny-llama-b" not in processes.stdout  # every rank's process is gone


def test_models_load_and_unload_by_hand(inventory):
    loaded = vcluster("models", "load", str(inventory), "tiny-b", timeout=LOAD_TIMEOUT_S)
    assert loaded.returncode == 0, loaded.stderr
    assert "tiny-b: loaded" in loaded.stdout
    unloaded = vcluster("models", "unload", str(inventory), "tiny-b")
    assert unloaded.returncode == 0, unloaded.stderr
    assert states(inventory)["tiny-b"]["state"] == "unloaded"


def test_loading_an_unknown_model_by_hand_names_the_known_ones(inventory):
    result = vcluster("models", "load", str(inventory), "nope")
    assert result.returncode != 0
    assert "use one of: tiny-a, tiny-b, broken" in result.stderr
    assert "Traceback" not in result.stderr
