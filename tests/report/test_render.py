"""`kdsearch report` on a smoke grid study and a smoke ablation: files, numbers, figures, errors, partial studies."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from torchvision.io import decode_png, read_file

from kdsearch.cli.main import main
from kdsearch.errors import KdsearchError
from kdsearch.report.figures import Line, ablation_bars, compression_accuracy, find_chromium, ig_figure
from kdsearch.report.paper import literature, reported_accuracy
from kdsearch.report.render import attribution_examples
from kdsearch.report.tables import Deployment, deployment_table, timing_contention, trials_table
from kdsearch.search.ablation import AblationTable, ArmRow, ablation_table
from kdsearch.search.kinds import STUDY_KINDS
from kdsearch.search.optuna_storage import HeartbeatConfig
from kdsearch.search.study import claim_waiting, join_study
from tests.fakes import SMOKE

STATIC = find_chromium() is not None and importlib.util.find_spec("kaleido") is not None  # PNG and SVG expected
GRID_FIGURES = ["compression_accuracy", "grid_heatmaps", "optimization_history", "parallel_coordinates", "ig_examples"]
ABLATION_FIGURES = ["compression_accuracy", "ablation_bars", "ig_examples"]
ARMS = ["baseline", "kd", "ig", "kd_ig"]


# --- one smoke grid study and one smoke ablation, and their reports, for the whole module --------


@pytest.fixture(scope="module")
def stores(tmp_path_factory, _mlflow_template, tiny_teacher_checkpoint) -> dict:
    """studies.db and mlruns/ with a complete smoke grid ("grid") and smoke ablation ("ablation").

    The session's tiny teacher stands in for the smoke study's teacher recipe (one training fewer).
    """
    root = tmp_path_factory.mktemp("report-stores")
    (root / "mlruns").mkdir()
    shutil.copy(_mlflow_template, root / "mlruns" / "mlflow.db")
    stores = {
        "root": root,
        "storage": f"sqlite:///{root}/studies.db",
        "tracking": f"sqlite:///{root}/mlruns/mlflow.db",
        "cache": str(root / "cache"),
        "teacher": tiny_teacher_checkpoint,
    }
    common = ["--storage", stores["storage"], "--tracking-uri", stores["tracking"], "--cache-dir", stores["cache"]]
    common += ["--teacher-checkpoint", tiny_teacher_checkpoint]
    common += ["--set", "latency.repeats=1", "--set", "latency.warmup=0", "--no-progress"]
    onnx = ["--set", "latency.onnx_runtimes=[onnx-fp32,onnx-int8]"]  # the ablation keeps smoke.yaml's torch only
    assert main(["study", "grid", "--study", str(SMOKE), "--study-name", "grid", *common, *onnx]) == 0
    ablate = ["ablate", "--study", str(SMOKE), "--study-name", "ablation", "--seeds", "2", "--agreement-images", "10"]
    assert main([*ablate, *common]) == 0
    return stores


def _report(stores: dict, flag: str, name: str, out: Path, *extra: str) -> int:
    args = ["report", flag, name, "--out", str(out), "--storage", stores["storage"]]
    return main([*args, "--tracking-uri", stores["tracking"], "--cache-dir", stores["cache"], *extra])


@pytest.fixture(scope="module")
def grid_report(stores, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grid-report") / "report"
    assert _report(stores, "--study", "grid", out) == 0
    return out


@pytest.fixture(scope="module")
def ablation_report(stores, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ablation-report") / "report"
    assert _report(stores, "--ablation", "ablation", out) == 0
    return out


def _study(stores: dict, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=stores["storage"])


# --- parsing what the report wrote ------------------------------------------------------------


def markdown_rows(source: Path | str) -> list[dict[str, str]]:
    """The rows of the Markdown table in a file (or text), as {column: cell}."""
    text = source.read_text() if isinstance(source, Path) else source
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


def plotly_json(path: Path) -> dict:
    """{"data": [...], "layout": {...}} of the figure embedded in plotly's HTML."""
    text = path.read_text()
    decoder = json.JSONDecoder()
    position = text.index("Plotly.newPlot(") + len("Plotly.newPlot(")
    values = []
    for _ in range(3):  # the div id, the traces, the layout
        while text[position] in " \n,":
            position += 1
        value, position = decoder.raw_decode(text, position)
        values.append(value)
    return {"data": values[1], "layout": values[2]}


def assert_shows(cell: str, value: float | None) -> None:
    """The cell shows ``value`` rounded to the cell's own number of decimals (empty for None/NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        assert cell in ("", "n/a"), cell
        return
    text = cell.replace(",", "").lstrip("+")
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert float(text) == pytest.approx(round(float(value), decimals), abs=10 ** (-decimals) / 2 + 1e-9), (cell, value)


def _expected_files(figure_names: list[str], table_names: list[str]) -> set[str]:
    files = {"index.html", "report.json", "figures/plotly.min.js"}
    files |= {f"tables/{name}.{suffix}" for name in table_names for suffix in ("csv", "md", "html")}
    suffixes = ("html", "png", "svg") if STATIC else ("html",)
    return files | {f"figures/{name}.{suffix}" for name in figure_names for suffix in suffixes}


def _check_files(out: Path, expected: set[str]) -> None:
    written = {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()}
    assert written == expected
    index = (out / "index.html").read_text()
    for link in re.findall(r"(?:href|src)='([^']+)'", index):
        assert (out / link).is_file(), link
    if not STATIC:
        return
    for png in out.glob("figures/*.png"):
        image = decode_png(read_file(str(png)))
        assert image.shape[0] in (3, 4) and image.shape[1] >= 600 and image.shape[2] >= 600, png
        assert png.stat().st_size > 20_000 and image.float().std() > 5, png  # not a blank page
    for svg in out.glob("figures/*.svg"):
        assert ElementTree.parse(svg).getroot().tag.endswith("svg") and svg.stat().st_size > 5_000, svg


# --- files ------------------------------------------------------------------------------------


def test_grid_report_writes_every_file(grid_report):
    _check_files(grid_report, _expected_files(GRID_FIGURES, ["trials", "deployment"]))
    summary = json.loads((grid_report / "report.json").read_text())
    assert summary["partial"] is False and summary["progress"] == "4 of 4 grid points complete"
    if STATIC:
        assert summary["notes"] == []
    else:  # the one note says why the PNG/SVG copies are missing and how to get them
        assert len(summary["notes"]) == 1 and summary["notes"][0].startswith("PNG/SVG not written: ")
        assert "apt-get install chromium" in summary["notes"][0] or "pip install kaleido" in summary["notes"][0]


def test_ablation_report_writes_every_file(ablation_report):
    tables = ["trials", "ablation", "ablation_comparisons", "deployment"]
    _check_files(ablation_report, _expected_files(ABLATION_FIGURES, tables))


def test_report_is_logged_to_the_parent_run(stores, grid_report):
    from mlflow import MlflowClient

    client = MlflowClient(stores["tracking"])
    parent = json.loads((grid_report / "report.json").read_text())["parent_run"]
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/index.html", "report/report.json", "report/tables", "report/figures"} <= logged
    figures = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(parent, "report/figures")}
    assert {f"{name}.html" for name in GRID_FIGURES} <= figures


# --- every number in the Markdown tables is the stored one -------------------------------------


def test_grid_table_numbers_are_the_stored_ones(stores, grid_report):
    trials = {t.number: t for t in _study(stores, "grid").get_trials(states=(TrialState.COMPLETE,))}
    rows = markdown_rows(grid_report / "tables" / "trials.md")
    assert sorted(int(row["trial"]) for row in rows) == sorted(trials)
    values = sorted((t.value for t in trials.values()), reverse=True)
    for row in rows:
        trial = trials[int(row["trial"])]
        for column, name in (("T", "t"), ("α", "alpha"), ("p", "p")):
            assert float(row[column]) == trial.params[name]
        assert_shows(row["val acc (%)"], trial.value)
        assert_shows(row["test acc (%)"], trial.user_attrs["test_acc"])
        assert int(row["rank"]) == values.index(trial.value) + 1 and row["state"] == "complete"
    assert [float(row["val acc (%)"]) for row in rows] == sorted((float(r["val acc (%)"]) for r in rows), reverse=True)


def test_deployment_table_numbers_are_mlflows(stores, grid_report):
    from mlflow import MlflowClient

    best = _study(stores, "grid").best_trial
    run = MlflowClient(stores["tracking"]).get_run(best.user_attrs["run_id"])
    metrics = run.data.metrics
    rows = {row["quantity"]: row for row in markdown_rows(grid_report / "tables" / "deployment.md")}
    assert rows["dataset"]["student measured"] == run.data.params["data.name"] == "synthetic"
    assert rows["dataset"]["teacher reported"] == "CIFAR-10"
    for who in ("teacher", "student"):
        assert_shows(rows["parameters"][f"{who} measured"], metrics[f"{who}_params"])
        assert_shows(rows["FLOPs per image"][f"{who} measured"], metrics[f"{who}_flops"])
        assert_shows(rows["size on disk, state dict (MB)"][f"{who} measured"], metrics[f"{who}_size_bytes"] / 1e6)
        for batch in (1, 128):
            for runtime, label in (
                ("", "torch eager"),
                ("onnx_fp32_", "ONNX Runtime fp32"),
                ("onnx_int8_", "ONNX Runtime int8"),
            ):
                metric = metrics[f"latency_ms_{who}_{runtime}b{batch}"]
                assert_shows(rows[f"latency, {label}, batch {batch} (ms)"][f"{who} measured"], metric)
    assert_shows(rows["parameters"]["teacher/student measured"], metrics["compression_factor"])
    for runtime, label in (("", "torch eager"), ("onnx_int8_", "ONNX Runtime int8")):
        speedup = metrics[f"latency_ms_teacher_{runtime}b128"] / metrics[f"latency_ms_student_{runtime}b128"]
        assert_shows(rows[f"latency, {label}, batch 128 (ms)"]["teacher/student measured"], speedup)
    assert_shows(rows["test accuracy (%)"]["teacher measured"], metrics["teacher_test_acc"])
    assert_shows(rows["test accuracy (%)"]["student measured"], best.user_attrs["test_acc"])
    # The paper's figures, labelled reported: Table 4 and its set-up.
    assert_shows(rows["parameters"]["teacher reported"], 2_236_682)
    assert_shows(rows["parameters"]["student reported"], 543_498)
    latency = rows["latency per batch, batch size not stated (ms)"]
    assert_shows(latency["teacher reported"], 140) and assert_shows(latency["student reported"], 13)
    assert_shows(rows["test accuracy (%)"]["student reported"], 92.45)


def test_ablation_table_numbers_are_the_stored_ones(stores, ablation_report):
    study = _study(stores, "ablation")
    accuracy: dict[str, dict[int, float]] = {arm: {} for arm in ARMS}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        accuracy[trial.params["arm"]][trial.params["seed"]] = trial.user_attrs["test_acc"]
    expected = {row.arm: row for row in ablation_table(study).rows}  # the statistics ablation.py computes
    reported = reported_accuracy()
    paper = {"baseline": "Baseline Student", "kd": "KD", "ig": "IG", "kd_ig": "KD & IG"}
    rows = {row["method"]: row for row in markdown_rows(ablation_report / "tables" / "ablation.md")}
    assert_shows(rows["teacher"]["test acc mean (%)"], study.user_attrs["teacher_test_acc"])
    assert_shows(rows["teacher"]["reported acc (%)"], reported["Teacher"])
    for arm in ARMS:
        row, values = rows[arm], np.array(list(accuracy[arm].values()))
        assert int(row["n"]) == len(values) == 2
        assert_shows(row["test acc mean (%)"], values.mean())
        assert_shows(row["std"], values.std(ddof=1))
        assert row["mean ± std"] == f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
        assert_shows(row["95% CI low"], expected[arm].ci[0])
        assert_shows(row["95% CI high"], expected[arm].ci[1])
        delta = np.mean([accuracy[arm][s] - accuracy["baseline"][s] for s in accuracy[arm]])
        assert_shows(row["Δ vs baseline"], None if arm == "baseline" else delta)
        assert_shows(row["p (paired t)"], None if arm == "baseline" else expected[arm].p_value)
        for column, key in (("Spearman", "agreement_spearman"), ("IoU@10%", "agreement_iou_top10")):
            stored = [
                t.user_attrs[key] for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.params["arm"] == arm
            ]
            assert_shows(row[column], float(np.mean(stored)))
        assert_shows(row["reported acc (%)"], reported[paper[arm]])
        assert_shows(
            row["reported Δ"], None if arm == "baseline" else reported[paper[arm]] - reported[paper["baseline"]]
        )
    pairs = {row["comparison"]: row for row in markdown_rows(ablation_report / "tables" / "ablation_comparisons.md")}
    for comparison in ablation_table(study).comparisons:
        row = pairs[f"{comparison.arm} vs {comparison.reference}"]
        assert_shows(row["Δ (pp)"], comparison.delta)
        assert_shows(row["95% CI low"], comparison.ci[0])
        assert_shows(row["p (paired t)"], comparison.p_value)


# --- figures ------------------------------------------------------------------------------------


def test_compression_figure_has_every_literature_point_the_paper_and_this_study(grid_report, stores):
    figure = plotly_json(grid_report / "figures" / "compression_accuracy.html")
    traces = {trace["meta"]["row"]: trace for trace in figure["data"] if trace["meta"]["source"] != "this study"}
    table = literature()
    assert sorted(traces) == list(range(len(table)))
    for index, row in table.iterrows():
        trace = traces[index]
        assert trace["x"][0] == 1 and trace["y"][0] == row["teacher_acc"]
        if row["compression_factor"] > 0:
            assert trace["x"][1] == row["compression_factor"] and trace["y"][1] == row["student_distilled_acc"]
    [paper] = [t for t in figure["data"] if t["meta"]["source"] == "paper"]
    assert paper["x"] == [1, 4.1] and paper["y"] == [93.91, 92.45] and paper["line"]["color"] == "black"
    [ours] = [t for t in figure["data"] if t["meta"]["source"] == "this study"]
    from mlflow import MlflowClient

    best = _study(stores, "grid").best_trial
    teacher_acc = MlflowClient(stores["tracking"]).get_run(best.user_attrs["run_id"]).data.metrics["teacher_test_acc"]
    assert ours["y"] == [pytest.approx(teacher_acc), best.user_attrs["test_acc"]] and ours["x"][0] == 1
    annotations = " ".join(a["text"] for a in figure["layout"]["annotations"])
    assert "91.51%" in annotations and "9.57x" in annotations  # the paper's means


def test_grid_figures_hold_the_study(stores, grid_report):
    trials = _study(stores, "grid").get_trials(states=(TrialState.COMPLETE,))
    heatmaps = plotly_json(grid_report / "figures" / "grid_heatmaps.html")["data"]
    assert [trace["type"] for trace in heatmaps] == ["heatmap"] and heatmaps[0]["name"] == "p=0.5"
    z = heatmaps[0]["z"]
    for trial in trials:
        t, alpha = trial.params["t"], trial.params["alpha"]
        assert z[heatmaps[0]["y"].index(f"{t:g}")][heatmaps[0]["x"].index(f"{alpha:g}")] == trial.value
    history = plotly_json(grid_report / "figures" / "optimization_history.html")["data"]
    assert sorted(history[0]["y"]) == sorted(t.value for t in trials)
    # Optuna 5 draws parallel coordinates as one line per trial whose hover data holds its values.
    lines = [t for t in plotly_json(grid_report / "figures" / "parallel_coordinates.html")["data"] if "customdata" in t]
    shown = sorted(tuple(float(value) for _, value in line["customdata"]) for line in lines)
    stored = sorted((t.value, t.params["alpha"], t.params["p"], t.params["t"]) for t in trials)
    assert [name for name, _ in lines[0]["customdata"]] == ["val acc (%)", "alpha", "p", "t"] and shown == stored
    ig = plotly_json(grid_report / "figures" / "ig_examples.html")["data"]
    assert [trace["type"] for trace in ig] == ["image"] * 30
    assert {trace["name"].split(":")[0] for trace in ig} == {"original", "IG map", "overlay"}


def test_ablation_bars_hold_means_and_intervals(stores, ablation_report):
    table = ablation_table(_study(stores, "ablation"))
    bars, intervals, paper = plotly_json(ablation_report / "figures" / "ablation_bars.html")["data"][:3]
    assert bars["type"] == "bar" and bars["x"] == ARMS
    assert bars["y"] == pytest.approx([row.mean for row in table.rows])
    assert intervals["x"] == ARMS
    assert intervals["error_y"]["array"] == pytest.approx([row.ci[1] - row.mean for row in table.rows])
    assert intervals["error_y"]["arrayminus"] == pytest.approx([row.mean - row.ci[0] for row in table.rows])
    assert paper["name"] == "reported (paper)" and paper["y"] == [91.43, 92.29, 92.01, 92.45]


def test_an_arm_with_one_seed_gets_no_interval_bar():
    def row(arm, n, ci):
        return ArmRow(arm, n, 60.0, math.nan, ci, 0.0, math.nan, math.nan, math.nan)

    table = AblationTable(87.0, [row("baseline", 3, (58.0, 62.0)), row("kd", 1, (math.nan, math.nan))], [], "t")
    figure = ablation_bars(table, {}, "partial: 4 of 15 arm × seed runs complete")
    assert figure.layout.title.text == "t<br>(partial: 4 of 15 arm × seed runs complete)"
    bars, intervals = figure.data[:2]
    assert list(bars.x) == ["baseline", "kd"] and list(bars.text) == ["60.00 (n=3)", "60.00 (n=1)"]
    assert list(intervals.x) == ["baseline"] and list(intervals.error_y.array) == [2.0]


def test_the_legend_says_where_the_at_arms_reported_values_come_from():
    def row(arm):
        return ArmRow(arm, 1, 60.0, math.nan, (math.nan, math.nan), 0.0, math.nan, math.nan, math.nan)

    paper_only = AblationTable(87.0, [row("baseline"), row("kd")], [], "t")
    with_at = AblationTable(87.0, [row("baseline"), row("at")], [], "t")
    reported = {"baseline": 91.43, "kd": 92.29, "at": 91.58}
    assert ablation_bars(paper_only, reported).data[2].name == "reported (paper)"
    assert ablation_bars(with_at, reported).data[2].name == "reported (paper; AT arms: reference code)"


# --- a study still running, on another machine ------------------------------------------------


@pytest.mark.slow
def test_a_running_study_is_reported_as_partial_from_storage_alone(stores, tmp_path, monkeypatch):
    """Two of four points done, one running, one queued; reported from elsewhere, without the IG cache."""
    monkeypatch.chdir(tmp_path)
    common = ["--storage", stores["storage"], "--tracking-uri", stores["tracking"], "--cache-dir", stores["cache"]]
    common += ["--teacher-checkpoint", stores["teacher"]]
    grid = ["study", "grid", "--study", str(SMOKE), "--study-name", "running", "--max-trials", "2", "--no-progress"]
    assert main([*grid, *common, "--t", "1,2", "--alpha", "0.3,0.6", "--set", "latency.repeats=1"]) == 0
    handle = join_study("running", stores["storage"], HeartbeatConfig(interval=60, grace=600), STUDY_KINDS)
    assert claim_waiting(handle) is not None  # a worker is on it now

    out = tmp_path / "report"
    elsewhere = tmp_path / "other-machine-cache"
    args = ["report", "--study", "running", "--out", str(out), "--storage", stores["storage"]]
    assert main([*args, "--tracking-uri", stores["tracking"], "--cache-dir", str(elsewhere)]) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["partial"] is True
    assert summary["progress"] == "partial: 2 of 4 grid points complete; 1 running, 1 queued"
    ig = plotly_json(out / "figures" / "ig_examples.html")
    assert "maps computed now" in ig["layout"]["title"]["text"]  # no IG cache in this machine's cache dir
    rows = markdown_rows(out / "tables" / "trials.md")
    assert sorted(row["state"] for row in rows) == ["complete", "complete", "queued", "running"]
    for row in rows:
        assert (row["val acc (%)"] == "" and row["rank"] == "") == (row["state"] != "complete")
    assert "partial: 2 of 4" in (out / "tables" / "trials.md").read_text().splitlines()[0]
    assert "partial" in (out / "index.html").read_text()
    heatmaps = plotly_json(out / "figures" / "grid_heatmaps.html")
    assert heatmaps["layout"]["title"]["text"].endswith(
        "<br>(partial: 2 of 4 grid points complete; 1 running, 1 queued)"
    )
    [heatmap] = heatmaps["data"]
    assert sum(value is None for line in heatmap["z"] for value in line) == 2
    assert (out / "tables" / "deployment.md").is_file()


def test_the_ig_examples_need_the_teacher_on_this_machine(stores):
    spec = _study(stores, "grid").user_attrs["kdsearch"]["spec"]
    ig = ["integrated_gradients"]
    with pytest.raises(KdsearchError, match="is not on this machine"):
        attribution_examples(spec, {"teacher": {"checkpoint": "/nowhere/teacher.pt"}}, ig)
    examples = attribution_examples(spec, {"train.cache_dir": stores["cache"]}, [*ig, "grad_cam"])
    assert examples.images.shape == (10, 3, 32, 32) and len(examples.names) == 10
    assert {method: maps.shape for method, maps in examples.maps.items()} == dict.fromkeys(
        [*ig, "grad_cam"], (10, 32, 32)
    )
    assert "integrated_gradients from the cache" in examples.how and "grad_cam computed now" in examples.how


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study", "nope"], "no study 'nope' in sqlite:///"),
        (["--ablation", "grid"], "study 'grid' is a grid study; report it with --study"),
        (["--study", "ablation"], "study 'ablation' is an ablation; report it with --ablation"),
        (["--study", "grid", "--ablation", "ablation"], "give exactly one of --study NAME or --ablation NAME"),
        ([], "give exactly one of --study NAME or --ablation NAME"),
    ],
)
def test_a_report_on_a_missing_study_is_one_line_exit_2_and_writes_nothing(stores, tmp_path, args, message, capsys):
    out = tmp_path / "report"
    common = ["--storage", stores["storage"], "--tracking-uri", stores["tracking"]]
    assert main(["report", *args, "--out", str(out), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_missing_stores_are_errors_that_create_nothing(stores, tmp_path, capsys):
    out = tmp_path / "report"
    missing = f"sqlite:///{tmp_path}/none.db"
    assert main(["report", "--study", "grid", "--out", str(out), "--storage", missing]) == 2
    assert "no such file" in capsys.readouterr().err
    args = ["report", "--study", "grid", "--out", str(out), "--storage", stores["storage"], "--tracking-uri", missing]
    assert main(args) == 2
    assert "nothing was logged there" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- the pieces, without stores ----------------------------------------------------------------


def test_trials_table_ranks_by_validation_accuracy_with_ties_and_lists_unfinished_trials():
    rows = [
        {"trial": 0, "state": "complete", "params": {"t": 1.0}, "val_acc": 50.0, "test_acc": 49.0},
        {"trial": 1, "state": "running", "params": {"t": 2.0}, "val_acc": None, "test_acc": None},
        {"trial": 2, "state": "complete", "params": {"t": 3.0}, "val_acc": 60.0, "test_acc": 58.0},
        {"trial": 3, "state": "complete", "params": {"t": 4.0}, "val_acc": 50.0, "test_acc": 51.0},
    ]
    table = trials_table(rows, "t", [])
    assert table.frame["trial"].tolist() == [2, 0, 3, 1]
    assert [row["rank"] for row in markdown_rows(table.markdown())] == ["1", "2", "2", ""]


def test_deployment_table_labels_reported_and_measured():
    measured = Deployment(
        "CIFAR-10 (JPEG q75 copy)",
        "cpu:test",
        {"teacher_params": 2e6, "student_params": 5e5, "latency_ms_teacher_b1": 4.0, "latency_ms_student_b1": 1.0},
        93.0,
        92.0,
        "best trial",
    )
    table = deployment_table(measured, {("teacher", "params"): 2236682, ("student", "params"): 543498})
    rows = {row["quantity"]: row for row in markdown_rows(table.markdown())}
    assert rows["dataset"]["teacher measured"] == "CIFAR-10 (JPEG q75 copy)" and "JPEG q75" in table.title
    assert rows["latency, torch eager, batch 1 (ms)"]["teacher/student measured"] == "4.00"
    assert (
        rows["parameters"]["teacher reported"] == "2,236,682" and rows["parameters"]["teacher measured"] == "2,000,000"
    )
    assert list(table.frame.columns[1:5]) == [
        "teacher reported",
        "teacher measured",
        "student reported",
        "student measured",
    ]


@pytest.mark.parametrize("other_cores, note", [(0.02, None), (1.0, "Not a clean timing"), (None, "was not recorded")])
def test_deployment_table_says_whether_latency_was_timed_on_a_busy_machine(other_cores, note):
    metrics = {"latency_ms_teacher_b1": 4.0, "latency_ms_student_b1": 1.0}
    if other_cores is not None:
        metrics |= {"latency_ms_teacher_other_cores": 0.0, "latency_ms_student_other_cores": other_cores}
    assert timing_contention(metrics) == (other_cores if other_cores is not None else math.inf)
    notes = " ".join(deployment_table(Deployment("synthetic", "cpu:test", metrics, 1, 1, "x"), {}).notes)
    for text in ("Not a clean timing", "was not recorded"):
        assert (text in notes) == (text == note)


def test_compression_figure_means_and_a_row_without_compression():
    table = literature()
    figure = compression_accuracy(table, [Line("ours", 90.0, 4.0, 88.0)], "synthetic")
    by_row = {trace.meta["row"]: trace for trace in figure.data if trace.meta["source"] != "this study"}
    shufflenet = table.index[table["student_model"] == "ShuffleNet-v2"][0]
    assert list(by_row[shufflenet].x) == [1.0]  # no compression factor, no parameter count: teacher only
    blakeney = table.index[table["article"].str.startswith("Blakeney")][0]
    assert list(by_row[blakeney].x) == [1.0, 1.0]  # "0.00" in the table; the same parameter count
    assert figure.data[-1].name == "ours" and list(figure.data[-1].x) == [1.0, 4.0]


def test_ig_figure_is_one_column_per_image_in_three_rows():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    figure = ig_figure(images, torch.rand(4, 8, 8), ["a", "b", "c", "d"], "title")
    assert len(figure.data) == 12 and figure.data[0].name == "original: a" and figure.data[11].name == "overlay: d"
    assert all(trace.z.shape == (8, 8, 3) for trace in figure.data)


def test_a_cdn_report_leaves_plotly_js_out_and_links_the_cdn(stores, tmp_path):
    out = tmp_path / "cdn"
    assert _report(stores, "--study", "grid", out, "--plotly-js", "cdn", "--no-ig", "--no-log") == 0
    assert not (out / "figures" / "plotly.min.js").exists()
    html = (out / "figures" / "compression_accuracy.html").read_text()
    assert re.search(r"<script[^>]+src=\"https://cdn\.plot\.ly/plotly-[0-9.]+\.min\.js\"", html)
    assert plotly_json(out / "figures" / "compression_accuracy.html")["data"]
    assert _report(stores, "--study", "grid", tmp_path / "bad", "--plotly-js", "web") == 2
    assert not (tmp_path / "bad").exists()


def test_deployment_table_without_onnx_timings_says_so(ablation_report):
    table = (ablation_report / "tables" / "deployment.md").read_text()
    rows = {row["quantity"] for row in markdown_rows(table)}
    assert "latency, torch eager, batch 1 (ms)" in rows and not any("ONNX" in row for row in rows)
    assert "ONNX Runtime latencies were not measured in this study" in table
