"""Internals of ``flare.FlareModel`` (one concept per file).

config -> targets (what to wrap) -> projection / trainable_copy (the wrapped modules)
-> context (two-stream layout, checkpoint replay) -> backbone (batching hooks) -> inputs
(checks, alignment) -> generation, merge, two_pass (the spec)
"""
