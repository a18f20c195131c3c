"""Reports: what the runs of an MLflow store answer.

Modules: ``curve`` (label-ratio curves, paired differences, the plot), ``published`` (the
published tables the curves are set beside), ``answer`` (the curve published to the sweep's
parent run and a saved MLflow view), ``dashboard`` (``segsweep dashboard``, its page in
``web/``).
"""
