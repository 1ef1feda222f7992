"""End to end: `kdsearch ui`'s server in a real headless Chromium shows a smoke study's runs.

Needs Debian's chromium and chromium-driver and the selenium package; skips, saying which is missing,
otherwise (fails instead where KDSEARCH_REQUIRE_BROWSER is set, as .ci/run does once it installed them). Screenshots go to $KDSEARCH_TEST_ARTIFACTS (default: pytest's
temporary directory); their paths are printed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import optuna
import pytest
from fixtures_study import SMOKE
from optuna.trial import TrialState

from kdsearch.cli import main
from kdsearch.figures import find_chromium
from kdsearch.ui import start_ui

pytest_plugins = ["fixtures_study"]
pytestmark = pytest.mark.browser

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=2200,900",  # wide enough for the runs table's param and metric columns
]
# The params and metric the issue asks to see, as kdsearch logs them.
PARAMS = {"t": "kd.temperature", "alpha": "kd.alpha", "p": "overlay.p"}


def _needs() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if find_chromium() is None:
        return "no Chromium (apt-get install chromium)"
    if shutil.which("chromedriver") is None:
        return "no chromedriver (apt-get install chromium-driver)"
    return None


@pytest.fixture
def browser(tmp_path):
    reason = _needs()
    if reason is not None and os.environ.get("KDSEARCH_REQUIRE_BROWSER"):
        pytest.fail(f"KDSEARCH_REQUIRE_BROWSER is set but {reason}")
    if reason is not None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_chromium()
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    directory = Path(os.environ.get("KDSEARCH_TEST_ARTIFACTS", tmp_path / "artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _wait(driver, condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; page text: {_text(driver)[:2000]}")


def _text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def _shot(driver, path: Path) -> None:
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    assert path.stat().st_size > 10_000


# MLflow 3.17's runs table (AG Grid): a row per run, its row-id the run id, a cell per column with
# col-id "metrics.`NAME`" or "params.`NAME`". Nested runs show once their parent row is expanded.
EXPAND = """
const link = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === arguments[0]);
const button = link && link.closest('[role=row]').querySelector('button');
if (button) button.click();
return Boolean(button);
"""
CELLS = """
const rows = {};
for (const row of document.querySelectorAll('.ag-center-cols-container [role=row]')) {
  const cells = {};
  for (const cell of row.querySelectorAll('[role=gridcell]')) cells[cell.getAttribute('col-id')] = cell.textContent.trim();
  rows[row.getAttribute('row-id')] = cells;
}
return rows;
"""


def _add_column(driver, name: str) -> None:
    """Tick ``name`` in the runs table's column selector (open), searching for it first."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']")
    box.send_keys(Keys.CONTROL + "a", Keys.DELETE, name)

    def node(d):
        found = [
            n
            for n in d.find_elements(By.CSS_SELECTOR, "[role=dialog] .du-bois-light-tree-treenode")
            if n.text.strip() == name
        ]
        return found[0] if found else None

    _wait(driver, node, f"column {name} in the column selector").find_element(
        By.CSS_SELECTOR, ".du-bois-light-tree-node-content-wrapper"
    ).click()


def test_mlflow_ui_shows_the_smoke_studys_runs_with_params_and_val_acc(
    browser, artifacts, tmp_path, mlflow_uri, shared_cache, tiny_teacher_checkpoint
):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    storage = f"sqlite:///{tmp_path}/studies.db"
    args = ["study", "grid", "--study", str(SMOKE), "--storage", storage, "--tracking-uri", mlflow_uri]
    args += ["--teacher-checkpoint", tiny_teacher_checkpoint, "--set", "latency.repeats=1", "--no-progress"]
    assert main([*args, "--study-name", "smoke-ui"]) == 0
    study = optuna.load_study(study_name="smoke-ui", storage=storage)
    trials = {t.user_attrs["run_id"]: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(trials) == 4
    experiment = MlflowClient(mlflow_uri).get_experiment_by_name("smoke").experiment_id

    with start_ui(mlflow_uri) as server:
        assert server.url.startswith("http://127.0.0.1:")
        browser.get(server.experiment_url(experiment))
        _wait(browser, lambda d: "smoke-ui" in _text(d), "the study's parent run in the runs table")
        browser.execute_script("document.querySelector('button[aria-label=Close]')?.click()")  # the assistant panel
        browser.find_element(By.XPATH, "//button[normalize-space(.)='Columns']").click()
        for column in ("val_acc", *PARAMS.values()):
            _add_column(browser, column)
        browser.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']").send_keys(Keys.ESCAPE)
        _wait(browser, lambda d: d.execute_script(EXPAND, "smoke-ui"), "the parent run's expander")
        cells = _wait(
            browser,
            lambda d: (rows := d.execute_script(CELLS)) and set(trials) <= set(rows) and rows,
            "the trials' rows (nested under the parent run)",
        )
        page = _text(browser)
        assert all(f"trial-{trial.number}" in page for trial in trials.values()), page
        _shot(browser, artifacts / "mlflow-experiment-runs.png")

    for run_id, trial in trials.items():
        row = cells[run_id]
        assert float(row["metrics.`val_acc`"]) == pytest.approx(trial.value), trial.number
        for name, param in PARAMS.items():
            assert float(row[f"params.`{param}`"]) == trial.params[name], (trial.number, param)
