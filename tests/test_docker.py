"""docker/: no Docker engine runs here, so the files are parsed and every kdsearch command that
compose.yaml would run is parsed by the real CLI (options, types, required values), without running it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
import yaml

from kdsearch.cli import app

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, nested, with the defaults (this environment's variables are ignored)."""
    pattern = re.compile(r"\$\{(\w+)(?::-((?:[^${}]|\$\{[^}]*\})*))?\}")
    while pattern.search(value):
        value = pattern.sub(lambda m: m.group(2) or "", value)
    return value


def _kdsearch_services() -> dict[str, list[str]]:
    return {
        name: [_interpolate(str(arg)) for arg in service["command"]]
        for name, service in COMPOSE["services"].items()
        if "build" in service and "entrypoint" not in service
    }


def dry_parse(args: list[str]) -> dict:
    """Parse ``kdsearch ARGS`` as the CLI would and return the command's parameters, without running it."""
    root = typer.main.get_command(app)
    command = root
    for name in args:  # walk down the groups the arguments name, to the command that would run
        if name not in getattr(command, "commands", {}):
            break
        command = command.commands[name]
    received = {}
    command.callback = lambda **params: received.update(params)
    root.main(args=args, prog_name="kdsearch", standalone_mode=False)
    return received


def test_compose_has_the_services_of_a_distributed_study():
    services = COMPOSE["services"]
    assert {"postgres", "mlflow", "study", "worker"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow"] and mlflow["command"][0] == "server"
    assert any("--backend-store-uri=postgresql" in arg for arg in mlflow["command"])
    assert any(arg.startswith("--artifacts-destination=") for arg in mlflow["command"])
    assert any(volume.startswith("mlartifacts:") for volume in mlflow["volumes"])
    worker = services["worker"]
    assert _interpolate(str(worker["deploy"]["replicas"])) == "2"
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]


@pytest.mark.parametrize("service", sorted(_kdsearch_services()))
def test_each_kdsearch_command_is_accepted_by_the_cli_parser(service, monkeypatch):
    args = _kdsearch_services()[service]
    environment = {
        key: _interpolate(value) for key, value in COMPOSE["services"][service].get("environment", {}).items()
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)  # options read KDSEARCH_STORAGE and MLFLOW_TRACKING_URI from here
    monkeypatch.chdir(DOCKER.parent)  # the image's working directory holds studies/ as the repo does
    params = dry_parse(args)
    assert params, f"{service}: {args} did not reach a command"
    assert params["storage"] == environment["KDSEARCH_STORAGE"]
    assert params["tracking_uri"] == environment["MLFLOW_TRACKING_URI"]
    if any(arg.startswith("--study=") for arg in args):
        assert Path(params["study_file"]).is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["study", "worker", "--study-name", "s", "--no-such-option"],
        ["study", "worker", "--study-name", "s", "--wait", "soon"],
        ["study", "worker"],  # --study-name is required
        ["study", "wroker", "--study-name", "s"],
    ],
)
def test_dry_parse_rejects_what_the_cli_rejects(args):
    with pytest.raises(typer.TyperException):
        dry_parse(args)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cuda", "Dockerfile.cpu"])
def test_dockerfiles_install_kdsearch_as_the_entrypoint(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert text.startswith("#") and "\nFROM " in text
    assert 'ENTRYPOINT ["kdsearch"]' in text and '".[postgres]"' in text
    assert "COPY studies" in text and "KDSEARCH_CACHE_DIR=/cache" in text
    makefile = (DOCKER.parent / "Makefile").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", makefile).group(1)
    assert f"TORCH_VERSION={torch_pin}" in text  # the image runs the torch that CI tests


def test_interpolation_of_nested_defaults():
    assert _interpolate("${NOPE:-a${ALSO_NOPE:-b}c}") == "abc"
