# Sourced by bench/container_check.sh and bench/kube_check.sh: podman's settings on these machines and the
# images of docker/ built with podman (a Debian base made locally with debootstrap, the PostgreSQL stand-in,
# the CPU image), with this machine's pip configuration mounted into the build. The caller defines ROOT,
# WORK, PY, BASE_IMAGE, CPU_IMAGE, POSTGRES_IMAGE, CHECK_NAME (its name in failures) and TIMES (an array).

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() {
    printf '%s: FAIL: %s\n' "$CHECK_NAME" "$*" >&2
    exit 1
}
# timed NAME CMD...: runs CMD, records its wall time under NAME in TIMES.
timed() {
    local name=$1 t0=$SECONDS rc=0
    shift
    log "$name"
    "$@" || rc=$?
    TIMES+=("$(printf '%-44s %5ds' "$name" $((SECONDS - t0)))")
    return $rc
}

# check_podman: root, the tools, and CONTAINERS_CONF (the script's own unless the caller set one).
check_podman() {
    [ "$(id -u)" = 0 ] || fail "run as root (podman here runs rootful: runc, cgroupfs)"
    for tool in podman runc debootstrap; do
        command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install -y podman runc debootstrap"
    done
    # Podman's settings on these machines (crun fails on hybrid cgroups; rlimits cannot be raised; no
    # systemd, so no syslog or journald): see CONTAINERS.md in the shared notes.
    if [ -n "${CONTAINERS_CONF:-}" ]; then
        [ -f "$CONTAINERS_CONF" ] || fail "CONTAINERS_CONF=$CONTAINERS_CONF does not exist (unset it to use the script's own)"
    else
        export CONTAINERS_CONF=$WORK/containers.conf
        cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    fi
}

ROOTFS=""
remove_rootfs() {
    if [ -n "$ROOTFS" ] && [ -d "$ROOTFS" ]; then
        umount -R "$ROOTFS/proc" "$ROOTFS/sys" 2>/dev/null || true  # debootstrap's, if it was interrupted
        rm -rf --one-file-system "$ROOTFS"
    fi
    ROOTFS=""
}

make_base_image() {
    local mirror
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    [ -n "$mirror" ] || mirror=$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -1)
    ROOTFS=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$ROOTFS" "${mirror:-http://deb.debian.org/debian}" >"$WORK/logs/debootstrap.log" 2>&1 \
        || fail "debootstrap failed: $WORK/logs/debootstrap.log"
    tar -C "$ROOTFS" -c . | podman import - "$BASE_IMAGE" >"$WORK/logs/import.log" 2>&1 \
        || fail "podman import of $BASE_IMAGE failed: $WORK/logs/import.log"
    remove_rootfs
}

# pip_for_builds: PIP_MOUNTS and TORCH_INDEX from this machine's pip configuration.
pip_for_builds() {
    # This machine's pip configuration for the builds: one pip.conf (environment over files, as pip reads
    # them) mounted as the build's /etc/pip.conf, with the local indexes and wheel folders it names mounted
    # read-only at the same paths, and its CA bundle and constraints at /run/host-pip/.
    PIP_MOUNTS=()
    while IFS= read -r mount; do
        PIP_MOUNTS+=(-v "$mount")
    done < <("$PY" - "$WORK/pip.conf" <<'EOF'
import os, re, subprocess, sys
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
values = {}
for line in listing.stdout.splitlines():
    match = re.match(r"^(:env:|global)\.([\w-]+)='(.*)'$", line)
    if match and (match.group(1) == ":env:" or match.group(2) not in values):
        values[match.group(2)] = match.group(3)
mounts = []
for key in ("cert", "constraint"):
    if os.path.isfile(values.get(key, "")):
        mounts.append(f"{values[key]}:/run/host-pip/{key}:ro")
        values[key] = f"/run/host-pip/{key}"
for key in ("find-links", "index-url", "extra-index-url"):
    for item in values.get(key, "").split():
        path = item.removeprefix("file://") if item.startswith(("file://", "/")) else None
        if path and key != "find-links":
            path = os.path.dirname(path.rstrip("/"))  # a simple/ index links to ../files
        if path and os.path.isdir(path) and f"{path}:{path}:ro" not in mounts:
            mounts.append(f"{path}:{path}:ro")
with open(sys.argv[1], "w") as conf:
    conf.write("[global]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()))
print("\n".join(mounts))
EOF
    )
    PIP_MOUNTS+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
    # The torch index: this machine's pip index (PyPI unless configured); download.pytorch.org, the
    # Dockerfile's default, is not reachable here.
    TORCH_INDEX=${TORCH_INDEX:-$(sed -n 's/^index-url = //p' "$WORK/pip.conf")}
    TORCH_INDEX=${TORCH_INDEX:-https://pypi.org/simple}
    log "pip for the builds: $WORK/pip.conf, mounts: ${PIP_MOUNTS[*]}; TORCH_INDEX=$TORCH_INDEX"
}

build_postgres() {
    podman build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$POSTGRES_IMAGE" \
        "$ROOT/docker/postgres-standin" >"$WORK/logs/build-postgres.log" 2>&1 \
        || fail "building $POSTGRES_IMAGE failed: $WORK/logs/build-postgres.log"
}
build_cpu() {
    podman build --network host "${PIP_MOUNTS[@]}" --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg TORCH_INDEX="$TORCH_INDEX" -f "$ROOT/docker/Dockerfile.cpu" -t "$CPU_IMAGE" "$ROOT" \
        >"$WORK/logs/build-cpu.log" 2>&1 || fail "building $CPU_IMAGE failed: $WORK/logs/build-cpu.log"
}
# A rebuild leaves the image it replaces untagged (7 GB with its own layers): removed, by its id.
remove_replaced() {
    local old=$1 image=$2
    if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
        podman rmi "$old" >/dev/null 2>&1 || true
    fi
}

# build_images: the base image (when missing), the PostgreSQL stand-in (when POSTGRES_IMAGE is the default
# stand-in) and the CPU image, then a check that every kdsearch module imports in it.
build_images() {
    if podman image exists "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE exists"
    else
        timed "base image (debootstrap bookworm + import)" make_base_image
    fi
    pip_for_builds
    local image_line old_postgres old_cpu
    old_postgres=$(podman image inspect --format '{{.Id}}' "$POSTGRES_IMAGE" 2>/dev/null || true)
    old_cpu=$(podman image inspect --format '{{.Id}}' "$CPU_IMAGE" 2>/dev/null || true)
    if [ "$POSTGRES_IMAGE" = localhost/kdsearch-postgres:standin ]; then
        timed "build $POSTGRES_IMAGE" build_postgres
        remove_replaced "$old_postgres" "$POSTGRES_IMAGE"
    fi
    timed "build $CPU_IMAGE (docker/Dockerfile.cpu)" build_cpu
    remove_replaced "$old_cpu" "$CPU_IMAGE"
    log "$CPU_IMAGE: $(podman image inspect "$CPU_IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
    # Every kdsearch module imports in the image (a dependency missing from pyproject.toml shows here,
    # not as crash-looping workers).
    image_line=$(podman run --rm --entrypoint python "$CPU_IMAGE" -c '
import importlib, pkgutil, kdsearch, torch, optuna, mlflow
for module in pkgutil.walk_packages(kdsearch.__path__, "kdsearch."):
    importlib.import_module(module.name)
print(torch.__version__, optuna.__version__, mlflow.__version__)' 2>&1) \
        || fail "kdsearch does not import in $CPU_IMAGE (a dependency missing from pyproject.toml?): $(echo "$image_line" | tail -3)"
    log "image: every kdsearch module imports; torch, optuna, mlflow = $image_line"
}
