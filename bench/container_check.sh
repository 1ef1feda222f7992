#!/usr/bin/env bash
# The compose stack of docker/ for real, with podman and podman-compose on one machine without GPUs:
#   1. build the images: a Debian base made locally (debootstrap; no registry needed), the stand-in
#      PostgreSQL image (docker/postgres-standin) and the CPU image (docker/Dockerfile.cpu), with this
#      machine's pip configuration (indexes, wheel folders, CA) mounted into the build;
#   2. start docker/compose.yaml + docker/compose.check.yaml: PostgreSQL, the MLflow server, the study
#      (studies/smoke.yaml) and 2 workers;
#   3. SIGKILL one worker container while it runs a trial;
#   4. check that the study completes with every grid point complete exactly once, that the killed
#      trial failed and its retry completed, and that the MLflow server holds every trial's run;
#   5. run `kdsearch report` on this host against the stack's PostgreSQL and MLflow server.
# Any failed check: a FAIL line on stderr and exit code 1. The containers, network and volumes it
# started are removed on exit (KEEP_STACK=1 keeps them); the images stay, so a rerun builds from cache.
#
#   bench/container_check.sh                 # as root; needs: apt-get install podman runc debootstrap
#
# Settings (environment): CHECK_WORK (default /tmp/kdsearch-container-check: logs, report, pip config),
# CHECK_POSTGRES_PORT / CHECK_MLFLOW_PORT (55432 / 55000, published on 127.0.0.1 only), EPOCHS (5:
# the smoke study's epochs, so that a trial lasts long enough to be killed in the middle), BASE_IMAGE
# (localhost/debian:bookworm), POSTGRES_IMAGE (the stand-in), TORCH_INDEX (this machine's pip index).
# Results and commands of the recorded runs: bench/container_check.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${CHECK_WORK:-/tmp/kdsearch-container-check}
PROJECT=${CHECK_PROJECT:-kdsearch-check}
PY=${KDSEARCH_PYTHON:-$ROOT/.venv/bin/python}  # the host's kdsearch: optuna, mlflow, psycopg2
KDSEARCH=${KDSEARCH_BIN:-$(dirname "$PY")/kdsearch}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
CPU_IMAGE=localhost/kdsearch:cpu  # compose.yaml's and compose.check.yaml's kdsearch:cpu
PG_PORT=${CHECK_POSTGRES_PORT:-55432}
MLFLOW_PORT=${CHECK_MLFLOW_PORT:-55000}
KILL_TIMEOUT=${KILL_TIMEOUT:-300}
STUDY_TIMEOUT=${STUDY_TIMEOUT:-900}

# What compose.yaml and compose.check.yaml read; the stack's own addresses, not the caller's.
unset KDSEARCH_STORAGE MLFLOW_TRACKING_URI MLFLOW_ALLOWED_HOSTS
export POSTGRES_IMAGE=${POSTGRES_IMAGE:-localhost/kdsearch-postgres:standin}
export POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-kdsearch}
export POSTGRES_PUBLISH=127.0.0.1:$PG_PORT MLFLOW_PUBLISH=127.0.0.1:$MLFLOW_PORT
export STUDY_FILE=studies/smoke.yaml STUDY_NAME=${STUDY_NAME:-container-check-smoke}
export EPOCHS=${EPOCHS:-5} WORKERS=2 HEARTBEAT_INTERVAL=${HEARTBEAT_INTERVAL:-2} GRACE_PERIOD=${GRACE_PERIOD:-10}
STORAGE=postgresql://kdsearch:$POSTGRES_PASSWORD@127.0.0.1:$PG_PORT/optuna
TRACKING=http://127.0.0.1:$MLFLOW_PORT

mkdir -p "$WORK/logs"
T_ALL=$(date +%s)
TIMES=()
CHECK_NAME=container_check
# shellcheck source=bench/container_images.sh
source "$ROOT/bench/container_images.sh"

# --- tools --------------------------------------------------------------------------------------
check_podman
[ -x "$PY" ] && [ -x "$KDSEARCH" ] || fail "no kdsearch on this host at $PY (make the .venv, or set KDSEARCH_PYTHON)"
if [ -z "${PODMAN_COMPOSE:-}" ]; then
    PODMAN_COMPOSE=$(command -v podman-compose || true)
    if [ -z "$PODMAN_COMPOSE" ]; then
        PODMAN_COMPOSE=$WORK/podman-compose/bin/podman-compose
        if [ ! -x "$PODMAN_COMPOSE" ]; then
            log "installing podman-compose from PyPI into $WORK/podman-compose"
            python3 -m venv "$WORK/podman-compose" && "$WORK/podman-compose/bin/pip" install -q podman-compose \
                || fail "could not install podman-compose (pip install podman-compose)"
        fi
    fi
fi
compose() { "$PODMAN_COMPOSE" -p "$PROJECT" -f "$ROOT/docker/compose.yaml" -f "$ROOT/docker/compose.check.yaml" "$@"; }
log "podman $(podman version --format '{{.Client.Version}}'), $("$PODMAN_COMPOSE" --version 2>/dev/null | head -1)"

# --- cleanup: this project's containers (with their anonymous volumes), network and volumes ------
cleanup_stack() {
    local ids volumes
    ids=$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" || true)
    if [ -n "$ids" ]; then
        # The images' VOLUMEs that compose does not name (the MLflow server's /cache) are anonymous
        # volumes, which neither `rm -v` of a running container nor `down -v` removes: by name, after.
        # shellcheck disable=SC2086
        volumes=$(podman inspect -f '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}' $ids || true)
        # shellcheck disable=SC2086
        podman rm -f -v $ids >/dev/null 2>&1 || true
    fi
    compose down -v >/dev/null 2>&1 || true
    for volume in ${volumes:-}; do
        podman volume rm "$volume" >/dev/null 2>&1 || true
    done
}
save_logs() {
    local name
    for name in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' || true); do
        podman logs "$name" >"$WORK/logs/$name.log" 2>&1 || true
    done
}
on_exit() {
    local rc=$?
    set +e
    remove_rootfs
    save_logs
    if [ "${KEEP_STACK:-0}" = 1 ]; then
        log "KEEP_STACK=1: the stack stays up (remove it with: $PODMAN_COMPOSE -p $PROJECT -f docker/compose.yaml -f docker/compose.check.yaml down -v)"
    else
        cleanup_stack
    fi
    TIMES+=("$(printf '%-44s %5ds' "total" $(($(date +%s) - T_ALL)))")
    printf '\nwall times:\n' && printf '  %s\n' "${TIMES[@]}"
    printf '%s\n' "${TIMES[@]}" >"$WORK/times.txt"
    if [ "$rc" = 0 ]; then
        log "container check passed; logs in $WORK/logs, report in $WORK/report"
    else
        log "container check FAILED (exit $rc); container logs in $WORK/logs"
    fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM
cleanup_stack  # what an interrupted earlier run left

for port in "$PG_PORT" "$MLFLOW_PORT"; do
    if "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$port" 2>/dev/null; then
        fail "127.0.0.1:$port is in use; set CHECK_POSTGRES_PORT / CHECK_MLFLOW_PORT"
    fi
done

# --- images ----------------------------------------------------------------------------------------
build_images

# --- the stack ------------------------------------------------------------------------------------
wait_postgres() {
    # podman 4.3 without systemd runs no healthchecks by itself, and podman-compose < 4.6 ignores
    # `condition: service_healthy`: run compose.yaml's healthcheck here until it passes.
    local i
    for i in $(seq 90); do
        podman healthcheck run "${PROJECT}_postgres_1" >/dev/null 2>&1 && return 0
        sleep 1
    done
    fail "PostgreSQL did not become healthy in 90 s: $(podman logs --tail 20 "${PROJECT}_postgres_1" 2>&1)"
}
wait_mlflow() {
    local i
    for i in $(seq 180); do
        "$PY" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$TRACKING" \
            2>/dev/null && return 0
        sleep 1
    done
    fail "the MLflow server did not answer $TRACKING/health in 180 s: $(podman logs --tail 20 "${PROJECT}_mlflow_1" 2>&1)"
}
start_databases() {
    compose up -d --no-build postgres >"$WORK/logs/compose-up.log" 2>&1 || fail "compose up postgres failed: $WORK/logs/compose-up.log"
    wait_postgres
}
start_mlflow() {
    compose up -d --no-build mlflow >>"$WORK/logs/compose-up.log" 2>&1 || fail "compose up mlflow failed: $WORK/logs/compose-up.log"
    wait_mlflow
}
timed "start PostgreSQL (until healthy)" start_databases
timed "start the MLflow server (until /health)" start_mlflow
T_STUDY=$SECONDS
compose up -d --no-build >>"$WORK/logs/compose-up.log" 2>&1 || fail "compose up (study, workers) failed: $WORK/logs/compose-up.log"
WORKER_CONTAINERS=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=worker" --format '{{.Names}}' | sort)
[ "$(echo "$WORKER_CONTAINERS" | wc -w)" = 2 ] || fail "expected 2 worker containers, found: $WORKER_CONTAINERS"
HOSTNAMES=()
for name in $WORKER_CONTAINERS; do
    HOSTNAMES+=("$name=$(podman inspect -f '{{.Config.Hostname}}' "$name")")
done
log "study and workers started: $(echo "$WORKER_CONTAINERS" | tr '\n' ' ')(${HOSTNAMES[*]})"

# --- kill a worker mid-trial, then wait for the study ----------------------------------------------
# Runs on this host against the published PostgreSQL: a trial is the worker's once its `worker`
# attribute (hostname:pid, set when its training starts) names a worker container's hostname.
export STORAGE TRACKING
kill_mid_trial() {
    "$PY" - "$KILL_TIMEOUT" "${PROJECT}_study_1" "${HOSTNAMES[@]}" <<'EOF' >"$WORK/killed.json" || fail "could not kill a worker mid-trial (see above)"
import json, os, subprocess, sys, time
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
database_url = lambda url: url.replace("postgresql://", "postgresql+psycopg2://", 1)  # SQLAlchemy 2.1: psycopg 3
timeout, study_container = float(sys.argv[1]), sys.argv[2]
hosts = dict(arg.split("=", 1)[::-1] for arg in sys.argv[3:])


def study_container_failed() -> str | None:
    state = subprocess.run(["podman", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", study_container],
                           capture_output=True, text=True).stdout.split()
    if state[:1] == ["exited"] and state[1:] != ["0"]:
        logs = subprocess.run(["podman", "logs", "--tail", "15", study_container], capture_output=True, text=True)
        return f"{study_container} exited with {state[1]}:\n{logs.stdout}{logs.stderr}"
    return None


storage = optuna.storages.RDBStorage(database_url(os.environ["STORAGE"]))
deadline = time.time() + timeout
while time.time() < deadline:
    if failure := study_container_failed():
        sys.exit(failure)
    try:
        study = optuna.load_study(study_name=os.environ["STUDY_NAME"], storage=storage)
    except KeyError:  # not created yet
        time.sleep(0.5)
        continue
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host = str(trial.user_attrs.get("worker", "")).split(":")[0]
        if host in hosts:
            subprocess.run(["podman", "kill", "--signal", "KILL", hosts[host]], check=True, stdout=subprocess.DEVNULL)
            print(json.dumps({"container": hosts[host], "trial": trial.number, "params": trial.params,
                              "running_s": round(time.time() - trial.datetime_start.timestamp(), 1)}))
            sys.exit(0)
    if all(t.state.is_finished() for t in study.trials) and len(study.trials) >= 4:
        sys.exit("the study finished before a worker ran a trial (make trials longer: EPOCHS)")
    time.sleep(0.2)
sys.exit(f"no worker container ran a trial within {timeout:.0f} s")
EOF
    log "killed: $(cat "$WORK/killed.json")"
    KILLED=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['container'])" "$WORK/killed.json")
}
timed "until a worker runs a trial, SIGKILL it" kill_mid_trial

wait_study() {
    local deadline=$((SECONDS + STUDY_TIMEOUT)) running
    while :; do
        running=$(podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' \
            | grep -c -E '_(study|worker)_[0-9]+$' || true)
        # A killed worker may be restarted (restart: on-failure); wait until none of them runs.
        [ "$running" = 0 ] && break
        [ $SECONDS -lt $deadline ] || fail "the study and workers still run after ${STUDY_TIMEOUT}s"
        sleep 2
    done
}
timed "until the study and workers exit" wait_study
STUDY_S=$((SECONDS - T_STUDY))
for name in "${PROJECT}_study_1" $WORKER_CONTAINERS; do
    status=$(podman inspect -f '{{.State.ExitCode}} restarts={{.RestartCount}}' "$name")
    log "$name: exit $status"
    case "$name:$status" in
        "$KILLED:137 "*) ;;  # killed and not restarted
        *:"0 "*) ;;
        *) fail "$name exited with $status: $(podman logs --tail 30 "$name" 2>&1)" ;;
    esac
done

# --- the checks -----------------------------------------------------------------------------------
check_stores() {
    "$PY" - "$ROOT/$STUDY_FILE" "$WORK/killed.json" <<'EOF'
import itertools, json, math, os, sys
import optuna, yaml
from mlflow.tracking import MlflowClient
optuna.logging.set_verbosity(optuna.logging.WARNING)
database_url = lambda url: url.replace("postgresql://", "postgresql+psycopg2://", 1)  # SQLAlchemy 2.1: psycopg 3
State = optuna.trial.TrialState
problems = []
grid = yaml.safe_load(open(sys.argv[1]))["grid"]
killed = json.load(open(sys.argv[2]))
points = {tuple(p) for p in itertools.product(grid["t"], grid["alpha"], grid["p"])}
study = optuna.load_study(study_name=os.environ["STUDY_NAME"], storage=database_url(os.environ["STORAGE"]))
trials = study.get_trials(deepcopy=False)
key = lambda t: (t.params["t"], t.params["alpha"], t.params["p"])
complete = [t for t in trials if t.state == State.COMPLETE]
for point in sorted(points):
    n = sum(key(t) == point for t in complete)
    if n != 1:
        problems.append(f"grid point T={point[0]} alpha={point[1]} p={point[2]} is complete {n} times, not once")
if extra := {key(t) for t in complete} - points:
    problems.append(f"complete trials outside the grid: {sorted(extra)}")
if left := [t.number for t in trials if t.state in (State.RUNNING, State.WAITING)]:
    problems.append(f"trials still running or waiting: {left}")
dead = next(t for t in trials if t.number == killed["trial"])
if dead.state != State.FAIL:
    problems.append(f"the killed worker's trial {dead.number} is {dead.state.name}, not FAIL (was it killed mid-trial?)")
retries = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
if not any(t.state == State.COMPLETE and key(t) == key(dead) for t in retries):
    problems.append(f"no completed retry of the killed trial {dead.number} ({[t.number for t in retries]})")
by_state = {s.name: sum(t.state == s for t in trials) for s in State if any(t.state == s for t in trials)}
print(f"optuna: {len(trials)} trials {by_state}; {len(points)} grid points, each complete once: "
      f"{not any('complete' in p for p in problems)}; killed trial {dead.number} -> {dead.state.name}, "
      f"retried as {[t.number for t in retries]}")

client = MlflowClient(os.environ["TRACKING"])
experiments = {e.experiment_id: e.name for e in client.search_experiments()}
runs = {
    r.info.run_id: r
    for r in client.search_runs(list(experiments), filter_string=f"tags.`optuna.study` = '{study.study_name}'")
}
names = {"t": "kd.temperature", "alpha": "kd.alpha", "p": "overlay.p"}
for t in complete:
    run = runs.get(t.user_attrs.get("run_id"))
    if run is None:
        problems.append(f"trial {t.number}: its run {t.user_attrs.get('run_id')} is not on the MLflow server")
        continue
    if run.info.status != "FINISHED":
        problems.append(f"trial {t.number}: run {run.info.run_id} is {run.info.status}")
    if any(float(run.data.params.get(names[k], "nan")) != v for k, v in t.params.items()):
        problems.append(f"trial {t.number}: run params {run.data.params} do not match {t.params}")
    if not math.isclose(run.data.metrics.get("val_acc", float("nan")), t.value, abs_tol=1e-6):
        problems.append(f"trial {t.number}: run val_acc {run.data.metrics.get('val_acc')} != trial value {t.value}")
dead_run = runs.get(dead.user_attrs.get("run_id"))
if dead_run is not None and dead_run.info.status == "RUNNING":
    problems.append(f"the killed trial's run {dead_run.info.run_id} is still RUNNING")
parents = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") is None]
print(f"mlflow: experiments {sorted({experiments[r.info.experiment_id] for r in runs.values()})}: {len(runs)} runs of the study, "
      f"{len(parents)} parent run(s), every complete trial's run FINISHED with its params and val_acc: "
      f"{not any(p.startswith('trial') for p in problems)}; the killed trial's run: "
      f"{dead_run.info.status if dead_run else 'none logged'}")
if len(parents) != 1:
    print(f"NOTE: {len(parents)} parent runs named {sorted({r.info.run_name for r in parents})} "
          "(processes that start together each create one; not a check of this script)")
for problem in problems:
    print("FAIL:", problem, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
}
timed "check Optuna storage and MLflow server" check_stores || fail "the stores do not hold what they should (FAIL lines above)"

make_report() {
    local cache
    cache=$(podman volume inspect "${PROJECT}_cache" --format '{{.Mountpoint}}' 2>/dev/null || true)
    rm -rf "$WORK/report"
    "$KDSEARCH" report --study "$STUDY_NAME" --storage "$STORAGE" --tracking-uri "$TRACKING" \
        --out "$WORK/report" ${cache:+--cache-dir "$cache"} >"$WORK/logs/report.log" 2>&1 \
        || fail "kdsearch report failed: $(tail -20 "$WORK/logs/report.log")"
    [ -s "$WORK/report/index.html" ] && [ -s "$WORK/report/tables/trials.csv" ] \
        || fail "kdsearch report wrote no index.html or tables/trials.csv in $WORK/report"
    "$PY" - "$WORK/report" <<'EOF' || fail "the report does not show the finished study"
import csv, json, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/tables/trials.csv")))
summary = json.load(open(f"{out}/report.json"))
states = [str(row.get("state", "")).upper() for row in rows]
print(f"report: {len(rows)} trial rows, states {sorted(set(states))}; progress {summary.get('progress')}")
sys.exit(0 if states.count("COMPLETE") == 4 else 1)
EOF
}
timed "kdsearch report (host) against the stack" make_report
TIMES+=("$(printf '%-44s %5ds' "study: compose up to all containers exited" "$STUDY_S")")
