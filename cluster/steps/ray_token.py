"""Step: the cluster's Ray token exists on the controller before any container needs it.

Every Ray process of the cluster requires it (`RAY_AUTH_MODE=token`), so Ray runs nothing for
a client that lacks it. vcluster makes one per cluster unless the inventory gives one; whether
it makes one, and whether the containers then restart, was decided at Planning
(cluster/decide/up/tokens.py).
"""

from __future__ import annotations

from cluster.decide.secrets import ensure_token_file
from cluster.decide.up.tokens import MakeToken
from cluster.steps.context import UpContext


def ensure_ray_token(context: UpContext) -> str:
    decided = context.require_decision().ray_token
    assert decided is not None, "the step list runs this step on a Ray cluster only"
    if not context.inventory.ray_token_is_generated:
        context.inventory.ray_token.resolve()  # a missing or empty secret stops here, with its fix
    if isinstance(decided, MakeToken):
        ensure_token_file(decided.path)
        return decided.line
    return decided.because
