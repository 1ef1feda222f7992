#!/usr/bin/env bash
# docker/kubernetes.yaml run for real with `podman kube play` on one machine without Kubernetes:
#   1. build the images as bench/container_check.sh does (bench/container_images.sh: a Debian base made
#      locally, the PostgreSQL stand-in, the CPU image with this machine's pip configuration);
#   2. rewrite the manifests into what podman 4.3 plays (bench/kube_podman.py: Deployments and Jobs become
#      Pods named after their Services, a Job of parallelism N becomes N pods, secrets and $(VAR) inlined)
#      and record what podman itself answers to the kinds it does not play (Job, Service);
#   3. play them on a podman network of their own (pod names resolve there, as Service names in a
#      cluster): PostgreSQL, the MLflow server, the storage proxy, the study and its workers;
#   4. wait for the study and every worker to exit, then check: each exited 0; through the proxy, every grid
#      point of the smoke study is COMPLETE exactly once and the workers ran trials too; the MLflow server
#      holds every trial's run FINISHED with its val_acc.
# Any failed check: a FAIL line on stderr and exit code 1. Everything it started (pods, volumes, network) is
# removed on exit (KEEP_STACK=1 keeps it); the images stay.
#
#   bench/kube_check.sh        # as root; needs: apt-get install podman runc debootstrap
#
# Settings (environment): CHECK_WORK (/tmp/kdsearch-kube-check: logs, the played manifest), STUDY_TIMEOUT
# (1200 s), BASE_IMAGE (localhost/debian:bookworm), POSTGRES_IMAGE (the stand-in), TORCH_INDEX. Results and
# commands of the recorded runs: bench/kube_check.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${CHECK_WORK:-/tmp/kdsearch-kube-check}
PY=${KDSEARCH_PYTHON:-$ROOT/.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
CPU_IMAGE=localhost/kdsearch:cpu
POSTGRES_IMAGE=${POSTGRES_IMAGE:-localhost/kdsearch-postgres:standin}
NETWORK=kdsearch-kube
STUDY_TIMEOUT=${STUDY_TIMEOUT:-1200}
STUDY_NAME=smoke-cluster  # the manifests' --study-name
PLAY=$WORK/play.yaml

mkdir -p "$WORK/logs"
T_ALL=$(date +%s)
TIMES=()
CHECK_NAME=kube_check
# shellcheck source=bench/container_images.sh
source "$ROOT/bench/container_images.sh"

check_podman
[ -x "$PY" ] || fail "no kdsearch on this host at $PY (make the .venv, or set KDSEARCH_PYTHON)"
log "podman $(podman version --format '{{.Client.Version}}')"

cleanup() {
    if [ -f "$PLAY" ]; then
        podman kube down "$PLAY" >/dev/null 2>&1 || true
        # Claims and ConfigMaps become named volumes, which `kube down` leaves.
        for volume in $("$PY" -c 'import sys, yaml; print(" ".join(d["metadata"]["name"] for d in yaml.safe_load_all(open(sys.argv[1])) if d["kind"] in ("PersistentVolumeClaim", "ConfigMap")))' "$PLAY"); do
            podman volume rm -f "$volume" >/dev/null 2>&1 || true
        done
    fi
    podman network rm -f "$NETWORK" >/dev/null 2>&1 || true
}
on_exit() {
    local rc=$?
    set +e
    remove_rootfs
    for container in ${ALL_CONTAINERS:-}; do
        podman logs "$container" >"$WORK/logs/$container.log" 2>&1
    done
    if [ "${KEEP_STACK:-0}" = 1 ]; then
        log "KEEP_STACK=1: the pods stay (remove them with: podman kube down $PLAY)"
    else
        cleanup
    fi
    TIMES+=("$(printf '%-44s %5ds' "total" $(($(date +%s) - T_ALL)))")
    printf '\nwall times:\n' && printf '  %s\n' "${TIMES[@]}"
    printf '%s\n' "${TIMES[@]}" >"$WORK/times.txt"
    if [ "$rc" = 0 ]; then log "kube check passed; logs in $WORK/logs"; else log "kube check FAILED (exit $rc); logs in $WORK/logs"; fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM
cleanup  # what an interrupted earlier run left

# --- images and the manifests as podman plays them ------------------------------------------------
build_images
"$PY" "$ROOT/bench/kube_podman.py" "$ROOT/docker/kubernetes.yaml" --image kdsearch:cpu="$CPU_IMAGE" \
    --image postgres:16="$POSTGRES_IMAGE" >"$PLAY" || fail "bench/kube_podman.py could not rewrite docker/kubernetes.yaml"
# The containers kube play makes: POD-CONTAINER; with the restart policy of their pod (Always: a service).
CONTAINERS=$("$PY" - "$PLAY" <<'EOF'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc["kind"] == "Pod":
        for container in doc["spec"]["containers"]:
            print(f'{doc["metadata"]["name"]}-{container["name"]} {doc["spec"]["restartPolicy"]}')
EOF
)
ALL_CONTAINERS=$(echo "$CONTAINERS" | cut -d' ' -f1)
JOB_CONTAINERS=$(echo "$CONTAINERS" | awk '$2 != "Always" {print $1}')
log "played manifest: $PLAY ($(grep -c '^kind: Pod' "$PLAY") pods)"
# What podman answers to the kinds it does not play, each alone (nothing is created by them).
"$PY" - "$ROOT/docker/kubernetes.yaml" "$WORK" <<'EOF'
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
for kind in ("Job", "Service"):
    with open(f"{sys.argv[2]}/only-{kind}.yaml", "w") as out:
        yaml.safe_dump(next(d for d in docs if d["kind"] == kind), out)
EOF
podman network create "$NETWORK" >/dev/null
for kind in Job Service; do
    answer=$(podman kube play --network "$NETWORK" --start=false "$WORK/only-$kind.yaml" 2>&1 | tail -1 || true)
    podman kube down "$WORK/only-$kind.yaml" >/dev/null 2>&1 || true
    log "podman kube play of a $kind alone: ${answer:-(no output)}"
done

# --- play -------------------------------------------------------------------------------------------
timed "podman kube play (all pods started)" podman kube play --network "$NETWORK" "$PLAY" >"$WORK/logs/play.log" 2>&1 \
    || fail "podman kube play failed: $(tail -3 "$WORK/logs/play.log")"
log "study and worker containers: $(echo $JOB_CONTAINERS)"

wait_jobs() {
    local deadline=$((SECONDS + STUDY_TIMEOUT)) running container
    while [ $SECONDS -lt $deadline ]; do
        running=0
        for container in $JOB_CONTAINERS; do
            [ "$(podman inspect -f '{{.State.Status}}' "$container")" = exited ] || running=1
        done
        [ $running = 0 ] && return 0
        sleep 5
    done
    fail "the study and workers still run after ${STUDY_TIMEOUT}s"
}
timed "until the study and every worker exit" wait_jobs
for container in $JOB_CONTAINERS; do
    state=$(podman inspect -f '{{.State.ExitCode}} {{.RestartCount}}' "$container")
    log "$container: exit ${state% *}, restarts ${state#* }"
    [ "${state% *}" = 0 ] || fail "$container exited ${state% *}: $(podman logs --tail 5 "$container" 2>&1)"
done

# --- checks, from inside the stack: the study through the proxy, the runs on the MLflow server ------
check_stores() {
    podman exec -i storage-proxy-storage-proxy python - "$STUDY_NAME" <<'EOF'
import json, sys
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState
from kdsearch.search.optuna_storage import open_storage

study = optuna.load_study(study_name=sys.argv[1], storage=open_storage("grpc://127.0.0.1:13000"))
trials = study.get_trials()
complete = [t for t in trials if t.state == TrialState.COMPLETE]
points = [json.dumps(t.params, sort_keys=True) for t in complete]
workers = sorted({t.user_attrs["worker"].split(":")[0] for t in complete})
print(f"optuna (through the proxy): {len(trials)} trials, {len(complete)} complete, {len(set(points))} distinct points; ran on {workers}")
client = MlflowClient("http://mlflow:5000")
runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("smoke").experiment_id])}
good = all(runs[t.user_attrs["run_id"]].info.status == "FINISHED"
           and runs[t.user_attrs["run_id"]].data.metrics["val_acc"] == t.value for t in complete)
print(f"mlflow: {len(runs)} runs in experiment smoke; every complete trial's run FINISHED with its val_acc: {good}")
ok = len(complete) == len(set(points)) == 4 and all(t.state == TrialState.COMPLETE for t in trials) and good
sys.exit(0 if ok and len(workers) >= 2 else 1)
EOF
}
timed "check the study (via the proxy) and MLflow" check_stores || fail "the stores do not hold what they should (lines above)"
