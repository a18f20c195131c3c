"""The sweep: its spec, the driver, resume state, Ray Tune and Optuna at the edges.

* ``spec``: the sweep spec and its plan (cells, search spaces); no Ray, no Optuna.
* ``trial``: the typed order each trial is handed (cell, phase, seed, searched values) and
  the trial's body in a worker.
* ``driver``: ``run_sweep``, the search then the final phase.
* ``state``: ``sweep.json`` and what ``--resume`` makes of it.
* ``ray_tune``: the only module that imports Ray (searcher, scheduler, callback, tuners).
* ``studies``: the only module that imports Optuna (a study per cell, ``CellSearch``).
* ``live``, ``summary``: what a sweep prints while it runs and when it ends.
* ``reconcile``: the driver's word on its trials' MLflow runs.
* ``interrupt``: Ctrl+C and SIGTERM.  ``dry_run``: ``--dry-run``.  ``costs``: GPU costs.
"""
