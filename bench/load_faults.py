"""Many workers on one PostgreSQL study, under faults: is every grid point still evaluated exactly once?

    .venv/bin/python bench/load_faults.py --workers 16,32 --storage direct,proxy --points 400

For each storage (``direct``: PostgreSQL itself; ``proxy``: ``kdsearch storage-proxy`` in front of it) and
each N, N worker processes run one grid study to the end, twice: once undisturbed (throughput), and once
while a random worker is SIGKILLed every ``--kill-every`` seconds and started again at once (as a cluster
restarts a pod) and PostgreSQL is restarted once (``pg_ctl restart -m fast``) when a third of the points
are complete. Then it checks the stores: every grid point COMPLETE exactly once with the value its params
give, no COMPLETE trial outside the grid, nothing RUNNING or WAITING, every failed trial retried, and every
MLflow run of the study belonging to a trial (its ``optuna.trial`` tag), FINISHED with the trial's value and
params when the trial completed, never left RUNNING otherwise. It prints one table row per run and exits 1
when a check fails.

What is kdsearch's and what is a stand-in. Real: the grid study kind and study engine (``open_study``
queues the points; each worker is ``join_study`` + ``run_trials``: atomic claims, heartbeats, stale trials
failed and queued again, ``tell``), the storage code (``open_storage``, the gRPC proxy and its heartbeats),
and ``TrialRunner``'s tracking of a trial (an MLflow run per trial under the study's parent run, params,
``run_id``/``worker`` attributes, the dead worker's run closed by the retry) on an MLflow server backed by
the same PostgreSQL. Stand-in: the training, a sleep of ``--trial-seconds`` (0.5x-1.5x, by trial) that
returns a value computed from the params, so 32 workers fit on 2 cores. Workers are forked from one
process that has imported kdsearch, torch and MLflow once (``multiprocessing``'s forkserver): 32 separate
interpreters would need ~14 GB (kdsearch.search imports torch, ~450 MB private memory each); a restarted
worker therefore starts in a fraction of a second, where a pod would take seconds.

PostgreSQL is a throwaway cluster made with Debian's ``initdb`` on 127.0.0.1 (a free port, trust auth, run
as the ``postgres`` user when this runs as root), removed at the end with everything else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from kdsearch.serve.local_server import answers, free_port

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "studies" / "smoke.yaml"
HEARTBEAT = {"interval": 1, "grace": 5}  # seconds: short, so a killed worker's trial is retried within the run
EXPERIMENT = "load-faults"
# Imported once by the forkserver; every worker is forked from it with these already loaded.
PRELOAD = ["kdsearch.search.kinds", "kdsearch.search.trial", "kdsearch.track.tracking", "mlflow", "grpc", "psycopg2"]


# --- the stand-in trial -----------------------------------------------------------------------------


def point_value(params: dict) -> float:
    """What a trial "trains" to: a function of its point, so a value can be checked against its params."""
    return round(50 + 10 * params["t"] + 20 * params["alpha"] + 5 * params["p"], 6)


def make_runner(tracking_uri: str, parent_run: str, trial_seconds: float):
    """kdsearch's TrialRunner with its training (``_train_tracked``) replaced by a sleep."""
    import torch

    from kdsearch.config import flatten
    from kdsearch.search.trial import TrialRunner
    from kdsearch.track.tracking import MlflowTracker

    class SleepRunner(TrialRunner):
        def params(self, config):
            return flatten(config)  # TrialRunner adds the data's and teacher's fields, which need prepared inputs

        def _train_tracked(self, trial, config, run_id, *training_options):
            time.sleep(trial_seconds * random.Random(trial.number).uniform(0.5, 1.5))
            value = point_value(trial.params)
            metrics = {"test_acc": value - 1, "train_time_s": trial_seconds}
            self.tracker.log_metrics(run_id, {"val_acc": value, **metrics}, step=1)
            return SimpleNamespace(val_acc=value), metrics, {}

    prepared = SimpleNamespace(device=torch.device("cpu"))  # all _start_run reads of it: tags and precision
    return SleepRunner(prepared, MlflowTracker(tracking_uri), EXPERIMENT, parent_run, progress=False)


def worker(
    study_name: str, storage_url: str, tracking_uri: str, parent_run: str, trial_seconds: float, log: Path
) -> None:
    """One worker process: join the study and run trials until none is queued or running (``study worker``)."""
    sys.stdout = sys.stderr = open(log, "a", buffering=1)  # a crash's traceback, and MLflow's lines
    from kdsearch.search.kinds import STUDY_KINDS
    from kdsearch.search.optuna_storage import HeartbeatConfig
    from kdsearch.search.study import join_study, run_trials

    handle = join_study(study_name, storage_url, HeartbeatConfig(**HEARTBEAT), STUDY_KINDS, wait_s=120)
    runner = make_runner(tracking_uri, parent_run, trial_seconds)
    run_trials(handle, handle.kind.objective(handle, runner), progress=False)


# --- the servers ---------------------------------------------------------------------------------------


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb, pg_ctl), as the ``postgres`` user when root."""

    def __init__(self, root: Path):
        found = shutil.which("initdb") or next(
            iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1:]), None
        )
        if found is None:  # Debian keeps the server programs off PATH, under /usr/lib/postgresql/VERSION/bin
            raise SystemExit("no PostgreSQL server programs (initdb): apt-get install postgresql")
        self.bindir, self.data, self.port = Path(found).parent, root / "pgdata", free_port()
        self.log = root / "postgres.log"
        self.user = "postgres" if os.getuid() == 0 else None
        if self.user:
            shutil.chown(root, self.user)
        self._run("initdb", "-D", self.data, "-U", "kdsearch", "--auth=trust", "-E", "UTF8")
        # 32 workers hold up to 2 connections each (trials and heartbeats), the MLflow server and the proxy more.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c max_connections=300 -k {root}"
        self.start_args = ("-D", self.data, "-l", self.log, "-o", options, "-w")
        self._run("pg_ctl", *self.start_args, "start")

    def _run(self, program: str, *args) -> None:
        command = [str(self.bindir / program), *map(str, args)]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://kdsearch@127.0.0.1:{self.port}/{database}"

    def create(self, database: str) -> None:
        import psycopg2

        connection = psycopg2.connect(self.url("postgres"))
        connection.autocommit = True
        connection.cursor().execute(f'CREATE DATABASE "{database}"')
        connection.close()

    def restart(self) -> float:
        """pg_ctl restart -m fast (clients disconnected, as a pod's SIGTERM); seconds until it accepts again."""
        started = time.monotonic()
        self._run("pg_ctl", *self.start_args, "-m", "fast", "restart")
        return time.monotonic() - started

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "stop")


def start_mlflow(root: Path, backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    log = open(root / "mlflow.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: answers(url + "/health"), 180, f"the MLflow server (log: {root / 'mlflow.log'})")
    return server, url


def start_proxy(root: Path, storage: str) -> tuple[subprocess.Popen, str]:
    """``kdsearch storage-proxy`` as a user starts it; its address from the line it prints when ready."""
    log_path = root / f"proxy-{time.monotonic_ns()}.log"
    command = [str(Path(sys.executable).parent / "kdsearch"), "storage-proxy", "--storage", storage, "--port", "0"]
    proxy = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def address() -> str | None:
        text = log_path.read_text()
        return text.split("--storage ", 1)[1].split(";", 1)[0] if "--storage grpc://" in text else None

    wait_for(lambda: address() is not None or proxy.poll() is not None, 60, f"the storage proxy ({log_path})")
    if address() is None:
        raise SystemExit(f"the storage proxy exited: {log_path.read_text().strip()}")
    return proxy, address()


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up in {seconds:.0f} s")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- one run ------------------------------------------------------------------------------------------


@dataclass
class Run:
    storage: str  # direct | proxy
    workers: int
    faults: bool
    seconds: float = 0.0
    points: int = 0
    kills: int = 0
    crashes: int = 0  # worker exits != 0 other than our SIGKILLs (e.g. a call during the PostgreSQL restart)
    restarts: int = 0
    pg_down_s: float | None = None
    states: dict | None = None
    retries: int = 0
    problems: list | None = None
    timed_out: int = 0  # workers still running at --run-timeout (killed then)
    mlflow_runs: int = 0
    peak_pss_mb: float = 0.0  # the workers' memory together, shared pages counted once

    @property
    def rate(self) -> float:
        return self.points / self.seconds


def grid(points: int) -> dict:
    """A t × alpha × p grid of about ``points`` points (10 alphas × 2 ps × t values)."""
    ts = max(1, round(points / 20))
    return {"t": [round(1 + 0.25 * i, 2) for i in range(ts)], "alpha": [round(0.05 * (i + 1), 2) for i in range(10)],
            "p": [0.1, 0.3]}  # fmt: skip


def one_run(run: Run, args, pg: Postgres, tracking_uri: str, context, root: Path) -> Run:
    import torch
    from optuna.trial import TrialState

    from kdsearch.search.optuna_storage import HeartbeatConfig, open_storage
    from kdsearch.search.study import open_study
    from kdsearch.search.studyfile import load_study
    from kdsearch.search.tune import GRID
    from kdsearch.track.tracking import MlflowTracker, run_tags

    name = f"{run.storage}-{run.workers}-{'faults' if run.faults else 'clean'}"
    database = name.replace("-", "_")
    pg.create(database)
    (root / "logs" / name).mkdir(parents=True)
    direct = pg.url(database)
    axes = grid(args.points)
    spec = load_study(SMOKE, {"grid.t": axes["t"], "grid.alpha": axes["alpha"], "grid.p": axes["p"]})
    handle = open_study(GRID, spec, direct, HeartbeatConfig(**HEARTBEAT), study_name=name)
    run.points = handle.total
    parent = MlflowTracker(tracking_uri).parent_run(EXPERIMENT, name, name, run_tags(torch.device("cpu")))
    proxy, storage_url = start_proxy(root, direct) if run.storage == "proxy" else (None, direct)
    # The harness watches the study on PostgreSQL itself (pings its connections: they outlive the restart).
    storage = open_storage(direct)
    study_id = storage.get_study_id_from_name(name)

    def start():
        log = root / "logs" / name / f"worker-{time.monotonic_ns()}.log"
        process = context.Process(
            target=worker, args=(name, storage_url, tracking_uri, parent, args.trial_seconds, log)
        )
        process.start()
        return process

    rng = random.Random(args.seed)
    started = time.monotonic()
    slots = {slot: start() for slot in range(run.workers)}
    done: set[int] = set()
    killed: set[int] = set()  # pids we SIGKILLed
    next_kill, next_look, restarted_pg = started + args.kill_every, started, False
    while len(done) < run.workers:
        time.sleep(0.2)
        if time.monotonic() - started > args.run_timeout:  # e.g. every worker waiting on a trial that never goes stale
            stuck = [process for slot, process in slots.items() if slot not in done and process.is_alive()]
            for process in stuck:
                process.kill()
                process.join()
            run.timed_out = len(stuck)
            break
        for slot, process in slots.items():
            if slot in done or process.is_alive():
                continue
            process.join()
            if process.exitcode == 0:
                done.add(slot)
                continue
            run.crashes += process.pid not in killed
            run.restarts += 1
            slots[slot] = start()
        now = time.monotonic()
        if now < next_look:
            continue
        next_look = now + 1.0
        run.peak_pss_mb = max(run.peak_pss_mb, pss_mb([p.pid for p in slots.values() if p.is_alive()]))
        if not run.faults:
            continue
        states = [trial.state for trial in storage.get_all_trials(study_id, deepcopy=False)]
        if args.kill_every > 0 and now >= next_kill and TrialState.WAITING in states:
            slot = rng.choice([slot for slot in slots if slot not in done and slots[slot].is_alive()])
            killed.add(slots[slot].pid)
            os.kill(slots[slot].pid, signal.SIGKILL)
            run.kills += 1
            next_kill = now + args.kill_every
        if not restarted_pg and states.count(TrialState.COMPLETE) >= run.points / 3:
            run.pg_down_s = pg.restart()
            restarted_pg = True
    run.seconds = time.monotonic() - started
    if proxy is not None:
        stop(proxy)
    check(run, name, direct, tracking_uri, parent, axes)
    return run


def check(run: Run, name: str, storage: str, tracking_uri: str, parent: str, axes: dict) -> None:
    """Every point COMPLETE exactly once with its value, nothing left RUNNING/WAITING, every failed trial
    retried; every MLflow run of the study a trial's, in the state its trial ended in."""
    import itertools

    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    from kdsearch.search.optuna_storage import open_storage

    trials = optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)
    problems = []
    run.states = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    expected = {
        json.dumps(dict(zip(axes, values, strict=True)), sort_keys=True) for values in itertools.product(*axes.values())
    }
    seen: dict[str, int] = {}
    for trial in complete:
        key = json.dumps(trial.params, sort_keys=True)
        seen[key] = seen.get(key, 0) + 1
        if trial.value != point_value(trial.params):
            problems.append(f"trial {trial.number}: value {trial.value} != {point_value(trial.params)}")
    problems += [f"point {key} complete {count} times" for key, count in seen.items() if count > 1]
    problems += [f"point {key} never complete (lost)" for key in sorted(expected - set(seen))]
    problems += [f"complete point {key} is not in the grid" for key in sorted(set(seen) - expected)]
    if run.states["RUNNING"] or run.states["WAITING"]:
        problems.append(f"left over: {run.states['RUNNING']} running, {run.states['WAITING']} waiting")
    retried = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    # A retry copies the failed trial's system attributes, so failed_trial names the first failure of a
    # chain: a failed trial counts as retried when some trial's retry_history holds it.
    history = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    run.retries = len(history)
    problems += [f"failed trial {t.number} was never retried" for t in trials
                 if t.state == TrialState.FAIL and t.number not in history | retried]  # fmt: skip

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=50000)
    run.mlflow_runs = len(runs)
    by_number = {t.number: t for t in trials}
    for found in runs:
        number = int(found.data.tags.get("optuna.trial", -1))
        trial = by_number.get(number)
        if trial is None:
            problems.append(f"MLflow run {found.info.run_id} names no trial of the study ({number})")
        elif trial.state == TrialState.COMPLETE and trial.user_attrs.get("run_id") == found.info.run_id:
            params = found.data.params
            if found.info.status != "FINISHED" or found.data.metrics.get("val_acc") != trial.value:
                problems.append(f"trial {number}'s run {found.info.run_id}: {found.info.status}, val_acc differs")
            elif [float(params["kd.temperature"]), float(params["kd.alpha"]), float(params["overlay.p"])] != [
                trial.params["t"],
                trial.params["alpha"],
                trial.params["p"],
            ]:
                problems.append(f"trial {number}'s run {found.info.run_id} has other params")
        elif found.info.status == "RUNNING":
            problems.append(f"trial {number} ({trial.state.name}) left its run {found.info.run_id} RUNNING")
    runs_of_complete = {r.info.run_id for r in runs}
    problems += [f"complete trial {t.number} has no MLflow run" for t in complete
                 if t.user_attrs.get("run_id") not in runs_of_complete]  # fmt: skip
    if run.timed_out:
        problems.insert(0, f"not finished after {run.seconds:.0f} s: {run.timed_out} workers still waiting, killed")
    run.problems = problems


def pss_mb(pids: list[int]) -> float:
    """The processes' proportional memory (shared pages split between them), in MB."""
    total = 0
    for pid in pids:
        try:
            total += int(next(line for line in open(f"/proc/{pid}/smaps_rollup") if line.startswith("Pss:")).split()[1])
        except (OSError, StopIteration):
            pass
    return total / 1024


def machine() -> dict:
    import optuna

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "kdsearch"], cwd=REPO, capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    pg = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "optuna": optuna.__version__,
        "postgresql": pg,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="16,32", help="worker counts, comma-separated")
    parser.add_argument("--storage", default="direct,proxy", help="direct (PostgreSQL) and/or proxy (gRPC proxy)")
    parser.add_argument("--points", type=int, default=400, help="grid points (rounded to a multiple of 20)")
    parser.add_argument("--trial-seconds", type=float, default=1.0, help="mean length of a stand-in trial")
    parser.add_argument(
        "--kill-every", type=float, default=3.0, help="seconds between SIGKILLs while points are queued; 0: none"
    )
    parser.add_argument("--modes", default="clean,faults", help="clean (no faults) and/or faults")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds before a run counts as stuck")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="append one JSON line per run here")
    args = parser.parse_args()
    storages = args.storage.split(",")
    if not set(storages) <= {"direct", "proxy"} or not set(args.modes.split(",")) <= {"clean", "faults"}:
        raise SystemExit("--storage takes direct,proxy and --modes clean,faults")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `kill` still removes the servers and files
    import optuna

    # The harness's own reads while PostgreSQL restarts: Optuna's warnings about them are not the workers'.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="kdsearch-load-"))
    os.environ["KDSEARCH_CACHE_DIR"] = str(root / "cache")
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers do no tensor work; no thread pools per process
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()  # its imports now, not in the first run's time
    header = machine()
    print(json.dumps(header))
    pg = Postgres(root)
    mlflow = None
    failed = False
    try:
        pg.create("mlflow")
        mlflow, tracking_uri = start_mlflow(root, pg.url("mlflow", "postgresql+psycopg2"))
        print(
            "| storage | workers | faults | points | wall s | points/s | kills | crashes | PG down s | trials by state "
            "| retries | MLflow runs | workers' memory MB | checks |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for storage in storages:
            for workers in [int(n) for n in args.workers.split(",")]:
                for mode in args.modes.split(","):
                    run = one_run(Run(storage, workers, mode == "faults"), args, pg, tracking_uri, context, root)
                    states = ", ".join(f"{k.lower()} {v}" for k, v in run.states.items() if v)
                    verdict = (
                        "pass" if not run.problems else f"FAIL ({len(run.problems)}): " + "; ".join(run.problems[:3])
                    )
                    failed |= bool(run.problems)
                    down = f"{run.pg_down_s:.1f}" if run.pg_down_s is not None else "-"
                    print(
                        f"| {storage} | {workers} | {'yes' if run.faults else 'no'} | {run.points} | {run.seconds:.1f} "
                        f"| {run.rate:.2f} | {run.kills} | {run.crashes} | {down} | {states} | {run.retries} "
                        f"| {run.mlflow_runs} | {run.peak_pss_mb:.0f} | {verdict} |",
                        flush=True,
                    )
                    if args.json:
                        with open(args.json, "a") as out:
                            out.write(json.dumps({**header, **run.__dict__, "rate": run.rate}) + "\n")
    finally:
        if mlflow is not None:
            stop(mlflow)
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
