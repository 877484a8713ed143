"""Parameter checks shared by the built-in patterns: each returns a message or None."""

from __future__ import annotations

import math
from typing import Any, Callable


def at_least(minimum: int) -> Callable[[Any], str | None]:
    return lambda value: None if value >= minimum else f"must be >= {minimum}"


def multiple_of(step: int) -> Callable[[Any], str | None]:
    return lambda value: None if value > 0 and value % step == 0 else f"must be a positive multiple of {step}"


def finite(value: Any) -> str | None:
    return None if math.isfinite(value) else "must be a finite number"


def density(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be a density in (0, 1] (1: never fall back to dense)"
