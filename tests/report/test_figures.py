"""kdsearch.report.figures without stores or a browser: what each figure holds (traces, values, axis
titles, lines), the HTML export, and why PNG/SVG are not written when they cannot be (test_render
checks the same figures made from real studies)."""

from __future__ import annotations

import json
import math
import sys

import optuna
import pandas as pd
import torch

import kdsearch.report.figures as figures
from kdsearch.report.figures import (
    Figure,
    Line,
    ablation_bars,
    compression_accuracy,
    find_chromium,
    grid_heatmaps,
    ig_figure,
    methods_figure,
    optimization_history,
    parallel_coordinates,
    write_html,
    write_static,
)
from kdsearch.search.ablation import AblationTable, ArmRow

NAN = math.nan


def _annotations(figure) -> list[str]:
    return [annotation.text for annotation in figure.layout.annotations]


# --- compression factor vs accuracy ----------------------------------------------------------------

LITERATURE = pd.DataFrame.from_records(
    [
        # article, teacher, teacher params, student, student params, teacher acc, compression, distilled acc, note
        ("A (2020)", "ResNet-34", 21e6, "ResNet-18", 11e6, 95.0, 2.0, 93.0, None),
        ("A (2020)", "ResNet-34", 21e6, "ResNet-8", 1e6, 95.0, 6.0, 90.0, None),  # same article: one legend entry
        ("B (2021)", None, 4e6, None, 1e6, 92.0, 0.0, 91.0, None),  # no factor given: 4e6 / 1e6 from the counts
        ("C (2022)", "WRN", None, "WRN-s", None, 94.0, NAN, 92.5, None),  # neither: the teacher point alone
        ("Paper (2024)", "MobileNetV2", 2.2e6, "MobileNetV2-5", 0.55e6, 93.91, 4.1, 92.45, "this paper, Table 3"),
    ],
    columns=[
        "article", "teacher_model", "teacher_params", "student_model", "student_params", "teacher_acc",
        "compression_factor", "student_distilled_acc", "note",
    ],
)  # fmt: skip


def test_compression_figure_draws_each_row_from_its_teacher_to_its_student():
    figure = compression_accuracy(LITERATURE, [Line("this study: kd_ig", 88.0, 3.5, 86.0)], "synthetic")
    traces = list(figure.data)
    assert len(traces) == 6
    assert [(list(t.x), list(t.y)) for t in traces[:5]] == [
        ([1.0, 2.0], [95.0, 93.0]),
        ([1.0, 6.0], [95.0, 90.0]),
        ([1.0, 4.0], [92.0, 91.0]),
        ([1.0], [94.0]),
        ([1.0, 4.1], [93.91, 92.45]),
    ]
    assert [t.showlegend for t in traces[:5]] == [True, False, True, True, True]
    assert [t.meta["source"] for t in traces] == ["literature"] * 4 + ["paper", "this study"]
    assert traces[0].hovertext == "A (2020): ResNet-34 → ResNet-18" and traces[2].hovertext == "B (2021)"
    paper, ours = traces[4], traces[5]
    assert paper.line.color == "black" and paper.line.width == 3 and traces[0].line.width == 1.5
    assert traces[0].line.color == traces[1].line.color != traces[2].line.color
    assert (list(ours.x), list(ours.y), ours.name) == ([1.0, 3.5], [88.0, 86.0], "this study: kd_ig")
    assert ours.line.color == "#d62728" and ours.line.dash == "dot" and ours.marker.symbol == "star"


def test_compression_figure_means_are_over_the_literature_with_a_factor():
    figure = compression_accuracy(LITERATURE, [], "CIFAR-10")
    # Rows with a compression factor > 0, the paper left out: A's two rows.
    mean_acc, mean_cf = (93.0 + 90.0) / 2, (2.0 + 6.0) / 2
    [accuracy_line, compression_line] = figure.layout.shapes
    assert (accuracy_line.y0, accuracy_line.y1, accuracy_line.line.dash) == (mean_acc, mean_acc, "dash")
    assert (compression_line.x0, compression_line.x1) == (mean_cf, mean_cf)
    assert _annotations(figure) == ["mean accuracy 91.50%", "mean compression 4.00x"]
    assert figure.layout.xaxis.title.text == "compression factor (teacher parameters / student parameters)"
    assert figure.layout.yaxis.title.text == "test accuracy (%)"
    assert figure.layout.title.text.endswith("the paper, and this study (CIFAR-10)")


# --- ablation bars ---------------------------------------------------------------------------------


def _row(arm, mean, n=3, ci=(NAN, NAN)):
    return ArmRow(arm, n, mean, 0.5, ci, 0.0, NAN, NAN, NAN)


def test_ablation_bars_label_means_mark_the_paper_and_draw_both_teachers():
    rows = [_row("baseline", 60.0, ci=(58.0, 62.0)), _row("kd", 64.5, ci=(63.0, 66.0)), _row("ig_shuffled", 61.0)]
    figure = ablation_bars(
        AblationTable(85.0, rows, [], "Ablation"), {"baseline": 91.43, "kd": 92.29, "teacher": 93.91}
    )
    bars, intervals, paper = figure.data
    assert list(bars.x) == ["baseline", "kd", "ig_shuffled"] and list(bars.y) == [60.0, 64.5, 61.0]
    assert list(bars.text) == ["60.00 (n=3)", "64.50 (n=3)", "61.00 (n=3)"]
    assert list(intervals.x) == ["baseline", "kd"] and list(intervals.error_y.arrayminus) == [2.0, 1.5]
    assert list(paper.x) == ["baseline", "kd"] and list(paper.y) == [91.43, 92.29] and paper.marker.symbol == "diamond"
    assert _annotations(figure) == ["teacher 85.00%", "teacher (paper) 93.91%"]
    assert [shape.y0 for shape in figure.layout.shapes] == [85.0, 93.91]
    assert list(figure.layout.yaxis.range) == [50.0, 100]  # 10 below the lowest value shown, up to 100
    assert figure.layout.title.text == "Ablation" and figure.layout.xaxis.title.text == "arm"


def test_ablation_bars_of_a_study_without_results():
    figure = ablation_bars(AblationTable(None, [_row("baseline", NAN, n=0)], [], "t"), {})
    assert len(figure.data) == 2 and figure.layout.yaxis.range is None and not figure.layout.shapes


# --- grid heatmaps -----------------------------------------------------------------------------------


def test_grid_heatmaps_one_panel_per_p_with_empty_cells_for_unfinished_points():
    space = {"t": [4.0, 1.0], "alpha": [0.5, 0.1], "p": [0.5, 0.0]}  # sorted in the figure
    rows = [
        {"params": {"t": 1.0, "alpha": 0.1, "p": 0.0}, "val_acc": 70.0, "test_acc": 69.0},
        {"params": {"t": 4.0, "alpha": 0.1, "p": 0.0}, "val_acc": 72.5, "test_acc": 71.0},
        {"params": {"t": 1.0, "alpha": 0.5, "p": 0.5}, "val_acc": 75.25, "test_acc": 74.0},
        {"params": {"t": 4.0, "alpha": 0.5, "p": 0.5}, "val_acc": None, "test_acc": None},  # running
    ]
    figure = grid_heatmaps(rows, space)
    low_p, high_p = figure.data
    assert (low_p.name, high_p.name) == ("p=0", "p=0.5")
    assert list(low_p.x) == ["0.1", "0.5"] and list(low_p.y) == ["1", "4"]  # α columns, T rows
    assert [list(line) for line in low_p.z] == [[70.0, None], [72.5, None]]
    assert [list(line) for line in low_p.text] == [["70.00", ""], ["72.50", ""]]
    assert [list(line) for line in low_p.customdata] == [[69.0, None], [71.0, None]]
    assert [list(line) for line in high_p.z] == [[None, 75.25], [None, None]]
    assert _annotations(figure) == ["p = 0", "p = 0.5"]
    assert figure.layout.xaxis.title.text == "α" and figure.layout.xaxis2.title.text == "α"
    assert figure.layout.yaxis.title.text == "T" and figure.layout.yaxis2.title.text is None
    assert low_p.coloraxis == high_p.coloraxis == "coloraxis"  # one colour scale for both panels


# --- Optuna's plots ------------------------------------------------------------------------------------


def test_optuna_plots_are_titled_with_the_study():
    study = optuna.create_study(study_name="smoke-grid", direction="maximize")
    space = {"t": optuna.distributions.FloatDistribution(1, 4), "alpha": optuna.distributions.FloatDistribution(0, 1)}
    for t, value in ((1.0, 50.0), (2.0, 60.0), (4.0, 55.0)):
        study.add_trial(optuna.trial.create_trial(params={"t": t, "alpha": 0.1}, distributions=space, value=value))
    history = optimization_history(study)
    assert history.layout.title.text == "Optimisation history of smoke-grid (validation accuracy)"
    assert list(history.data[0].y) == [50.0, 60.0, 55.0]
    coordinates = parallel_coordinates(study, ["t", "alpha"])
    assert coordinates.layout.title.text == "Parallel coordinates of smoke-grid: t, alpha → val acc"


# --- IG figure -------------------------------------------------------------------------------------------


def test_ig_figure_overlays_each_image_with_its_min_max_scaled_map():
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    images[0, 0] = 200  # red channel of the first image
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[5.0, 5.0], [5.0, 5.0]]])
    figure = ig_figure(images, maps, ["cat", "dog"], "IG")
    assert [trace.name for trace in figure.data] == [
        "original: cat", "original: dog", "IG map: cat", "IG map: dog", "overlay: cat", "overlay: dog",
    ]  # fmt: skip
    original, overlay = figure.data[0].z, figure.data[4].z
    assert original.shape == (2, 2, 3) and original[1, 1].tolist() == [200, 0, 0]
    # overlay = 0.5 x + 0.5 (map - min) / (max - min), in bytes: pixel (0, 1) of the map is 1/4 of its range.
    assert overlay[0, 1].tolist() == [round(100 + 255 * 0.125)] + [round(255 * 0.125)] * 2  # 132, 32, 32
    assert overlay[1, 0].tolist() == [round(100 + 255 * 0.25)] + [round(255 * 0.25)] * 2  # 2/4 of the range
    assert figure.data[5].z.max() == 0  # a flat map scales to 0, not a division by zero
    hot = figure.data[2].z  # "hot": black at the minimum, white at the maximum
    assert hot[0, 0].tolist() == [0, 0, 0] and hot[1, 1].tolist() == [255, 255, 255]
    assert [a.text for a in figure.layout.annotations] == ["cat", "dog", "original", "IG map", "overlay"]
    assert figure.layout.xaxis.visible is False and figure.layout.title.text == "IG"


# --- export ----------------------------------------------------------------------------------------------


def test_write_html_puts_plotly_js_beside_the_figure_or_links_the_cdn(tmp_path):
    figure = Figure("bars", "Bars", ablation_bars(AblationTable(85.0, [_row("kd", 61.0)], [], "t"), {}))
    path = write_html(figure, tmp_path)
    html = path.read_text()
    assert path == tmp_path / "bars.html" and (tmp_path / "plotly.min.js").is_file()
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in html
    assert json.dumps("61.00 (n=3)") in html  # the figure's data is in the page
    cdn = tmp_path / "cdn"
    cdn.mkdir()
    html = write_html(figure, cdn, plotly_js="cdn").read_text()
    assert "https://cdn.plot.ly/plotly-" in html and not (cdn / "plotly.min.js").exists()


def test_find_chromium_prefers_the_environment(monkeypatch):
    monkeypatch.setattr(figures.shutil, "which", lambda name: f"/opt/bin/{name}" if name == "google-chrome" else None)
    monkeypatch.delenv("KDSEARCH_CHROMIUM", raising=False)
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    assert find_chromium() == "/opt/bin/google-chrome"  # the first candidate on PATH
    monkeypatch.setenv("BROWSER_PATH", "/kaleido/chrome")
    assert find_chromium() == "/kaleido/chrome"
    monkeypatch.setenv("KDSEARCH_CHROMIUM", "/mine/chromium")
    assert find_chromium() == "/mine/chromium"
    monkeypatch.setattr(figures.shutil, "which", lambda name: None)
    monkeypatch.delenv("KDSEARCH_CHROMIUM")
    monkeypatch.delenv("BROWSER_PATH")
    assert find_chromium() is None


def test_write_static_says_why_it_wrote_nothing(tmp_path, monkeypatch):
    figure = Figure("f", "F", compression_accuracy(LITERATURE, [], "x"))
    monkeypatch.setattr(figures, "find_chromium", lambda: None)
    assert write_static([figure], tmp_path) == (
        "PNG/SVG not written: no Chromium found (apt-get install chromium, or set KDSEARCH_CHROMIUM)"
    )
    monkeypatch.setattr(figures, "find_chromium", lambda: "/usr/bin/chromium")
    monkeypatch.setitem(sys.modules, "kaleido", None)  # as if not installed
    assert write_static([figure], tmp_path) == "PNG/SVG not written: kaleido is not installed (pip install kaleido)"
    assert list(tmp_path.iterdir()) == []


def test_write_static_reports_a_browser_that_fails(tmp_path, monkeypatch):
    figure = Figure("f", "F", compression_accuracy(LITERATURE, [], "x"))
    monkeypatch.setattr(figures, "find_chromium", lambda: str(tmp_path / "no-such-browser"))
    reason = write_static([figure], tmp_path)
    assert reason.startswith(f"PNG/SVG not written: rendering with {tmp_path / 'no-such-browser'} failed (")
    assert not (tmp_path / "f.png").exists()


def test_the_methods_figure_has_a_row_of_maps_per_method_under_the_originals():
    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    maps = {"saliency": torch.rand(3, 4, 4), "grad_cam": torch.zeros(3, 4, 4)}
    figure = methods_figure(images, maps, ["cat", "dog", "ship"], "maps")
    assert [trace.name for trace in figure.data[::3]] == ["original: cat", "saliency: cat", "grad_cam: cat"]
    assert figure.data[0].z.tolist() == images[0].permute(1, 2, 0).tolist()
    assert figure.data[3].z.max() == 255 and figure.data[6].z.max() == 0  # hot scales each map; a flat one is black
    assert [annotation.text for annotation in figure.layout.annotations][:3] == ["cat", "dog", "ship"]
