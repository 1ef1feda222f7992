"""The report's plotly figures, and their export as interactive HTML, PNG and SVG.

PNG and SVG are rendered by kaleido, which drives a headless Chromium: Debian's ``chromium`` package,
or any Chrome named by ``KDSEARCH_CHROMIUM`` (or kaleido's own ``BROWSER_PATH``). plotly.js comes
from the plotly package and MathJax is off, so nothing is fetched from the network. Without a browser
(or kaleido) the figures are written as HTML only and the report says why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from kdsearch.report.tables import REFERENCE_AT_ACCURACY

log = logging.getLogger(__name__)

# Debian's real binary first: its /usr/bin/chromium launcher is a shell script that can print
# warnings of its own on every start.
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome", "chrome")
QUIET_LOGGERS = ("choreographer", "kaleido", "logistro")
PAPER_COLOUR = "black"
OURS_COLOUR = "#d62728"


@dataclass
class Figure:
    name: str  # file stem
    title: str
    figure: go.Figure
    width: int = 900  # pixels of the PNG/SVG (the PNG is rendered at scale 2)
    height: int = 600


def find_chromium() -> str | None:
    """A Chromium or Chrome executable, or None."""
    for variable in ("KDSEARCH_CHROMIUM", "BROWSER_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


# --- compression factor vs accuracy (the paper's Fig. 1) ---------------------------------------


@dataclass
class Line:
    """A teacher → student pair drawn as a line from (1, teacher accuracy) to (compression, student accuracy)."""

    name: str
    teacher_acc: float
    compression: float
    student_acc: float


def compression_accuracy(literature: pd.DataFrame, ours: Sequence[Line], dataset: str) -> go.Figure:
    """Every literature row as a teacher (x = 1) → student (x = its compression factor) line, the paper's
    row in black, this study's pair in red, and the literature means as dashed lines.

    A row without a compression factor (or with 0) is placed by its parameter counts when it has them;
    a row without either has only its teacher point. The means are over the literature rows with a
    compression factor > 0 (as the paper's 91.51% and 9.57x are).
    """
    # Long because each literature row, the paper and this study are traces of one figure; split, the order would hide.
    figure = go.Figure()
    seen: set[str] = set()
    palette = qualitative.Plotly + qualitative.D3
    colours = {article: palette[i % len(palette)] for i, article in enumerate(dict.fromkeys(literature["article"]))}
    for index, row in literature.iterrows():
        compression = _compression(row)
        paper = str(row.get("note", "")).startswith("this paper")
        xs, ys = [1.0], [float(row["teacher_acc"])]
        if compression is not None and not math.isnan(float(row["student_distilled_acc"])):
            xs.append(compression)
            ys.append(float(row["student_distilled_acc"]))
        models = " → ".join(str(row[k]) for k in ("teacher_model", "student_model") if isinstance(row[k], str))
        figure.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=row["article"],
                legendgroup=row["article"],
                showlegend=row["article"] not in seen,
                line={"color": PAPER_COLOUR if paper else colours[row["article"]], "width": 3 if paper else 1.5},
                marker={"size": 9 if paper else 7},
                hovertext=f"{row['article']}: {models}" if models else row["article"],
                meta={"source": "paper" if paper else "literature", "row": int(index)},
            )
        )
        seen.add(row["article"])
    for line in ours:
        figure.add_trace(
            go.Scatter(
                x=[1.0, line.compression],
                y=[line.teacher_acc, line.student_acc],
                mode="lines+markers",
                name=line.name,
                line={"color": OURS_COLOUR, "width": 3, "dash": "dot"},
                marker={"size": 12, "symbol": "star"},
                meta={"source": "this study"},
            )
        )
    reference = literature[~literature["note"].fillna("").str.startswith("this paper")]
    reference = reference[reference["compression_factor"] > 0]
    mean_acc, mean_cf = reference["student_distilled_acc"].mean(), reference["compression_factor"].mean()
    figure.add_hline(
        y=mean_acc, line={"color": "blue", "dash": "dash"}, annotation_text=f"mean accuracy {mean_acc:.2f}%"
    )
    figure.add_vline(
        x=mean_cf, line={"color": "red", "dash": "dash"}, annotation_text=f"mean compression {mean_cf:.2f}x"
    )
    figure.update_layout(
        title=f"Compression factor vs accuracy: literature on CIFAR-10, the paper, and this study ({dataset})",
        xaxis_title="compression factor (teacher parameters / student parameters)",
        yaxis_title="test accuracy (%)",
        legend={"font": {"size": 10}},
        template="plotly_white",
    )
    return figure


def _compression(row: pd.Series) -> float | None:
    value = row.get("compression_factor")
    if value is not None and not math.isnan(float(value)) and float(value) > 0:
        return float(value)
    teacher, student = row.get("teacher_params"), row.get("student_params")
    if teacher and student and not (math.isnan(float(teacher)) or math.isnan(float(student))):
        return float(teacher) / float(student)
    return None


# --- ablation ---------------------------------------------------------------------------------


def ablation_bars(table, reported: dict[str, float], progress: str = "") -> go.Figure:
    """Mean test accuracy per arm with its 95% t-interval, the paper's figures as markers, the teacher as a line.

    ``table``: kdsearch.search.ablation's AblationTable; ``reported``: the paper's accuracy by arm name;
    ``progress``: how far a partial study got, shown under the title (one line is wider than the figure).
    """
    # Long because the figure is five traces (means, intervals, reported values, teacher, labels) built in order.
    arms = [row.arm for row in table.rows]
    means = [row.mean for row in table.rows]
    figure = go.Figure(
        go.Bar(
            x=arms,
            y=means,
            name="measured: mean",
            text=[f"{row.mean:.2f} (n={row.n})" for row in table.rows],
            textposition="inside",
            insidetextanchor="end",  # the top: the axis starts well above 0, hiding the base
        )
    )
    # Intervals in a trace of their own, for the arms that have one: plotly draws a missing (null) error
    # value as a zero-width interval, which would make an arm with one seed look exactly measured.
    with_interval = [row for row in table.rows if not math.isnan(row.ci[0])]
    figure.add_trace(
        go.Scatter(
            x=[row.arm for row in with_interval],
            y=[row.mean for row in with_interval],
            mode="markers",
            marker={"size": 1, "color": "black"},
            name="95% CI (n >= 2)",
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [row.ci[1] - row.mean for row in with_interval],
                "arrayminus": [row.mean - row.ci[0] for row in with_interval],
                "color": "black",
            },
        )
    )
    paper = [(arm, reported[arm]) for arm in arms if arm in reported]
    if paper:
        figure.add_trace(
            go.Scatter(
                x=[arm for arm, _ in paper],
                y=[value for _, value in paper],
                mode="markers",
                marker={"symbol": "diamond", "size": 12, "color": PAPER_COLOUR},
                # The paper has no AT arms: their values are the reference implementation's saved students.
                name="reported (paper; AT arms: reference code)"
                if any(arm in REFERENCE_AT_ACCURACY for arm, _ in paper)
                else "reported (paper)",
            )
        )
    if table.teacher_test_acc is not None:
        figure.add_hline(
            y=table.teacher_test_acc,
            line={"dash": "dash", "color": "grey"},
            annotation_text=f"teacher {table.teacher_test_acc:.2f}%",
        )
    if "teacher" in reported:
        figure.add_hline(
            y=reported["teacher"],
            line={"dash": "dot", "color": PAPER_COLOUR},
            annotation_text=f"teacher (paper) {reported['teacher']:.2f}%",
            annotation_position="bottom right",
        )
    values = [v for v in means + [value for _, value in paper] if not math.isnan(v)]
    low = min(values + [table.teacher_test_acc or math.inf]) if values else 0
    figure.update_layout(
        title=f"{table.title}<br>({progress})" if progress else table.title,
        xaxis_title="arm",
        yaxis_title="test accuracy (%)",
        yaxis_range=[max(0.0, low - 10), 100] if values else None,
        template="plotly_white",
    )
    return figure


# --- a grid study -----------------------------------------------------------------------------


def grid_heatmaps(rows: Sequence[dict], space: dict[str, list[float]]) -> go.Figure:
    """Validation accuracy over T (rows) × α (columns), one panel per p; empty cells are not complete yet.

    ``rows``: {"params": {"t", "alpha", "p"}, "val_acc", "test_acc"} per complete trial. A grid with more
    axes (gamma, student) shows each cell's best point over them, and says so in the title.
    """
    ts, alphas, ps = sorted(space["t"]), sorted(space["alpha"]), sorted(space["p"])
    figure = make_subplots(rows=1, cols=len(ps), subplot_titles=[f"p = {p:g}" for p in ps], horizontal_spacing=0.08)
    found: dict[tuple, dict] = {}
    for row in (r for r in rows if r.get("val_acc") is not None):
        cell = (row["params"]["t"], row["params"]["alpha"], row["params"]["p"])
        if cell not in found or row["val_acc"] > found[cell]["val_acc"]:
            found[cell] = row
    others = [name for name in space if name not in ("t", "alpha", "p")]
    for column, p in enumerate(ps, start=1):
        cells = [[found.get((t, alpha, p)) for alpha in alphas] for t in ts]
        figure.add_trace(
            go.Heatmap(
                x=[f"{alpha:g}" for alpha in alphas],
                y=[f"{t:g}" for t in ts],
                z=[[cell["val_acc"] if cell else None for cell in line] for line in cells],
                text=[[f"{cell['val_acc']:.2f}" if cell else "" for cell in line] for line in cells],
                customdata=[[cell.get("test_acc") if cell else None for cell in line] for line in cells],
                texttemplate="%{text}",
                hovertemplate="T=%{y} α=%{x}<br>val %{z:.2f}%<br>test %{customdata:.2f}%<extra></extra>",
                coloraxis="coloraxis",
                name=f"p={p:g}",
            ),
            row=1,
            col=column,
        )
        figure.update_xaxes(title_text="α", type="category", row=1, col=column)
        figure.update_yaxes(title_text="T" if column == 1 else None, type="category", row=1, col=column)
    figure.update_layout(
        title="Validation accuracy (%) of each grid point: T × α, one panel per p"
        + (f" (each cell the best over {' and '.join(others)})" if others else ""),
        coloraxis={"colorscale": "Viridis", "colorbar": {"title": "val acc (%)"}},
        template="plotly_white",
    )
    return figure


# --- Optuna's own plots ------------------------------------------------------------------------


def optimization_history(study) -> go.Figure:
    import optuna.visualization as visualization

    figure = visualization.plot_optimization_history(study, target_name="val acc (%)")
    figure.update_layout(title=f"Optimisation history of {study.study_name} (validation accuracy)")
    return figure


def parallel_coordinates(study, params: list[str]) -> go.Figure:
    import optuna.visualization as visualization

    figure = visualization.plot_parallel_coordinate(study, params=params, target_name="val acc (%)")
    figure.update_layout(title=f"Parallel coordinates of {study.study_name}: {', '.join(params)} → val acc")
    return figure


# --- attribution maps (the paper's Fig. 3) -----------------------------------------------------


def ig_figure(images: torch.Tensor, maps: torch.Tensor, names: Sequence[str], title: str) -> go.Figure:
    """One column per image: the original, its IG map ("hot" colours) and the overlay 0.5·x + 0.5·IG.

    ``images`` (N, 3, H, W) uint8, ``maps`` (N, H, W) non-negative; the overlay is Eq. 7 with s = 1.
    """
    pixels = images.float() / 255
    low = maps.amin(dim=(1, 2), keepdim=True)
    scaled = (maps - low) / (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    rows = {"original": pixels, "IG map": _heat(maps), "overlay": 0.5 * pixels + 0.5 * scaled.unsqueeze(1)}
    return _image_grid(rows, names, title)


def methods_figure(images: torch.Tensor, maps: dict[str, torch.Tensor], names: Sequence[str], title: str) -> go.Figure:
    """One column per image: the original, then one row per attribution method with its map ("hot" colours).

    ``images`` (N, 3, H, W) uint8; ``maps`` by method, each (N, H, W) non-negative.
    """
    return _image_grid(
        {"original": images.float() / 255, **{m: _heat(found) for m, found in maps.items()}}, names, title
    )


def _heat(maps: torch.Tensor) -> torch.Tensor:
    from kdsearch.distill.attribution import heat

    return torch.stack([heat(m) for m in maps.float()])


def _image_grid(rows: dict[str, torch.Tensor], names: Sequence[str], title: str) -> go.Figure:
    """A grid of images: one row per entry of ``rows`` ((N, 3, H, W) in [0, 1]), one column per name."""
    figure = make_subplots(
        rows=len(rows),
        cols=len(names),
        column_titles=list(names),
        row_titles=list(rows),
        horizontal_spacing=0.01,
        vertical_spacing=0.02,
    )
    for row, (label, tiles) in enumerate(rows.items(), start=1):
        as_bytes = (tiles.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for column, name in enumerate(names, start=1):
            figure.add_trace(go.Image(z=as_bytes[column - 1], name=f"{label}: {name}"), row=row, col=column)
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(title=title, margin={"l": 20, "r": 40, "t": 90, "b": 20}, template="plotly_white")
    return figure


# --- export -----------------------------------------------------------------------------------


PLOTLY_JS = {"local": "directory", "cdn": "cdn"}  # --plotly-js → plotly's include_plotlyjs


def write_html(figure: Figure, directory: Path, plotly_js: str = "local") -> Path:
    """``<name>.html``, interactive. plotly.js sits once beside it (plotly.min.js, 3.5 MB), so it works
    offline; ``plotly_js="cdn"`` loads it from plotly's CDN instead, for reports kept in git."""
    path = directory / f"{figure.name}.html"
    figure.figure.write_html(path, include_plotlyjs=PLOTLY_JS[plotly_js], full_html=True)
    return path


def write_static(figures: Sequence[Figure], directory: Path, formats: Sequence[str] = ("png", "svg")) -> str | None:
    """``<name>.png`` and ``<name>.svg`` of every figure, in one browser session.

    Returns None when all were written, else why none were (no browser, no kaleido, a render error).
    """
    browser = find_chromium()
    if browser is None:
        return "PNG/SVG not written: no Chromium found (apt-get install chromium, or set KDSEARCH_CHROMIUM)"
    try:
        import kaleido
    except ImportError:
        return "PNG/SVG not written: kaleido is not installed (pip install kaleido)"
    jobs = [
        {
            "fig": figure.figure,
            "path": directory / f"{figure.name}.{suffix}",
            "opts": {
                "format": suffix,
                "width": figure.width,
                "height": figure.height,
                "scale": 2 if suffix == "png" else 1,
            },
        }
        for figure in figures
        for suffix in formats
    ]

    async def render() -> None:
        async with kaleido.Kaleido(n=1, timeout=120, mathjax=False, path=browser) as renderer:
            await renderer.write_fig_from_object(jobs, cancel_on_error=True)

    for name in QUIET_LOGGERS:  # their INFO lines (temporary directories, tabs) are not the user's business
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    try:
        with _quiet(*QUIET_LOGGERS):
            _run(render())
    except Exception as error:  # the browser's failures come in many types: any means "no static images"
        log.warning("static export failed: %s", error)
        return f"PNG/SVG not written: rendering with {browser} failed ({type(error).__name__}: {error})"
    return None


def _run(coroutine) -> None:
    """asyncio.run, also from a thread that already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


@contextlib.contextmanager
def _quiet(*names: str):
    # choreographer logs a traceback for a harmless, half-read message from the closing browser.
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
