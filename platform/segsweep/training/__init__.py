"""Training: one run, from a validated config to a closed MLflow run.

Modules: ``loop`` (``Trainer``: the training loop, stage by stage), ``evaluation`` (mIoU,
sliding windows, pseudo-mask quality, sample panels), ``checkpoints`` (what a run saves and
resumes from), ``devices`` (CPUs, GPUs, numerics, seeds), ``budget`` (epochs into steps),
``runner`` (``prepare`` and ``execute``: every check before the MLflow run, every way out of
it), ``one_run`` (``segsweep run``), ``panels`` (image tiles), ``probe`` (a linear probe of
frozen features).
"""
