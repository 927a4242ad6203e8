"""Checks for settings, run once where a setting enters (SampleRequest, node inputs, command-line options).

Each returns the value (as a float where it is a number) or raises ``ValueError`` whose message starts with
the setting's name and says what was expected, so every layer reports bad input the same way. Code behind
the boundary trusts what passed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_SEED = 2**64 - 1


def check_int(name: str, value, lo: int) -> int:
    """``value`` unchanged; ValueError naming ``name`` unless it is a whole number >= ``lo``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected a whole number >= {lo}, got {value!r}")
    return value


def check_seed(seed) -> int:
    """``seed`` unchanged; ValueError unless it is a whole number in ``0..MAX_SEED``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed: expected a whole number in 0..{MAX_SEED}, got {seed!r}")
    return seed


def check_finite(name: str, value, lo: float | None = None, hi: float | None = None, *,
                 above: float | None = None) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is finite and within the bounds: ``lo`` and
    ``hi`` inclusive, ``above`` exclusive (a lower bound the value must exceed)."""
    low = f"({above:g}" if above is not None else f"[{lo:g}" if lo is not None else None
    if low is not None and hi is not None:
        expect = f"a finite number in {low}, {hi:g}]"
    elif above is not None:
        expect = f"a finite number > {above:g}"
    elif lo is not None:
        expect = f"a finite number >= {lo:g}"
    else:
        expect = "a finite number"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {expect}, got {value!r}") from None
    if (isinstance(value, bool) or not math.isfinite(v) or (lo is not None and v < lo)
            or (above is not None and v <= above) or (hi is not None and v > hi)):
        raise ValueError(f"{name}: expected {expect}, got {value!r}")
    return v


def check_bool(name: str, value) -> bool:
    """``value`` unchanged; ValueError naming ``name`` unless it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` unchanged; ValueError naming ``name`` and listing ``choices`` unless it is one of them."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value
