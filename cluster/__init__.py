"""vcluster: one vLLM endpoint from GPU servers reachable over SSH."""

__version__ = "0.1.0"
