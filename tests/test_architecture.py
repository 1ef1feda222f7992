"""The package's structure: layers import only downward, imports flow one way, registries match the
names the configs accept, and every ``--help`` answers without importing torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdsearch import config
from kdsearch.data import datasets
from kdsearch.distill import attribution, augment
from kdsearch.models import classifiers, pruning
from kdsearch.search import ablation, pareto, studyfile, tune
from kdsearch.search.kinds import STUDY_KINDS

PACKAGE = Path(__file__).resolve().parents[1] / "kdsearch"

# The layers, from the ground up (README "Layout"): a module may import its own package and packages of
# lower layers only. Packages on one layer do not import each other. ``__init__`` (the public API) is the top.
LAYERS = {
    "errors": 0,
    "config": 1,
    "infra": 2,
    "data": 3,
    "models": 3,
    "track": 3,
    "distill": 4,
    "runtime": 4,
    "serve": 4,
    "search": 5,
    "report": 6,
    "deploy": 6,
    "cli": 7,
    "__init__": 8,
}


def module_name(path: Path, package: Path) -> str:
    """``search/study.py`` → "search.study"; a package's ``__init__.py`` → the package ("search", or "__init__" at the root)."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module → kdsearch modules it imports, anywhere in the file (top level and inside functions), over
    every module under ``package`` recursively."""
    paths = sorted(package.rglob("*.py"))
    modules = {module_name(path, package) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                # `from kdsearch.report import figures` imports report.figures; `from kdsearch.errors import X`, errors.
                imported = [f"{node.module}.{alias.name}" for alias in node.names]
                names = [
                    name if _module(name, modules) == name.removeprefix("kdsearch.") else node.module
                    for name in imported
                ]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            targets |= {found for name in names if (found := _module(name, modules)) is not None}
        name = module_name(path, package)
        graph[name] = targets - {name}
    return graph


def _module(dotted: str, modules: set[str]) -> str | None:
    """The longest kdsearch module that ``dotted`` starts with (``kdsearch.search.study.run`` → "search.study")."""
    parts = dotted.split(".")
    if parts[0] != "kdsearch":
        return None
    if dotted == "kdsearch":
        return "__init__"  # the public API: `from kdsearch import train`
    for end in range(len(parts), 1, -1):
        if ".".join(parts[1:end]) in modules:
            return ".".join(parts[1:end])
    return None


def layer_of(module: str) -> str:
    return module.split(".")[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import into a layer not below the importer's (own package excepted); a package missing from
    LAYERS is reported too, so a new package must be placed in the table."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = layer_of(module), layer_of(target)
            if here not in LAYERS or there not in LAYERS:
                found.append(f"{module} -> {target}: package not in LAYERS")
            elif here != there and LAYERS[there] >= LAYERS[here]:
                found.append(f"{module} (layer {LAYERS[here]}) -> {target} (layer {LAYERS[there]})")
    return found


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


def planted_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_walk_finds_a_planted_cycle_in_subpackages_through_an_in_function_import(tmp_path):
    package = planted_package(
        tmp_path,
        {
            "__init__.py": "",
            "search/__init__.py": "",
            "search/a.py": "from kdsearch.search.b import x\n",
            "search/b.py": "def f():\n    from kdsearch.report import c\n",
            "report/__init__.py": "",
            "report/c.py": "import kdsearch.search.a\n",
            "report/d.py": "from kdsearch.search.a import y\n",
        },
    )
    assert cycles(import_graph(package)) == [["report.c", "search.a", "search.b"]]


def test_the_layer_check_finds_a_planted_upward_import_and_an_unplaced_package(tmp_path):
    package = planted_package(
        tmp_path,
        {
            "config.py": "from kdsearch.errors import ConfigError\n",
            "errors.py": "",
            "models/__init__.py": "",
            "models/net.py": "from kdsearch.config import ModelConfig\nfrom kdsearch.models import other\n",
            "models/other.py": "",
            "distill/__init__.py": "",
            "distill/train.py": "def f():\n    from kdsearch.search import study\n",  # up: distill is below search
            "search/__init__.py": "",
            "search/study.py": "from kdsearch.distill.train import f\nfrom kdsearch.track import t\n",
            "track/__init__.py": "",
            "track/t.py": "from kdsearch.models.net import n\n",  # sideways: models and track share a layer
            "extras/x.py": "from kdsearch.config import C\n",
            "models/api_user.py": "from kdsearch import TrainConfig\n",  # up: the public API is the top
        },
    )
    assert upward_imports(import_graph(package)) == [
        "distill.train (layer 4) -> search.study (layer 5)",
        "extras.x -> config: package not in LAYERS",
        "models.api_user (layer 3) -> __init__ (layer 8)",
        "track.t (layer 3) -> models.net (layer 3)",
    ]


def test_kdsearch_imports_only_down_the_layer_table():
    graph = import_graph(PACKAGE)
    # The walk sees the real modules and imports, in every subpackage.
    assert len(graph) >= 45 and "search.study" in graph["search.tune"] and "search.kinds" in graph["cli.study"]
    assert {layer_of(module) for module in graph} == set(LAYERS)
    assert upward_imports(graph) == []


def test_kdsearch_has_no_import_cycles():
    assert cycles(import_graph(PACKAGE)) == []


def test_only_the_root_holds_modules_outside_packages():
    loose = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "config.py", "errors.py"]


def test_only_the_top_knows_every_study_kind():
    graph = import_graph(PACKAGE)
    engine = {
        "search.study",
        "search.trial",
        "distill.train",
        "search.studyfile",
        "config",
        "search.tune",
        "search.ablation",
    }
    assert not any("search.kinds" in graph[module] for module in engine)
    assert set(STUDY_KINDS) == {"grid", "tpe", "ablation", "pareto"}


@pytest.mark.parametrize(
    ("registry", "names"),
    [
        (datasets.DATASETS, config.Dataset),
        (classifiers.ARCHITECTURES, config.Architecture),
        (classifiers.NORMALIZATIONS, config.Normalization),
        (attribution.BASELINES, config.IGBaseline),
        (attribution.METHODS, config.AttributionMethod),
        (augment.OVERLAY_MODES, config.OverlayMode),
        (tune.PRUNERS, studyfile.Pruner),
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
    from kdsearch.cli.main import app

    commands = [list(command) for command in _commands(app)]
    assert len(commands) >= 13
    script = (
        "import sys, json\nfrom kdsearch.cli.main import main\n"
        "for command in json.loads(sys.argv[1]):\n"
        "    try:\n        main([*command, '--help'])\n    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), (command, exit.code)\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'captum', 'mlflow') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps([[], *commands])], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_public_api_names_resolve_lazily_without_importing_torch():
    import kdsearch
    from kdsearch.distill.train import train
    from kdsearch.search.launch import Workspace

    assert kdsearch.train is train and kdsearch.Workspace is Workspace
    assert all(getattr(kdsearch, name) is not None for name in kdsearch.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kdsearch.nope  # noqa: B018
    script = "import sys, kdsearch; kdsearch.TrainConfig; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
