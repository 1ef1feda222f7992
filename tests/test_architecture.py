"""The package's structure: imports flow one way, registries match the names the configs accept, and
every ``--help`` answers without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from kdsearch import ablation, attribution, augment, config, data, models, pareto, pruning, search, studyfile
from kdsearch.kinds import STUDY_KINDS

PACKAGE = Path(__file__).resolve().parents[1] / "kdsearch"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module → kdsearch modules it imports, anywhere in the file (top level and inside functions)."""
    modules = {path.stem for path in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "kdsearch" and len(parts) > 1 and parts[1] in modules:
                    targets.add(parts[1])
        graph[path.stem] = targets - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_an_in_function_import(tmp_path):
    (tmp_path / "a.py").write_text("from kdsearch.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from kdsearch import c\n")
    (tmp_path / "c.py").write_text("import kdsearch.a\n")
    (tmp_path / "d.py").write_text("from kdsearch.a import y\n")
    assert cycles(import_graph(tmp_path)) == [["a", "b", "c"]]


def test_kdsearch_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert "study" in graph["search"] and "kinds" in graph["cli_study"]  # the walk sees the real imports
    assert cycles(graph) == []


def test_only_the_top_knows_every_study_kind():
    graph = import_graph(PACKAGE)
    engine = {"study", "trial", "train", "studyfile", "config", "search", "ablation"}
    assert not any("kinds" in graph[module] for module in engine)
    assert set(STUDY_KINDS) == {"grid", "tpe", "ablation", "pareto"}


@pytest.mark.parametrize(
    ("registry", "names"),
    [
        (data.DATASETS, config.Dataset),
        (models.ARCHITECTURES, config.Architecture),
        (models.NORMALIZATIONS, config.Normalization),
        (attribution.BASELINES, config.IGBaseline),
        (augment.OVERLAY_MODES, config.OverlayMode),
        (search.PRUNERS, studyfile.Pruner),
        (ablation.ARMS, studyfile.Arm),
        (pruning.IMPORTANCES, config.Importance),
        (pareto.SAMPLERS, config.ParetoSampler),
    ],
)
def test_every_registry_is_keyed_by_exactly_the_names_its_config_accepts(registry, names):
    assert set(registry) == set(names)


def _commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, command in click_group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_help_answers_without_importing_torch():
    from kdsearch.cli import app

    commands = [list(command) for command in _commands(app)]
    assert len(commands) >= 13
    script = (
        "import sys, json\nfrom kdsearch.cli import main\n"
        "for command in json.loads(sys.argv[1]):\n"
        "    try:\n        main([*command, '--help'])\n    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), (command, exit.code)\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'captum', 'mlflow') if m in sys.modules))\n"
    )
    import json

    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps([[], *commands])], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"
