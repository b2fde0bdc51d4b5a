"""Several models behind one endpoint: the router on the head, an agent on every node.

Everything in this package runs inside the vcluster containers (`cluster/remote/serving/bundle.py`
ships it as one zip), so it imports the standard library and aiohttp (every vLLM image has
it: vLLM depends on it) and nothing else of vcluster outside this package.
"""
