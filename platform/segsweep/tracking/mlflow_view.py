"""Links into the MLflow UI that open the Model training view, and a stored comparison view.

MLflow 3.17's UI picks the experiment page's flavour from the ``workflowType`` URL parameter,
then from the browser's local storage (``mlflow.workflowType``), then ``genai`` (the GenAI
overview): every link here carries ``workflowType=machine_learning`` and names the ``runs`` tab.

A comparison view is the UI's own "saved view": an experiment tag
``mlflow.sharedViewState.<key>`` opened by ``viewStateShareKey=<key>`` in the runs page's URL.
The format is not documented; what is written here mirrors the 3.17 bundle
(``mlflow/server/js/build/static/js``), so it is pinned to that minor version:

* the tag's value is an envelope ``{"name", "createdAt", "updatedAt", "state"}`` (times in epoch
  ms, at most 20,000 characters) whose ``state`` is the view's JSON, ``deflate;`` + base64 of a
  zlib stream when compressed (the UI's Save view always compresses);
* the reader merges the state over the UI's defaults, keeping only the search-facet keys
  (:data:`SEARCH_FACET_KEYS`) and the UI-state keys (:data:`UI_STATE_KEYS`); a URL that carries
  a search-facet parameter of its own ignores the stored view;
* columns are canonical keys ``params.`name```, ``metrics.`name```, ``tags.`name```;
  ``groupBy`` is ``{"aggregateFunction": "average", "groupByKeys": [{"mode": "param",
  "groupByData": "method"}, ...]}``; charts are card configs (``LINE`` over ``step``,
  ``IMAGE`` with ``imageKeys``) in sections.
"""

from __future__ import annotations

import base64
import json
import random
import re
import string
import time
import urllib.parse
import zlib
from typing import Any

MLFLOW_VERSION_PINNED = "3.17"
SHARE_KEY_PARAM = "viewStateShareKey"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
WORKFLOW_PARAM = "workflowType"
WORKFLOW_MODEL_TRAINING = "machine_learning"
COMPRESSED_PREFIX = "deflate;"
MAX_VIEW_CHARS = 20_000  # the UI's limit on the envelope, and MLflow's on an experiment tag value

SEARCH_FACET_KEYS = (
    "searchFilter",
    "orderByKey",
    "orderByAsc",
    "startTime",
    "lifecycleFilter",
    "modelVersionFilter",
    "datasetsFilter",
)
UI_STATE_KEYS = (
    "selectedColumns",
    "columnOrder",
    "columnWidths",
    "runsHiddenMode",
    "compareRunCharts",
    "compareRunSections",
    "viewMaximized",
    "runListHidden",
    "isAccordionReordered",
    "groupBy",
    "groupsExpanded",
    "useGroupedValuesInCharts",
    "hideEmptyCharts",
    "globalLineChartConfig",
    "chartsSearchFilter",
)
COLUMN_KINDS = ("attributes", "params", "metrics", "tags")
GROUP_MODES = ("param", "tag", "dataset")
SECTION_ID = "segsweep-section"


def mlflow_version() -> str | None:
    try:
        import mlflow

        return str(mlflow.__version__)
    except Exception:  # noqa: BLE001 - no MLflow, no view
        return None


def version_supported(version: str | None) -> bool:
    """The stored view's format is the one of MLflow ``3.17.x`` only."""
    return version is not None and version.split(".")[:2] == MLFLOW_VERSION_PINNED.split(".")


def _base(base_url: str) -> str:
    return base_url.rstrip("/")


def _query(**params: str) -> str:
    return urllib.parse.urlencode(params, quote_via=urllib.parse.quote)


def runs_link(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table in the Model training view (parents and their children)."""
    return f"{_base(base_url)}/#/experiments/{experiment_id}/runs?" + _query(
        **{WORKFLOW_PARAM: WORKFLOW_MODEL_TRAINING}
    )


def run_link(base_url: str, experiment_id: str, run_id: str) -> str:
    """One run's page, in the Model training view."""
    return f"{_base(base_url)}/#/experiments/{experiment_id}/runs/{run_id}?" + _query(
        **{WORKFLOW_PARAM: WORKFLOW_MODEL_TRAINING}
    )


def view_link(base_url: str, experiment_id: str, key: str) -> str:
    """The runs page opened with the stored view ``key`` (the link the UI's Save view prints)."""
    return f"{_base(base_url)}/#/experiments/{experiment_id}/runs?" + _query(
        **{SHARE_KEY_PARAM: key, WORKFLOW_PARAM: WORKFLOW_MODEL_TRAINING}
    )


def view_key(name: str) -> str:
    """A stable view key for a sweep: ``segsweep-<name>`` in tag-key- and URL-safe characters."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "view"
    return f"segsweep-{slug}"[:200]


def random_key() -> str:
    """A key shaped like the UI's own (epoch ms + 8 base-36 characters)."""
    alphabet = string.ascii_lowercase + string.digits
    return f"{int(time.time() * 1000)}{''.join(random.choice(alphabet) for _ in range(8))}"


def canonical_column(kind: str, name: str) -> str:
    """The UI's column key: ``params.`label_ratio```."""
    if kind not in COLUMN_KINDS:
        raise ValueError(f"column kind {kind!r} is not one of {COLUMN_KINDS}")
    return f"{kind}.`{name}`"


def line_chart(metric: str, uuid: str, section: str = SECTION_ID) -> dict[str, Any]:
    """A line chart card: ``metric`` against the step, one line per run or group."""
    return {
        "uuid": uuid,
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "displayName": metric,
        "metricKey": metric,
        "selectedMetricKeys": [metric],
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def image_chart(image_key: str, uuid: str, section: str = SECTION_ID, step: int = 0) -> dict[str, Any]:
    """An image grid card: the logged images of ``image_key`` (``mlflow.log_image(key=...)``)."""
    return {
        "uuid": uuid,
        "type": "IMAGE",
        "runsCountToCompare": 10,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "displayName": image_key,
        "imageKeys": [image_key],
        "step": step,
        "showRunParams": True,
    }


def comparison_view(
    columns: list[tuple[str, str]],
    group_by: list[tuple[str, str]],
    metric: str,
    image_key: str | None,
    search_filter: str,
    *,
    step_metric: str | None = None,
    image_step: int = 0,
    grouped_charts: bool = False,
    section_name: str = "segsweep",
) -> dict[str, Any]:
    """The view's state (the JSON the UI's reader takes): ``columns`` as ``(kind, name)`` with
    kind params/metrics/tags/attributes, ``metric`` as a column and the sort key, groups by
    ``group_by`` (``(mode, name)``, mode param/tag), a line chart of ``step_metric`` (default
    ``metric``) over steps, an image grid of ``image_key`` (opened at ``image_step``), and
    ``search_filter`` as the runs' filter (MLflow search syntax).

    The table is grouped; the charts draw one line per run unless ``grouped_charts``: the UI's
    image grid shows only runs' own images, so grouped charts would leave it empty."""
    for mode, _ in group_by:
        if mode not in GROUP_MODES:
            raise ValueError(f"group mode {mode!r} is not one of {GROUP_MODES}")
    selected = [canonical_column(kind, name) for kind, name in columns]
    metric_column = canonical_column("metrics", metric)
    if metric_column not in selected:
        selected.append(metric_column)
    charts = [line_chart(step_metric or metric, "segsweep-chart-metric")]
    if image_key:
        charts.append(image_chart(image_key, "segsweep-chart-images", step=image_step))
    return {
        "searchFilter": search_filter,
        "orderByKey": metric_column,
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": selected,
        "columnOrder": list(selected),  # the table shows the columns in this order
        "columnWidths": {},
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": mode, "groupByData": name} for mode, name in group_by],
        },
        "groupsExpanded": {},
        "useGroupedValuesInCharts": grouped_charts,
        "hideEmptyCharts": True,
        "compareRunCharts": charts,
        "compareRunSections": [
            {
                "uuid": SECTION_ID,
                "name": section_name,
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
            }
        ],
        "isAccordionReordered": True,  # keep the segsweep section first
        "viewMaximized": False,
        "runListHidden": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def compress(text: str) -> str:
    """The UI's ``deflate;`` + base64 of a zlib stream (pako.deflate)."""
    return COMPRESSED_PREFIX + base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")


def decompress(text: str) -> str:
    if not text.startswith(COMPRESSED_PREFIX):
        raise ValueError("not a deflate;-prefixed payload")
    return zlib.decompress(base64.b64decode(text[len(COMPRESSED_PREFIX) :])).decode("utf-8")


def encode_view(state: dict[str, Any], name: str, created_ms: int, updated_ms: int | None = None) -> str:
    """The tag value: the saved-view envelope around the compressed state."""
    return json.dumps(
        {
            "name": name,
            "createdAt": created_ms,
            "updatedAt": created_ms if updated_ms is None else updated_ms,
            "state": compress(json.dumps(state, separators=(",", ":"))),
        },
        separators=(",", ":"),
    )


def decode_view(value: str) -> dict[str, Any]:
    """Read a tag value the way the 3.17 UI does: an envelope (state compressed or not), else a
    bare state, compressed or not; then keep only the keys the reader takes."""
    try:
        envelope = json.loads(value)
        if not (
            isinstance(envelope, dict)
            and isinstance(envelope.get("name"), str)
            and isinstance(envelope.get("createdAt"), (int, float))
            and isinstance(envelope.get("state"), str)
        ):
            raise ValueError("not an envelope")
        inner = envelope["state"]
        state = json.loads(decompress(inner) if inner.startswith(COMPRESSED_PREFIX) else inner)
    except ValueError:
        state = json.loads(decompress(value) if value.startswith(COMPRESSED_PREFIX) else value)
    return {k: v for k, v in state.items() if k in SEARCH_FACET_KEYS or k in UI_STATE_KEYS}


def store_view(
    client: Any,
    experiment_id: str,
    state: dict[str, Any],
    key: str | None = None,
    name: str | None = None,
    version: str | None = None,
) -> str | None:
    """Write ``state`` as the experiment's saved view ``key`` (a fresh UI-style key when None;
    the same key is overwritten, keeping its creation time) and return the key, or None where
    MLflow is not 3.17.x, the view is too large, or the write fails. Prints nothing, never raises."""
    try:
        if not version_supported(version if version is not None else mlflow_version()):
            return None
        key = key or random_key()
        tag = VIEW_TAG_PREFIX + key
        now = int(time.time() * 1000)
        created = now
        try:
            old = client.get_experiment(experiment_id).tags.get(tag)
            if old:
                created = int(json.loads(old)["createdAt"])
        except Exception:  # noqa: BLE001 - no earlier view, or not an envelope
            pass
        value = encode_view(state, name or key, created, now)
        if len(value) > MAX_VIEW_CHARS:
            return None
        client.set_experiment_tag(experiment_id, tag, value)
        return key
    except Exception:  # noqa: BLE001 - the caller prints the plain runs link
        return None
