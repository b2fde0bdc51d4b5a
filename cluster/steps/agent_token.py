"""Step: with several models, the cluster's agent token exists on the controller before any
container needs it (the router uses it with every agent; the models' API servers take it as
their key). vcluster makes it; a new one restarts the cluster's containers, so all share it
(decided at Planning: cluster/decide/up/tokens.py).
"""

from __future__ import annotations

from cluster.decide.secrets import ensure_token_file
from cluster.decide.up.tokens import MakeToken
from cluster.steps.context import UpContext


def ensure_agent_token(context: UpContext) -> str:
    decided = context.require_decision().agent_token
    assert decided is not None, "the step list runs this step with several models only"
    if isinstance(decided, MakeToken):
        ensure_token_file(decided.path)
        return decided.line
    return decided.because
