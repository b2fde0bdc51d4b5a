"""Everything that acts on nodes: the SSH and Docker transport, the session over it, containers,
images, the lock, the clients of vLLM and the router, and sending files through the chain."""
