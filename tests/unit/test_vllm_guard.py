"""The guard vLLM loads for a model with sleep mode, and the users' endpoint: vLLM's
development routes answer the node's own agent with its token, and nobody through the router."""

from __future__ import annotations

import pytest

from cluster.remote.serving.routes import is_openai_route
from cluster.remote.serving.vllm_guard import refusal

KEY = "agent-t0ken"
NODE = "10.0.0.12"
DEV_ROUTES = ["/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache"]


@pytest.mark.parametrize("path", [*DEV_ROUTES, "/invocations", "/tokenize", "/"])
def test_the_nodes_own_agent_with_the_token_reaches_every_route(path):
    assert refusal(path, NODE, NODE, f"Bearer {KEY}", KEY) is None
    assert refusal(path, "127.0.0.1", "127.0.0.1", f"Bearer {KEY}", KEY) is None  # on the head


@pytest.mark.parametrize("path", [*DEV_ROUTES, "/invocations"])
def test_another_node_is_refused_even_with_the_token(path):
    assert "own agent only" in refusal(path, "10.0.0.11", NODE, f"Bearer {KEY}", KEY)
    assert "own agent only" in refusal(path, "127.0.0.1", NODE, f"Bearer {KEY}", KEY)
    assert "own agent only" in refusal(path, None, NODE, f"Bearer {KEY}", KEY)


@pytest.mark.parametrize("header", ["", KEY, f"Bearer {KEY}x", f"Basic {KEY}", "Bearer \udcff"])
def test_without_the_token_the_routes_are_refused_even_from_the_node(header):
    assert "agent token" in refusal("/sleep", NODE, NODE, header, KEY)


def test_without_a_key_in_its_environment_nothing_but_the_open_routes_passes():
    assert refusal("/sleep", NODE, NODE, "Bearer ", "") is not None


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/health", "/metrics"])
def test_the_openai_routes_and_the_probes_pass_as_vllm_serves_them(path):
    # vLLM checks its key under /v1 itself; health and load are read without it
    assert refusal(path, "10.0.0.1", NODE, "", KEY) is None


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/sleep", "/wake_up", "/is_sleeping", "/collective_rpc"])
def test_the_users_endpoint_passes_no_development_route(method, path):
    assert not is_openai_route(method, path)
