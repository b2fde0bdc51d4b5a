"""What each step of `up` will do, decided from facts and the plan (pure).

Each decision takes what the step's apply half (or the Planning step) read from the nodes and
returns the actions the step will take, or `Unchanged` with the reason, which is the step's
status line. The steps in cluster/steps/ gather the facts, call these, and do exactly what was
decided.
"""
