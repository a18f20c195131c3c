"""Links into the MLflow UI and the stored comparison view (MLflow 3.17's saved views), checked
as JSON and in headless Chromium against a real ``mlflow server`` on loopback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from segsweep.tracking import mlflow_view as mv

from .helpers import chrome, stop_group
from .localcluster import free_port, wait_for

VENV_BIN = Path(sys.executable).parent
COUNTED = "tags.`segsweep.counted` = 'true'"
COLUMNS = [("params", "method"), ("params", "label_ratio"), ("params", "seed"), ("params", "lr")]
GROUPS = [("param", "method"), ("param", "label_ratio")]
METRIC = "val/mIoU"
IMAGES = "panels/pseudo_masks"


@dataclass
class Store:
    url: str
    experiment_id: str
    counted: dict[str, str]  # run name -> run id
    uncounted: dict[str, str]
    parent: str


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` over a fresh SQLite store on a free loopback port; the caller stops it
    with :func:`stop_server`."""
    port = free_port()
    log = open(root / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "art"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'mlflow-server.log').read_text()[-2000:]}")
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200

    try:
        wait_for(up, 120, "mlflow server")
    except BaseException:
        stop_group(proc)
        raise
    return proc, url


def populate(url: str) -> Store:
    """A sweep's shape: a parent run, children with method/label_ratio/seed (seed 2 not
    counted), ``val/mIoU`` over three steps and one pseudo-mask image each."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    eid = client.create_experiment("sweep-view")
    parent = client.create_run(eid, run_name="the-sweep", tags={"segsweep.kind": "sweep"}).info.run_id
    counted: dict[str, str] = {}
    uncounted: dict[str, str] = {}
    for method, gain in (("supervised", 0.0), ("fixmatch", 0.05)):
        for ratio in (0.0625, 0.25):
            for seed in (0, 1, 2):
                name = f"{method}-{ratio}-{seed}"
                ok = seed < 2
                rid = client.create_run(
                    eid,
                    run_name=name,
                    tags={"mlflow.parentRunId": parent, "segsweep.counted": "true" if ok else "false"},
                ).info.run_id
                for key, value in {"method": method, "label_ratio": ratio, "seed": seed, "lr": 0.01}.items():
                    client.log_param(rid, key, value)
                for step in (1, 2, 3):
                    client.log_metric(rid, METRIC, 0.3 + gain + ratio + 0.05 * step, step=step)
                client.log_image(rid, np.full((16, 24, 3), 60 * seed, dtype=np.uint8), key=IMAGES, step=3)
                client.set_terminated(rid)
                (counted if ok else uncounted)[name] = rid
    client.set_terminated(parent)
    return Store(url, eid, counted, uncounted, parent)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("mlflow-view")
    proc, url = start_server(root)
    try:
        yield populate(url)
    finally:
        stop_group(proc)


def view_state() -> dict:
    return mv.comparison_view(COLUMNS, GROUPS, METRIC, IMAGES, COUNTED)


# --- pure ----------------------------------------------------------------------------------


def test_links_name_the_model_training_runs_page() -> None:
    assert (
        mv.runs_link("http://h:5000/", "7")
        == "http://h:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert mv.run_link("http://h:5000", "7", "abc") == (
        "http://h:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    )
    assert mv.view_link("https://h/mlflow", "7", "segsweep-s 1") == (
        "https://h/mlflow/#/experiments/7/runs?viewStateShareKey=segsweep-s%201&workflowType=machine_learning"
    )
    assert mv.view_key("night sweep/ratio: 1") == "segsweep-night-sweep-ratio-1"


def test_comparison_view_json() -> None:
    state = view_state()
    # only keys the 3.17 reader takes (the rest it drops), and the ones this view needs
    assert set(state) <= set(mv.SEARCH_FACET_KEYS) | set(mv.UI_STATE_KEYS)
    assert state["searchFilter"] == COUNTED
    assert state["selectedColumns"] == [
        "params.`method`",
        "params.`label_ratio`",
        "params.`seed`",
        "params.`lr`",
        "metrics.`val/mIoU`",
    ]
    assert state["orderByKey"] == "metrics.`val/mIoU`"
    assert state["groupBy"] == {
        "aggregateFunction": "average",
        "groupByKeys": [
            {"mode": "param", "groupByData": "method"},
            {"mode": "param", "groupByData": "label_ratio"},
        ],
    }
    line, grid = state["compareRunCharts"]
    assert (line["type"], line["metricKey"], line["xAxisKey"]) == ("LINE", METRIC, "step")
    assert (grid["type"], grid["imageKeys"]) == ("IMAGE", [IMAGES])
    sections = {s["uuid"] for s in state["compareRunSections"]}
    assert {line["metricSectionId"], grid["metricSectionId"]} <= sections
    assert "compareRunCharts" in mv.comparison_view(COLUMNS, GROUPS, METRIC, None, COUNTED)
    assert len(mv.comparison_view(COLUMNS, GROUPS, METRIC, None, COUNTED)["compareRunCharts"]) == 1
    with pytest.raises(ValueError):
        mv.comparison_view([("param", "method")], GROUPS, METRIC, None, COUNTED)  # kind is params


def test_envelope_round_trips_the_way_the_ui_reads_it() -> None:
    state = view_state()
    value = mv.encode_view(state, "segsweep: s", 1000, 2000)
    envelope = json.loads(value)
    assert envelope["name"] == "segsweep: s" and (envelope["createdAt"], envelope["updatedAt"]) == (
        1000,
        2000,
    )
    assert envelope["state"].startswith("deflate;")
    assert mv.decode_view(value) == state
    # the reader's other accepted forms: a bare state, compressed or not; unknown keys dropped
    assert mv.decode_view(json.dumps({**state, "runsPinned": ["x"]})) == state
    assert mv.decode_view(mv.compress(json.dumps(state))) == state


def test_store_view_only_on_the_pinned_version_and_never_raises(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    eid = client.create_experiment("e")
    assert mv.version_supported("3.17.2") and not mv.version_supported("3.18.0")
    assert not mv.version_supported("3.1.7") and not mv.version_supported(None)
    assert mv.store_view(client, eid, view_state(), "k", version="3.18.0") is None
    assert mv.store_view(client, "no-such-experiment", view_state(), "k", version="3.17.2") is None
    huge = {**view_state(), "searchFilter": os.urandom(16_000).hex()}
    assert mv.store_view(client, eid, huge, "k", version="3.17.2") is None
    assert mv.store_view(client, eid, view_state(), "k", name="segsweep: e", version="3.17.2") == "k"
    first = json.loads(client.get_experiment(eid).tags["mlflow.sharedViewState.k"])
    time.sleep(0.01)
    assert mv.store_view(client, eid, view_state(), "k", version="3.17.2") == "k"  # overwritten in place
    again = json.loads(client.get_experiment(eid).tags["mlflow.sharedViewState.k"])
    assert again["createdAt"] == first["createdAt"] and again["updatedAt"] >= first["updatedAt"]
    assert mv.decode_view(client.get_experiment(eid).tags["mlflow.sharedViewState.k"]) == view_state()
    fresh = mv.store_view(client, eid, view_state(), version="3.17.2")
    assert fresh and fresh[:13].isdigit() and len(fresh) == 21  # shaped like the UI's keys


# --- headless Chromium ---------------------------------------------------------------------

# run uuids of the run rows (row-id is the uuid, or "<group key>.<uuid>" when grouped; no group rows)
GRID_RUNS = (
    "return [...new Set(Array.from(document.querySelectorAll('.ag-row[row-id]'))"
    ".map(r => (r.getAttribute('row-id').match(/(?:^|\\.)([0-9a-f]{32})$/) || [])[1]).filter(Boolean))]"
)
# the group rows' titles ("Group: method: fixmatch, label_ratio: 0.0625"), from their Run Name cell
GROUP_TITLES = (
    "return [...new Set(Array.from(document.querySelectorAll('.ag-row[row-id]'))"
    ".filter(r => !/(?:^|\\.)[0-9a-f]{32}$/.test(r.getAttribute('row-id')))"
    ".map(r => r.querySelector('[col-id=\"attributes.`Run Name`\"] span[title]')).filter(Boolean)"
    ".map(s => s.textContent.trim()))]"
)
# the column headers' texts, left to right on screen (pinned and scrolled containers interleave in the DOM)
HEADERS = (
    "return Array.from(document.querySelectorAll('.ag-header-cell'))"
    ".sort((a, b) => a.getBoundingClientRect().left - b.getBoundingClientRect().left)"
    ".map(h => h.innerText.trim())"
)


def assert_model_training(driver) -> None:
    """The runs page of the Model training view, not the GenAI overview."""
    from selenium.webdriver.common.by import By

    assert "/runs" in driver.current_url and "/overview" not in driver.current_url
    assert "workflowType=machine_learning" in driver.current_url
    nav = driver.find_element(By.TAG_NAME, "nav").text.split("\n")
    assert "Runs" in nav and "Observability" not in nav and "Overview" not in nav, nav


@pytest.mark.browser
def test_stored_view_opens_grouped_in_a_fresh_browser(store: Store, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    key = mv.store_view(
        MlflowClient(store.url), store.experiment_id, view_state(), mv.view_key("s"), "segsweep: s"
    )
    assert key == "segsweep-s"
    driver = chrome(tmp_path / "profile", "1600,1200")
    try:
        driver.get(mv.view_link(store.url, store.experiment_id, key))
        WebDriverWait(driver, 90).until(lambda d: len(d.execute_script(GRID_RUNS)) == len(store.counted))
        assert sorted(driver.execute_script(GROUP_TITLES)) == [
            f"Group: method: {m}, label_ratio: {r}"
            for m in ("fixmatch", "supervised")
            for r in ("0.0625", "0.25")
        ]
        assert set(driver.execute_script(GRID_RUNS)) == set(store.counted.values())  # not seed 2, no parent
        order = ["method", "label_ratio", "seed", "lr", METRIC]

        def shown(d) -> list[str]:
            return [h for h in d.execute_script(HEADERS) if h in order]

        assert sorted(shown(driver)) == sorted(order)
        WebDriverWait(driver, 30).until(lambda d: shown(d) == order)  # the view's column order
        assert f"{len(store.counted)} matching runs" in driver.find_element(By.TAG_NAME, "body").text
        assert_model_training(driver)
        assert "segsweep: s" in driver.find_element(By.CSS_SELECTOR, "[data-testid=saved-views-trigger]").text
        # the charts: the segsweep section with the metric's line chart and the pseudo-mask grid
        driver.find_element(By.CSS_SELECTOR, "input[name=runs-view-mode][value=CHART]").find_element(
            By.XPATH, "./ancestor::label"
        ).click()
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('img')).some(i => i.complete && i.naturalWidth > 0"
                " && i.src.includes('pseudo_masks'))"
            )
        )
        text = driver.find_element(By.TAG_NAME, "body").text
        assert re.search(r"segsweep\s*\(?2\)?", text) and METRIC in text, text
    finally:
        driver.quit()


@pytest.mark.browser
def test_runs_link_opens_the_runs_table_in_a_fresh_browser(store: Store, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome(tmp_path / "profile", "1600,1200")
    try:
        driver.get(mv.runs_link(store.url, store.experiment_id))
        WebDriverWait(driver, 90).until(lambda d: store.parent in d.execute_script(GRID_RUNS))
        assert_model_training(driver)
        # a run's own link opens its page in the same view
        driver.get(mv.run_link(store.url, store.experiment_id, store.parent))
        WebDriverWait(driver, 60).until(lambda d: "the-sweep" in d.title or "the-sweep" in d.page_source)
        assert "workflowType=machine_learning" in driver.current_url and "/overview" not in driver.current_url
    finally:
        driver.quit()


@pytest.mark.browser
def test_a_view_saved_by_the_ui_has_the_format_we_write(store: Store, tmp_path: Path) -> None:
    """Group by method and label ratio through the UI's own menu, save the view with the UI's
    Save view dialog, and compare the tag the UI wrote with ours."""
    import urllib.parse

    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    facets = {"searchFilter": COUNTED, "orderByKey": f"metrics.`{METRIC}`", "orderByAsc": "false"}
    driver = chrome(tmp_path / "profile", "1600,1200")
    try:
        driver.get(mv.runs_link(store.url, store.experiment_id) + "&" + urllib.parse.urlencode(facets))
        WebDriverWait(driver, 90).until(lambda d: len(d.execute_script(GRID_RUNS)) == len(store.counted))

        def group_button(d):
            return next(
                b for b in d.find_elements(By.TAG_NAME, "button") if b.text.strip().startswith("Group by")
            )

        for name in ("method", "label_ratio"):
            if not driver.find_elements(By.CSS_SELECTOR, "[role=menuitemcheckbox]"):
                group_button(driver).click()
            item = WebDriverWait(driver, 20).until(
                lambda d, name=name: next(
                    (
                        i
                        for i in d.find_elements(By.CSS_SELECTOR, "[role=menuitemcheckbox]")
                        if i.text.strip() == name
                    ),
                    None,
                )
            )
            item.click()
            WebDriverWait(driver, 20).until(
                lambda d, name=name: name in group_button(d).text or "+1" in group_button(d).text
            )
        driver.find_element(By.CSS_SELECTOR, "[data-testid=saved-views-trigger]").click()
        WebDriverWait(driver, 20).until(
            lambda d: next(i for i in d.find_elements(By.CSS_SELECTOR, "[role=menuitem]") if "Save" in i.text)
        ).click()
        WebDriverWait(driver, 20).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "[data-testid=save-view-name-input]")
        ).send_keys("saved by the ui")
        driver.find_element(By.CSS_SELECTOR, "[data-testid=save-view-save-button]").click()
        link = WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "[data-testid=share-link-input]").get_attribute("value")
        )
    finally:
        driver.quit()
    tags = MlflowClient(store.url).get_experiment(store.experiment_id).tags
    (tag, value), *_ = [
        (k, v) for k, v in tags.items() if k.startswith(mv.VIEW_TAG_PREFIX) and "saved by the ui" in v
    ]
    key = tag[len(mv.VIEW_TAG_PREFIX) :]
    # the UI's link: the runs tab, the key in viewStateShareKey
    assert (
        link.startswith(f"{store.url}/#/experiments/{store.experiment_id}/runs?")
        and f"viewStateShareKey={key}" in link
    )
    assert key[:13].isdigit() and len(key) == 21  # epoch ms + 8 base-36 characters, like random_key()
    envelope, ours = json.loads(value), json.loads(mv.encode_view(view_state(), "x", 1))
    assert set(envelope) == set(ours) and envelope["state"].startswith(mv.COMPRESSED_PREFIX)
    theirs = mv.decode_view(value)
    assert set(theirs) <= set(mv.SEARCH_FACET_KEYS) | set(mv.UI_STATE_KEYS)
    mine = view_state()
    for k in (
        "groupBy",
        "searchFilter",
        "orderByKey",
        "orderByAsc",
        "startTime",
        "lifecycleFilter",
        "datasetsFilter",
    ):
        assert theirs[k] == mine[k], k
    assert all(
        re.fullmatch(r"(attributes|params|metrics|tags)\.`[^`]+`", c) for c in theirs["selectedColumns"]
    )
