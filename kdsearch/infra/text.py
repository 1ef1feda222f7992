"""How numbers read in tables and logs, for every layer that prints one."""

from __future__ import annotations

import math

ACCURACY = ".2f"  # accuracies in %, as the paper prints them


def number(value: float | None, spec: str = ACCURACY) -> str:
    """``value`` formatted, or "n/a" when it is missing or nan."""
    return "n/a" if value is None or math.isnan(value) else format(value, spec)
