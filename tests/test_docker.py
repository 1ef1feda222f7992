"""docker/: static checks, without a container engine. The Dockerfiles, compose files and Kubernetes
manifests are parsed; every kdsearch command the compose stack or the cluster would run is parsed by the
real CLI (options, types, required values), without running it; compose.check.yaml is merged over
compose.yaml as Compose does. The stack itself is run for real, with podman, by bench/container_check.sh
(see bench/container_check.md), and the manifests by bench/kube_check.sh (bench/kube_check.md)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

from kdsearch.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


class _Reset:
    """Compose's `!reset`: the key is removed from what the earlier files said."""


class _Override:
    """Compose's `!override VALUE`: VALUE replaces what the earlier files said instead of merging."""

    def __init__(self, value):
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def _construct_override(loader, node):
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    return _Override(loader.construct_scalar(node))


_ComposeLoader.add_constructor("!override", _construct_override)


def _load(name: str) -> dict:
    return yaml.load((DOCKER / name).read_text(), Loader=_ComposeLoader)


COMPOSE = _load("compose.yaml")
CHECK_OVERRIDE = _load("compose.check.yaml")


def _merge(base, override, key: str | None = None):
    """Compose's merge of a later file into an earlier one: mappings key by key, `command` and
    `entrypoint` replaced, other sequences (ports, volumes) appended, `!reset` and `!override` honoured."""
    if isinstance(override, _Reset):
        return _Reset()
    if isinstance(override, _Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = _merge(base[name], value, name) if name in base else value
        return {name: value for name, value in merged.items() if not isinstance(value, _Reset)}
    if isinstance(base, list) and isinstance(override, list) and key not in ("command", "entrypoint"):
        return base + override
    return override


MERGED = _merge(COMPOSE, CHECK_OVERRIDE)


def _interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default}, nested, with `env` as the environment (not this process's)."""
    env = env or {}
    pattern = re.compile(r"\$\{(\w+)(?::-((?:[^${}]|\$\{[^}]*\})*))?\}")
    while pattern.search(value):
        value = pattern.sub(lambda m: env.get(m.group(1)) or m.group(2) or "", value)
    return value


def _kdsearch_services(compose: dict) -> dict[str, list[str]]:
    return {
        name: [_interpolate(str(arg)) for arg in service["command"]]
        for name, service in compose["services"].items()
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


# --- compose.yaml: what real users run -----------------------------------------------------------


def test_compose_has_the_services_of_a_distributed_study():
    services = COMPOSE["services"]
    assert {"postgres", "mlflow", "study", "worker"} <= set(services)
    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow"] and mlflow["command"][0] == "server"
    backend = next(arg for arg in mlflow["command"] if arg.startswith("--backend-store-uri="))
    assert _interpolate(backend).startswith("--backend-store-uri=postgresql") and backend.endswith("/mlflow")
    assert any(arg.startswith("--artifacts-destination=") for arg in mlflow["command"])
    assert any(volume.startswith("mlartifacts:") for volume in mlflow["volumes"])
    worker = services["worker"]
    # podman-compose starts `replicas` containers only when the mode is spelled out.
    assert worker["deploy"]["mode"] == "replicated"
    assert _interpolate(str(worker["deploy"]["replicas"])) == "2"
    assert _interpolate(str(worker["deploy"]["replicas"]), {"WORKERS": "5"}) == "5"
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert COMPOSE["x-kdsearch"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"


def test_pulled_images_and_ports_are_overridable_with_the_usual_defaults():
    postgres, mlflow = COMPOSE["services"]["postgres"], COMPOSE["services"]["mlflow"]
    assert _interpolate(postgres["image"]) == "postgres:16"
    assert _interpolate(postgres["image"], {"POSTGRES_IMAGE": "localhost/pg:x"}) == "localhost/pg:x"
    assert [_interpolate(port) for port in postgres["ports"]] == ["5432:5432"]
    assert [_interpolate(port) for port in mlflow["ports"]] == ["5000:5000"]
    local = {"POSTGRES_PUBLISH": "127.0.0.1:55432", "MLFLOW_PUBLISH": "127.0.0.1:55000"}
    assert [_interpolate(port, local) for port in postgres["ports"]] == ["127.0.0.1:55432:5432"]
    assert [_interpolate(port, local) for port in mlflow["ports"]] == ["127.0.0.1:55000:5000"]


def test_mlflow_database_is_created_by_an_init_script_that_podman_compose_also_mounts():
    # podman-compose ignores top-level `configs:`; a bind mount works with both tools.
    assert "configs" not in COMPOSE and "configs" not in COMPOSE["services"]["postgres"]
    mount = next(v for v in COMPOSE["services"]["postgres"]["volumes"] if v.endswith(":/docker-entrypoint-initdb.d:ro"))
    init = DOCKER / mount.split(":")[0]
    scripts = sorted(init.glob("*.sql"))
    assert scripts and any("CREATE DATABASE mlflow OWNER kdsearch" in s.read_text() for s in scripts)
    assert COMPOSE["services"]["postgres"]["environment"]["POSTGRES_USER"] == "kdsearch"


def _allowed_hosts(env: dict[str, str] | None = None) -> list[str]:
    arg = next(a for a in COMPOSE["services"]["mlflow"]["command"] if a.startswith("--allowed-hosts="))
    return _interpolate(arg, env).removeprefix("--allowed-hosts=").split(",")


def _host_allowed(allowed: list[str], host: str) -> bool:
    # As mlflow.server.security_utils.is_allowed_host_header (importing it takes seconds).
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def test_mlflow_server_accepts_the_host_names_its_clients_use():
    # MLflow 3 rejects Host headers outside --allowed-hosts (its default: localhost and private IPs).
    tracking = _interpolate(COMPOSE["x-kdsearch"]["environment"]["MLFLOW_TRACKING_URI"])
    host = tracking.removeprefix("http://").rstrip("/")
    assert host == "mlflow:5000" and _host_allowed(_allowed_hosts(), host)
    for client in ("127.0.0.1:55000", "localhost:5000", "10.89.0.7:5000", "192.168.1.20:5000"):
        assert _host_allowed(_allowed_hosts(), client), client
    assert not _host_allowed(_allowed_hosts(), "evil.example:5000")
    assert _allowed_hosts({"MLFLOW_ALLOWED_HOSTS": "db-host:5000"}) == ["db-host:5000"]


@pytest.mark.parametrize(
    ("compose", "service"),
    [("compose.yaml", name) for name in sorted(_kdsearch_services(COMPOSE))]
    + [("compose.yaml + compose.check.yaml", name) for name in sorted(_kdsearch_services(MERGED))],
)
def test_each_kdsearch_command_is_accepted_by_the_cli_parser(compose, service, monkeypatch):
    config = MERGED if "check" in compose else COMPOSE
    args = _kdsearch_services(config)[service]
    environment = {
        key: _interpolate(value) for key, value in config["services"][service].get("environment", {}).items()
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)  # options read KDSEARCH_STORAGE and MLFLOW_TRACKING_URI from here
    monkeypatch.chdir(ROOT)  # the image's working directory holds studies/ as the repo does
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


# --- compose.check.yaml: the CPU-only, one-machine run of bench/container_check.sh -----------------


def test_check_override_runs_the_smoke_study_on_cpus_with_short_heartbeats():
    services = MERGED["services"]
    for name in ("study", "worker"):
        service = services[name]
        assert service["image"] == "kdsearch:cpu" and service["build"]["dockerfile"] == "docker/Dockerfile.cpu"
        assert "resources" not in service.get("deploy", {}), f"{name} still reserves a GPU"
        args = _kdsearch_services(MERGED)[name]
        assert "--device=cpu" in args and "--heartbeat-interval=2" in args and "--grace-period=10" in args
    assert services["worker"]["deploy"] == {"mode": "replicated", "replicas": "${WORKERS:-2}"}
    assert "--study=studies/smoke.yaml" in _kdsearch_services(MERGED)["study"]
    study_name = next(a for a in _kdsearch_services(MERGED)["study"] if a.startswith("--study-name="))
    assert study_name in _kdsearch_services(MERGED)["worker"]  # the workers join the study it creates
    # The rest is compose.yaml's: the same servers, stores and images for PostgreSQL and MLflow.
    for name in ("postgres", "mlflow"):
        assert services[name] == COMPOSE["services"][name]


def test_check_override_has_no_interpolation_inside_override_tags():
    # podman-compose 1.6 does not interpolate ${…} inside `!override` values (they reach podman as is).
    def overrides(value):
        if isinstance(value, _Override):
            yield value.value
        elif isinstance(value, dict):
            for v in value.values():
                yield from overrides(v)
        elif isinstance(value, list):
            for v in value:
                yield from overrides(v)

    assert all("${" not in yaml.safe_dump(value) for value in overrides(CHECK_OVERRIDE))


def test_check_override_replaces_commands_merges_mappings_and_keeps_the_rest():
    # Compose's rules on these files: `command` replaced (not appended), `build` merged key by key,
    # `!reset` removing the study's whole `deploy` and the worker's GPU reservation, and what the override
    # does not name (environment, volumes, restart) kept from compose.yaml's x-kdsearch anchor.
    base, merged = COMPOSE["services"], MERGED["services"]
    for name in ("study", "worker"):
        assert merged[name]["command"] == CHECK_OVERRIDE["services"][name]["command"] != base[name]["command"]
        assert base[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cuda"}
        assert merged[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cpu"}
        for key in ("environment", "volumes", "restart", "depends_on"):
            assert merged[name][key] == base[name][key], (name, key)
        assert merged[name]["volumes"] == ["cache:/cache", "runtime:/run/kdsearch"]
        assert merged[name]["environment"]["KDSEARCH_RUNTIME_DIR"] == "/run/kdsearch"  # one CPU share per machine
    assert "resources" in base["study"]["deploy"] and "deploy" not in merged["study"]
    assert set(base["worker"]["deploy"]) == {"mode", "replicas", "resources"}


# --- Dockerfiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cuda", "Dockerfile.cpu"])
def test_dockerfiles_install_kdsearch_as_the_entrypoint(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert text.startswith("#") and "\nFROM " in text
    assert 'ENTRYPOINT ["kdsearch"]' in text and '".[postgres,grpc]"' in text
    assert "COPY studies" in text and "KDSEARCH_CACHE_DIR=/cache" in text
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", makefile).group(1)
    assert f"TORCH_VERSION={torch_pin}" in text  # the image runs the torch that CI tests


@pytest.mark.parametrize(
    ("dockerfile", "torch_index"),
    [("Dockerfile.cpu", "https://download.pytorch.org/whl/cpu"), ("Dockerfile.cuda", "https://pypi.org/simple")],
)
def test_base_image_and_torch_index_are_build_arguments_with_the_usual_defaults(dockerfile, torch_index):
    lines = [line.strip() for line in (DOCKER / dockerfile).read_text().splitlines() if line and line[0] != "#"]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE}"]
    # An ARG before FROM is what FROM can use; its default is what real users get.
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines[: lines.index(froms[0])]
    assert f"ARG TORCH_INDEX={torch_index}" in lines
    install = next(line for line in lines if "torch==${TORCH_VERSION}" in line or "--index-url" in line)
    assert '--index-url "${TORCH_INDEX}"' in install


def test_postgres_standin_reads_the_official_images_variables_and_init_scripts():
    dockerfile = (DOCKER / "postgres-standin" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    assert "postgresql" in dockerfile and "PGDATA=/var/lib/postgresql/data" in dockerfile
    entrypoint = (DOCKER / "postgres-standin" / "entrypoint.sh").read_text()
    for variable in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert variable in entrypoint
    assert "/docker-entrypoint-initdb.d/*.sql" in entrypoint
    assert "listen_addresses = '*'" in entrypoint  # as the official image: other containers connect
    # compose.yaml's healthcheck runs pg_isready in the container: the image must have it on PATH.
    assert "pg_isready" in COMPOSE["services"]["postgres"]["healthcheck"]["test"][-1]
    assert "/usr/lib/postgresql/bin" in dockerfile


@pytest.mark.parametrize(
    ("shell", "script"),
    [
        ("sh", DOCKER / "postgres-standin" / "entrypoint.sh"),
        ("bash", ROOT / "bench" / "container_check.sh"),
        ("bash", ROOT / "bench" / "container_images.sh"),
        ("bash", ROOT / "bench" / "kube_check.sh"),
    ],
)
def test_scripts_parse(shell, script):
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_container_check_uses_the_check_override_and_cleans_up():
    script = (ROOT / "bench" / "container_check.sh").read_text()
    assert "docker/compose.yaml" in script and "docker/compose.check.yaml" in script
    assert "trap on_exit EXIT" in script and "down -v" in script
    assert "podman kill --signal KILL" in script or '"podman", "kill", "--signal", "KILL"' in script


def _url(value: str):
    import sqlalchemy

    return sqlalchemy.engine.make_url(value)


@pytest.mark.parametrize("env", [{}, {"POSTGRES_PASSWORD": "s3cret"}])
def test_the_database_server_and_its_clients_agree_on_user_password_and_databases(env):
    postgres = COMPOSE["services"]["postgres"]["environment"]
    password = _interpolate(postgres["POSTGRES_PASSWORD"], env)
    assert password == env.get("POSTGRES_PASSWORD", "kdsearch")
    storage = _url(_interpolate(COMPOSE["x-kdsearch"]["environment"]["KDSEARCH_STORAGE"], env))
    backend = next(a for a in COMPOSE["services"]["mlflow"]["command"] if a.startswith("--backend-store-uri="))
    mlflow = _url(_interpolate(backend, env).removeprefix("--backend-store-uri="))
    for url in (storage, mlflow):
        assert (url.username, url.password, url.host, url.port) == (
            postgres["POSTGRES_USER"],
            password,
            "postgres",
            5432,
        )
    assert storage.database == postgres["POSTGRES_DB"] == "optuna" and mlflow.database == "mlflow"
    assert storage.drivername == "postgresql" and mlflow.drivername == "postgresql+psycopg2"


def test_a_storage_given_to_compose_replaces_the_built_in_one():
    given = {"KDSEARCH_STORAGE": "postgresql://kd:pw@db-host:5432/optuna", "POSTGRES_PASSWORD": "ignored"}
    assert _interpolate(COMPOSE["x-kdsearch"]["environment"]["KDSEARCH_STORAGE"], given) == given["KDSEARCH_STORAGE"]


# --- kubernetes.yaml: the cluster recipe -----------------------------------------------------------------

KUBE = [doc for doc in yaml.safe_load_all((DOCKER / "kubernetes.yaml").read_text()) if doc]


def _kube(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in KUBE if doc["kind"] == kind}


def _pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _env(container: dict) -> dict[str, str]:
    """A container's env as Kubernetes resolves it: secrets from the manifests' Secrets, then $(VAR)."""
    secrets = {name: doc["stringData"] for name, doc in _kube("Secret").items()}
    values: dict[str, str] = {}
    for variable in container.get("env", []):
        if "valueFrom" in variable:
            reference = variable["valueFrom"]["secretKeyRef"]
            value = secrets[reference["name"]][reference["key"]]
        else:
            value = re.sub(r"\$\((\w+)\)", lambda match: values[match.group(1)], variable["value"])
        values[variable["name"]] = value
    return values


def _kdsearch_containers() -> dict[str, dict]:
    """Containers that run kdsearch (the image's entrypoint, no command of their own), by workload name."""
    workloads = {**_kube("Deployment"), **_kube("Job")}
    return {
        name: container
        for name, doc in workloads.items()
        for container in _pod_spec(doc)["containers"]
        if container["image"].startswith("kdsearch:") and "command" not in container
    }


def test_the_cluster_has_its_services_volumes_and_jobs():
    assert set(_kube("Deployment")) == set(_kube("Service")) == {"postgres", "mlflow", "storage-proxy"}
    assert set(_kube("Job")) == {"study", "workers"}
    claims = _kube("PersistentVolumeClaim")
    assert claims["kdsearch-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]  # every worker, every node
    for name, doc in {**_kube("Deployment"), **_kube("Job")}.items():
        for volume in _pod_spec(doc).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
            if "configMap" in volume:
                assert volume["configMap"]["name"] in _kube("ConfigMap"), name
    init = _kube("ConfigMap")["postgres-init"]["data"]
    assert any("CREATE DATABASE mlflow OWNER kdsearch" in script for script in init.values())


def test_each_service_selects_its_deployments_pods_on_a_port_they_open():
    for name, service in _kube("Service").items():
        template = _kube("Deployment")[name]["spec"]["template"]
        assert service["spec"]["selector"] == template["metadata"]["labels"]
        assert _kube("Deployment")[name]["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
        ports = {port["containerPort"] for c in template["spec"]["containers"] for port in c.get("ports", [])}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports, name


def test_the_workers_are_a_work_queue_job_of_n_pods():
    workers = _kube("Job")["workers"]["spec"]
    # Work-queue Job: parallelism without completions; it completes when its pods have exited 0.
    assert workers["parallelism"] >= 2 and "completions" not in workers
    for job in _kube("Job").values():
        assert _pod_spec(job)["restartPolicy"] == "OnFailure"  # a crashed worker comes back


@pytest.mark.parametrize("workload", sorted(_kdsearch_containers()))
def test_each_kdsearch_command_in_the_cluster_is_accepted_by_the_cli_parser(workload, monkeypatch):
    container = _kdsearch_containers()[workload]
    environment = _env(container)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)  # options read KDSEARCH_STORAGE and MLFLOW_TRACKING_URI from here
    monkeypatch.chdir(ROOT)  # the image's working directory holds studies/ as the repo does
    params = dry_parse([str(arg) for arg in container["args"]])
    assert params, f"{workload}: {container['args']} did not reach a command"
    assert params["storage"] == environment["KDSEARCH_STORAGE"]
    if "tracking_uri" in params:
        assert params["tracking_uri"] == environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    if "study_file" in params:
        assert Path(params["study_file"]).is_file()


def test_every_kdsearch_process_but_the_proxy_goes_through_the_proxy_and_only_it_to_postgresql():
    proxy = _kdsearch_containers()["storage-proxy"]
    port = _kube("Service")["storage-proxy"]["spec"]["ports"][0]["port"]
    assert "--host=0.0.0.0" in proxy["args"] and f"--port={port}" in proxy["args"]
    database = _url(_env(proxy)["KDSEARCH_STORAGE"])
    postgres_env = _env(_pod_spec(_kube("Deployment")["postgres"])["containers"][0])
    assert (database.host, database.port, database.database) == ("postgres", 5432, postgres_env["POSTGRES_DB"])
    assert (database.username, database.password) == (postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"])
    for name in ("study", "workers"):
        assert _env(_kdsearch_containers()[name])["KDSEARCH_STORAGE"] == f"grpc://storage-proxy:{port}"


def test_the_study_and_its_workers_share_one_study_and_one_cache():
    study, workers = _kdsearch_containers()["study"], _kdsearch_containers()["workers"]
    name = next(arg for arg in study["args"] if arg.startswith("--study-name="))
    assert name in workers["args"] and any(arg.startswith("--wait=") for arg in workers["args"])
    for container in (study, workers):
        [mount] = container["volumeMounts"]
        assert _env(container)["KDSEARCH_CACHE_DIR"].startswith(mount["mountPath"] + "/")
        assert _env(container)["KDSEARCH_DATA_DIR"].startswith(mount["mountPath"] + "/")
    assert _env(study) == _env(workers)


def test_the_mlflow_server_uses_its_own_database_and_accepts_the_name_workers_use():
    [mlflow] = _pod_spec(_kube("Deployment")["mlflow"])["containers"]
    args = [re.sub(r"\$\((\w+)\)", lambda match: _env(mlflow)[match.group(1)], arg) for arg in mlflow["args"]]
    backend = _url(next(arg for arg in args if arg.startswith("--backend-store-uri=")).split("=", 1)[1])
    assert (backend.host, backend.database, backend.drivername) == ("postgres", "mlflow", "postgresql+psycopg2")
    allowed = next(arg for arg in args if arg.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert _host_allowed(allowed, "mlflow:5000") and _host_allowed(allowed, "mlflow.default.svc.cluster.local:5000")
    assert not _host_allowed(allowed, "evil.example:5000")


def test_podman_gets_pods_named_after_the_services_and_n_worker_pods():
    from bench.kube_podman import for_podman

    played = for_podman(KUBE, {"kdsearch:cpu": "localhost/kdsearch:cpu"})
    pods = {doc["metadata"]["name"]: doc for doc in played if doc["kind"] == "Pod"}
    workers = _kube("Job")["workers"]["spec"]["parallelism"]
    assert set(pods) == {*_kube("Service"), "study", *(f"workers-{i}" for i in range(workers))}
    assert {doc["kind"] for doc in played} == {"Pod", "PersistentVolumeClaim", "ConfigMap"}
    proxy = pods["storage-proxy"]["spec"]["containers"][0]
    assert proxy["image"] == "localhost/kdsearch:cpu" and pods["storage-proxy"]["spec"]["restartPolicy"] == "Always"
    env = {variable["name"]: variable["value"] for variable in proxy["env"]}
    assert env["KDSEARCH_STORAGE"] == _env(_kdsearch_containers()["storage-proxy"])["KDSEARCH_STORAGE"]
    assert "$(" not in yaml.safe_dump(played)
    # podman publishes a containerPort on the host's 0.0.0.0: none may reach it.
    assert not [c for pod in pods.values() for c in pod["spec"]["containers"] if "ports" in c]
