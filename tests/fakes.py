"""The fakes every test shares: tiny configs, the study files, the CLI in a fresh process.

The fixtures built from them live in tests/conftest.py."""

from __future__ import annotations

import sys
from pathlib import Path

from kdsearch.config import DataConfig, ModelConfig

TINY = ModelConfig(arch="tiny_cnn")
TINY_STUDENT = ModelConfig(arch="tiny_cnn", drop_blocks=1)
SYNTHETIC = DataConfig(dataset="synthetic", synthetic_size=400, val_size=100)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the data, teacher and references beside the checkout, where they are
SMOKE = REPO / "studies" / "smoke.yaml"
CPU_QUICK = REPO / "studies" / "cpu-quick.yaml"
PAPER = REPO / "studies" / "paper-cifar10.toml"
# One line of Python that runs the real CLI in a fresh process, as a user's shell would.
CLI = [sys.executable, "-c", "import sys; from kdsearch.cli.main import main; sys.exit(main(sys.argv[1:]))"]
