"""What vcluster decides, as pure functions of data: the inventory, the plan, the checks' rules,
the runtime, the traps of the versions users run. Nothing here reaches a node or the network."""
