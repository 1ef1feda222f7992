#!/usr/bin/env bash
# `make demo` from an empty cache, timed phase by phase (issue 30: at most 10 minutes on 2 cores).
#
#   bash bench/demo_timed.sh [SCRATCH] 2>&1 | tee bench/out/demo_timed.txt
#
# The cache (KDSEARCH_CACHE_DIR) and the demo's directory are made empty under SCRATCH (default: a new
# temporary directory), so the JPEGs are decoded and the teacher's logits and maps computed afresh; the
# existing .venv is used (its install is not timed). Every output line is stamped with the seconds since
# the start; make echoes each command before it runs, so a phase is the span between two commands. The
# last lines are the phases' durations and the whole run's.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=${1:-$(mktemp -d)}
rm -rf "$scratch/cache" "$scratch/run"
echo "== make demo, empty cache, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
KDSEARCH_CACHE_DIR="$scratch/cache" make demo DEMO_DIR="$scratch/run" 2>&1 | python3 -u -c '
import re, sys, time
start = time.monotonic()
phases = []
for line in sys.stdin:
    now = time.monotonic() - start
    print(f"{now:7.1f}s {line}", end="", flush=True)
    command = re.match(r"\S*kdsearch (\w+(?: \w+)?)|rm -rf|mkdir", line)
    if command:
        phases.append((line.split(" --")[0].strip()[-60:], now))
end = time.monotonic() - start
print("phases:")
for (name, began), (_, ended) in zip(phases, phases[1:] + [("end", end)]):
    print(f"  {ended - began:7.1f}s  {name}")
print(f"whole make demo: {end:.1f} s ({end / 60:.1f} min)")
'
exit "${PIPESTATUS[0]}"
