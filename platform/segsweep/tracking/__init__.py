"""Tracking: the ``Tracker`` protocol the training loop writes to, the MLflow run writer, the
store's read side, an in-memory fake for tests, and MLflow UI links.

Modules: ``protocol`` (``Tracker``, ``NullTracker``), ``tags`` (the tags segsweep sets on its
runs), ``uris`` (which store, and what never reaches it: secrets, URI passwords),
``retries`` (``TrackingError``, retrying a store that hiccups), ``store`` (connecting, finding
and ending runs, reading runs back for reports), ``mlflow_writer`` (``RunTracker``: one MLflow
run, written asynchronously), ``fake`` (``FakeTracker``), ``local_server`` (an MLflow server
process for the bench and tests), ``mlflow_view`` (links into the MLflow UI).
"""

import os

# Set here, on the first import of any tracking module, before MLflow is imported by one of them.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO chatter about table creation
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # segsweep prints its own
