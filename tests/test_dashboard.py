"""The web dashboard over a real MLflow store, driven by headless Chromium (Selenium)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from segsweep.errors import ConfigError
from segsweep.reports import dashboard
from segsweep.reports.dashboard import Dashboard, serve
from segsweep.tracking.mlflow_writer import RunTracker

from .helpers import chrome, store_with_two_sweeps_named_alike


def test_the_page_ships_inside_the_package_and_the_environment_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Package data, not the checkout's: a non-editable install has it too (test_packaging.py).
    monkeypatch.delenv("SEGSWEEP_DASHBOARD_DIR", raising=False)
    shipped = Path(dashboard.__file__).parent / "web"
    assert dashboard.web_root() == shipped and (shipped / "index.html").is_file()
    own = tmp_path / "page"
    own.mkdir()
    monkeypatch.setenv("SEGSWEEP_DASHBOARD_DIR", str(own))
    assert dashboard.web_root() == own
    with pytest.raises(ConfigError, match="dashboard files not found"):  # a folder without a page
        serve(None, "127.0.0.1", 0, None)
    (own / "index.html").write_text("<p>mine</p>")
    server = serve(None, "127.0.0.1", 0, None)
    try:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/", timeout=30) as page:
            assert page.read() == b"<p>mine</p>"
    finally:
        server.shutdown()
        server.server_close()


HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'mlflow.db'}"
    parent = RunTracker(uri, "dash", run_name="dash", tags={"segsweep.kind": "sweep"}, run_key="sweep:dash")
    for method, gain in (("supervised", 0.0), ("fixmatch", 0.04)):
        for ratio in (0.0625, 0.25):
            for seed in (0, 1):
                name = (
                    HOSTILE if (method, ratio, seed) == ("fixmatch", 0.25, 1) else f"{method}-{ratio}-{seed}"
                )
                t = RunTracker(
                    uri,
                    "dash",
                    run_name=name,
                    parent_run_id=parent.run_id,
                    tags={
                        "segsweep.phase": "final",
                        "segsweep.split_family": "generated/seed0",
                        "segsweep.cell": f"method={method},ratio={ratio}",
                    },
                )
                t.log_params({"method": method, "label_ratio": ratio, "seed": seed, "dataset": "synthetic"})
                for step in (100, 200):
                    t.log_metrics(
                        {"train/loss": 1.0 / step, "val/mIoU": 0.3 + gain + ratio * step / 400}, step
                    )
                    if method == "fixmatch":
                        t.log_image(np.full((16, 40, 3), step, dtype=np.uint8), "panels/pseudo_masks", step)
                t.log_metrics(
                    {"val/mIoU_last": 0.3 + gain + ratio / 2 + 0.01 * seed, "tune/mIoU_best": 0.3}, 200
                )
                t.finish("FINISHED", "finished")
    parent.finish("FINISHED", "finished")
    store_with_two_sweeps_named_alike(uri, "twice")
    return uri


@pytest.mark.slow
def test_api_builds_the_curve_table_and_run_views(store: str) -> None:
    app = Dashboard(store, "http://127.0.0.1:5000")
    curve = app.curve("dash", "last")
    assert {s["method"] for s in curve["summary"]} == {"supervised", "fixmatch"}
    assert curve["n_runs"] == 8 and len(curve["differences"]) == 2
    assert all(d["paired"] and d["mean_diff"] == pytest.approx(0.04) for d in curve["differences"])
    runs = app.runs("dash")["runs"]
    assert len(runs) == 8 and HOSTILE in {r["name"] for r in runs}
    fm = next(r for r in runs if r["method"] == "fixmatch")
    detail = app.run(fm["id"])
    assert [p[0] for p in detail["history"]["val/mIoU"]] == [100, 200]
    assert [i["step"] for i in detail["images"]] == [100, 200]
    body, ctype = app.artifact(fm["id"], detail["images"][0]["path"])
    assert ctype == "image/png" and body[:4] == b"\x89PNG"
    with pytest.raises(ConfigError):
        app.artifact(fm["id"], "../../mlflow.db")
    assert app.curve_png("dash", "last")[:4] == b"\x89PNG"


def test_the_dashboard_links_to_where_the_stores_ui_is_and_marks_counted_runs(
    store: str, tmp_path: Path
) -> None:
    from segsweep.reports.answer import publish

    local = Dashboard(store, None)  # a local store: its UI runs where `mlflow ui` was started
    assert local.experiments()["mlflow_url"] == ""
    assert all(r["mlflow_link"] == "" for r in local.runs("dash")["runs"])
    served = Dashboard("http://bob:pw@mlflow.example:5000", None)
    assert served.mlflow_url == "http://mlflow.example:5000"  # the server's own UI, no password
    given = Dashboard(store, "http://127.0.0.1:5001/")
    rows = given.runs("dash")["runs"]
    assert all(r["mlflow_link"].startswith("http://127.0.0.1:5001/#/experiments/") for r in rows)
    assert all("workflowType=machine_learning" in r["mlflow_link"] for r in rows)
    assert not any(r["counted"] for r in rows)
    # once the sweep's answer is published, the run the curve counts for each cell is marked
    parent = next(p for p in given.runs("dash")["sweeps"])
    counted = publish(store, "dash", parent["id"]).counted
    fresh = Dashboard(store, "http://127.0.0.1:5001").runs("dash")["runs"]
    assert {r["id"] for r in fresh if r["counted"]} == counted and len(counted) == 8


def test_api_draws_one_sweep_of_an_experiment_that_holds_several(store: str) -> None:
    app = Dashboard(store, None)
    sweeps = app.runs("twice")["sweeps"]
    assert [s["name"] for s in sweeps] == ["s", "s"]  # newest first
    new, old = (s["id"] for s in sweeps)

    def fixmatch(curve: dict) -> dict:
        return next(s for s in curve["summary"] if s["method"] == "fixmatch")

    assert fixmatch(app.curve("twice", "last", old))["mean"] == pytest.approx(0.40)
    assert fixmatch(app.curve("twice", "last", new))["mean"] == pytest.approx(0.51)
    assert fixmatch(app.curve("twice", "last"))["mean"] == pytest.approx(0.51)  # every sweep, newest counts
    assert len(app.runs("twice", old)["runs"]) == 6 and len(app.runs("twice")["runs"]) == 12
    with pytest.raises(ConfigError, match="2 sweeps of experiment 'twice' are named 's'"):
        app.curve("twice", "last", "s")
    assert len(app.runs("dash")["sweeps"]) == 1


@pytest.mark.browser
def test_dashboard_in_a_real_browser(store: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serve(store, "127.0.0.1", 0, "http://127.0.0.1:5000")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    driver = chrome()
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/?experiment=dash")
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready")
        )
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        # the curve plot rendered
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script(
                "const i = document.getElementById('curve'); return i.complete && i.naturalWidth > 0"
            )
        )
        # the method x label-ratio table shows the sweep's methods, mean ± std over seeds
        table = driver.find_element(By.ID, "table").text
        assert "supervised" in table and "fixmatch" in table and "1/16" in table and "(n=2)" in table
        assert "paired" in driver.find_element(By.ID, "differences").text
        # a hostile run name is shown as text, never run as markup
        runs = driver.find_element(By.ID, "runs")
        assert HOSTILE in runs.text
        assert driver.title == "segsweep dashboard"
        assert driver.find_elements(By.CSS_SELECTOR, "#runs script, #runs img") == []
        # a run's training curves and its pseudo-mask panels over steps
        row = next(r for r in runs.find_elements(By.CSS_SELECTOR, "tr.clickable") if "fixmatch" in r.text)
        row.find_element(By.TAG_NAME, "td").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "run-section").is_displayed())
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script(
                "const i = document.getElementById('panel'); return i.complete && i.naturalWidth > 0"
            )
        )
        assert driver.find_element(By.ID, "panel-step-label").text == "step 200"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#charts svg")) >= 2
        links = [a.get_attribute("href") for a in driver.find_elements(By.LINK_TEXT, "MLflow")]
        assert links and all(link.startswith("http://127.0.0.1:5000/#/experiments/") for link in links)
        # MLflow's Model training view, never its GenAI overview
        assert all("workflowType=machine_learning" in link for link in links)
        driver.save_screenshot(str(tmp_path / "dashboard.png"))
        assert not driver.find_element(By.ID, "sweep-label").is_displayed()  # one sweep: no choice

        # an experiment holding two sweeps: all count, or the one chosen
        from selenium.webdriver.support.ui import Select

        driver.get(f"http://127.0.0.1:{server.server_address[1]}/?experiment=twice")
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "sweep-label").is_displayed())
        choice = Select(driver.find_element(By.ID, "sweep"))
        assert [o.text.split(",")[0] for o in choice.options] == ["all 2 sweeps", "s", "s"]
        assert "51.0" in driver.find_element(By.ID, "table").text
        choice.select_by_index(2)  # the older sweep
        # The curve's table comes first, then the runs: wait for the page to say it shows the
        # one sweep (set, with its rows, once the runs came) before counting the rows.
        WebDriverWait(driver, 30).until(
            lambda d: "&sweep=" in (d.find_element(By.TAG_NAME, "body").get_attribute("data-shown") or "")
        )
        assert "40.0" in driver.find_element(By.ID, "table").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#runs tr.clickable")) == 6
        Select(driver.find_element(By.ID, "value")).select_by_value("best_tune")  # keeps the sweep
        WebDriverWait(driver, 30).until(
            lambda d: "best_tune" in d.find_element(By.TAG_NAME, "body").get_attribute("data-shown")
        )
        shown = driver.find_element(By.TAG_NAME, "body").get_attribute("data-shown")
        assert "&sweep=" in shown and len(driver.find_elements(By.CSS_SELECTOR, "#runs tr.clickable")) == 6
        assert Select(driver.find_element(By.ID, "sweep")).first_selected_option == choice.options[2]
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
