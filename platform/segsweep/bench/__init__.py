"""``segsweep bench``: what the platform costs against a bare PyTorch loop. A developer tool,
outside the runtime import chain (the CLI imports it only for ``segsweep bench``).

Modules: ``suite`` (``run_bench`` and the step, data and FLOPs rows), ``measure`` (timed runs),
``tracked`` (tracking's cost), ``gpu`` (GPU rows, packing), ``layers`` (the sweep and curve
rows), ``report`` (rows, the table, the JSON report).
"""
