"""Cheap checks of a run's inputs before anything is written: files, data layout, teacher shape, device.

Called by every study kind's ``validate`` (through ``studyfile.check_files``) and by the single-run
commands, so that bad input fails with one line and exit code 2 before a study, cache or run exists.
"""

from __future__ import annotations

from kdsearch.config import TrainConfig


def check_inputs(config: TrainConfig) -> None:
    """Raise a one-line KdsearchError for inputs ``config`` cannot run with."""
