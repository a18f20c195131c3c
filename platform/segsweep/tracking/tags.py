"""The tags segsweep sets on its runs, and the values it gives them: the MLflow layout that
the writer, the sweep driver, the reports, the dashboard and the bench share (the MLflow UI
can filter and group on them)."""

TAG_KEY = "segsweep.run_key"  # a stable key: a resumed trial finds its run instead of duplicating
TAG_STATUS = "segsweep.status"  # finished | failed | diverged | stopped_early | killed | interrupted
TAG_ERROR = "segsweep.error"  # why a run failed, diverged or was cut short, in one line
TAG_STOPPED_AT = "segsweep.stopped_at_step"  # where a sweep's scheduler stopped a trial
TAG_RESUMED_WITH = "segsweep.resumed_with"  # settings a resume changed: "key: logged -> used; ..."
# Written by one module and read by others (reports, dashboards, the bench):
TAG_KIND = "segsweep.kind"  # "sweep" on a sweep's parent run
TAG_CELL = "segsweep.cell"  # a sweep trial's cell id, e.g. "method=fixmatch,ratio=0.25,seed=0"
TAG_PHASE = "segsweep.phase"  # a sweep trial's phase: search | final
TAG_SPLIT_FAMILY = "segsweep.split_family"  # which published split lists a run's split came from
#: The status the sweep driver gives the runs of trials an interrupt cut short.
STATUS_INTERRUPTED = "interrupted"
TAG_PARENT = "mlflow.parentRunId"
#: Tags an earlier attempt's ending left, which no longer hold once its run is reopened.
ENDING_TAGS = (TAG_ERROR, TAG_STOPPED_AT, TAG_RESUMED_WITH)
