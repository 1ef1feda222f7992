"""Wall time of ``kdsearch --help`` and of every command's ``--help``: what a user waits for before
any work starts. The CLI must not import torch for help (issue 11); this prints whether it does.

    git worktree add /tmp/kdsearch-before c491710   # the code before issue 11
    .venv/bin/python bench/cli_startup.py --repeats 7 --reference-tree /tmp/kdsearch-before

Each run is a fresh interpreter (``python -c``), as the ``kdsearch`` script is; the median of the
repeats is reported, with the cores other processes kept busy meanwhile. With ``--reference-tree``,
the same commands run from that checkout (same interpreter and packages) in the same run, and the
ratio reference / this tree is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, header, machine  # noqa: E402

COMMANDS = [[], ["study", "grid"], ["ablate"], ["train"], ["report"]]
PROBE = (
    "import sys; from kdsearch.cli.main import main; code = main({args!r}); "
    "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)"
)


def run_help(args: list[str], tree: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=[*args, "--help"])],
        capture_output=True,
        text=True,
        check=True,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    return time.perf_counter() - start, done.stderr.strip().splitlines()[-1]


def median_help(command: list[str], tree: Path, repeats: int) -> tuple[float, str, float]:
    """(median seconds, whether torch was imported, other processes' cores meanwhile)."""
    with Timer() as timer:
        runs = [run_help(command, tree) for _ in range(repeats)]
    return statistics.median(seconds for seconds, _ in runs), runs[-1][1], timer.cores or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--reference-tree", type=Path, help="a checkout to compare with (e.g. a git worktree)")
    args = parser.parse_args()
    header("cli_startup", machine())
    here = Path(__file__).resolve().parents[1]
    for command in COMMANDS:
        name = " ".join(["kdsearch", *command, "--help"])
        seconds, torch_state, cores = median_help(command, here, args.repeats)
        print(f"{name:<32} median {seconds:6.2f} s  ({torch_state}; other cores {cores:.2f})")
        if args.reference_tree is not None:
            before, before_torch, cores = median_help(command, args.reference_tree.resolve(), args.repeats)
            print(
                f"{'  reference tree':<32} median {before:6.2f} s  ({before_torch}; other cores {cores:.2f})"
                f"  ratio reference / this {before / seconds:5.1f}x"
            )


if __name__ == "__main__":
    main()
