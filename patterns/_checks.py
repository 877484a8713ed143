"""Parameter checks shared by the built-in patterns: each returns a message or None, and carries what
it allows in words (``allowed``) for ``sparse-prefill patterns NAME``."""

from __future__ import annotations

import math
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


def allowing(text: str) -> Callable[[Check], Check]:
    """Mark a check with what it allows, in words (Parameter.allowed shows it)."""
    def mark(check: Check) -> Check:
        check.allowed = text  # type: ignore[attr-defined]
        return check

    return mark


def at_least(minimum: int) -> Check:
    return allowing(f">= {minimum}")(lambda value: None if value >= minimum else f"must be >= {minimum}")


def multiple_of(step: int) -> Check:
    return allowing(f"a positive multiple of {step}")(
        lambda value: None if value > 0 and value % step == 0 else f"must be a positive multiple of {step}")


@allowing("finite")
def finite(value: Any) -> str | None:
    return None if math.isfinite(value) else "must be a finite number"


@allowing("a density in (0, 1]")
def density(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be a density in (0, 1] (1: never fall back to dense)"


@allowing("in (0, 1]")
def fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"
