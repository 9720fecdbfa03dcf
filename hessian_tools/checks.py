"""Argument validation: one family of checks, each returning the value in its canonical type.

Every check raises :class:`ValueError` with one line that names the argument, says what it must be
and shows what it got, so a wrong option reads the same wherever it is caught (library call or
command line). Booleans are never accepted as numbers (``True`` is an ``int`` in Python, but never
a sensible budget or noise scale).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
    open_maximum: bool = False,
    finite: bool = True,
    what: str | None = None,
) -> float:
    """``value`` as a float, or ValueError.

    Accepts Python and numpy real scalars (and size-1 arrays); rejects booleans and NaN, infinities
    unless ``finite=False``, and values outside [minimum, maximum] (open ends with ``open_*``).
    ``what`` replaces the generated description in the message (e.g. ``"a positive number"``).
    """
    described = what or _describe(minimum, maximum, open_minimum, open_maximum)
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be {described}, got {value!r}")
    if isinstance(value, numbers.Real):
        x = float(value)
    else:
        try:
            x = float(np.asarray(value, dtype=np.float64).item())
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {described}, got {value!r}") from None
    if math.isnan(x) or (finite and math.isinf(x)):
        raise ValueError(f"{name} must be {described}, got {value!r}")
    too_small = minimum is not None and (x <= minimum if open_minimum else x < minimum)
    too_large = maximum is not None and (x >= maximum if open_maximum else x > maximum)
    if too_small or too_large:
        raise ValueError(f"{name} must be {described}, got {value!r}")
    return x


def check_integer(
    name: str, value: Any, minimum: int | None = 1, *, why: str = "", integral_floats: bool = False
) -> int:
    """``value`` as an int ≥ ``minimum`` (None: any integer), or ValueError.

    Python and numpy integers are accepted, booleans never; floats only with ``integral_floats``
    and only when integral (``250.0``, a sample size computed in floating point). ``why`` is
    appended to the message (e.g. the reason for the minimum).
    """
    if minimum == 1:
        described = "a positive integer"
    elif minimum == 0:
        described = "a non-negative integer"
    elif minimum is None:
        described = "an integer"
    else:
        described = f"an integer ≥ {minimum}"
    message = f"{name} must be {described}{why}, got {value!r}"
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(message)
    if isinstance(value, numbers.Integral):
        n = int(value)
    elif not integral_floats:
        raise ValueError(message)
    else:
        try:
            x = check_number(name, value)
        except ValueError:
            raise ValueError(message) from None
        if x != math.floor(x):
            raise ValueError(message)
        n = int(x)
    if minimum is not None and n < minimum:
        raise ValueError(message)
    return n


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0 (a scale, a step size, a standard deviation)."""
    return check_number(name, value, minimum=0.0, open_minimum=True, what="a positive number (finite, > 0)")


def check_nonnegative(name: str, value: Any) -> float:
    """A finite number ≥ 0."""
    return check_number(name, value, minimum=0.0, what="a finite number ≥ 0")


def check_unit_interval(name: str, value: Any) -> float:
    """A number in the closed interval [0, 1] (a weight, an empirical risk of a loss in [0, 1])."""
    return check_number(name, value, minimum=0.0, maximum=1.0, what="a number in [0, 1]")


def check_open_unit_interval(name: str, value: Any) -> float:
    """A number in the open interval (0, 1) (a confidence δ, a relative tolerance)."""
    return check_number(
        name,
        value,
        minimum=0.0,
        maximum=1.0,
        open_minimum=True,
        open_maximum=True,
        what="a number in the open interval (0, 1)",
    )


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of ``choices`` (compared exactly), or ValueError listing them."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_positive_numbers(name: str, values: Any, *, distinct: bool = False) -> tuple[float, ...]:
    """A non-empty sequence of finite numbers > 0 (e.g. a grid of noise scales), as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be a sequence of positive numbers, got {values!r}")
    out = tuple(check_positive(f"every value of {name}", v) for v in values)
    if not out:
        raise ValueError(f"{name} must hold at least one value")
    if distinct and len(set(out)) != len(out):
        raise ValueError(f"{name} must be distinct, got {values!r}")
    return out


def check_positive_array(name: str, values: Any) -> np.ndarray:
    """A float64 array of finite numbers > 0 (variances, standard deviations)."""
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    if np.any(array <= 0.0):
        raise ValueError(f"{name} must be > 0 (a variance / standard deviation), got min {array.min()!r}")
    return array


def _describe(minimum, maximum, open_minimum, open_maximum) -> str:
    if minimum is None and maximum is None:
        return "a real number"
    if maximum is None:
        return f"a number {'>' if open_minimum else '≥'} {minimum:g}"
    if minimum is None:
        return f"a number {'<' if open_maximum else '≤'} {maximum:g}"
    left, right = "(" if open_minimum else "[", ")" if open_maximum else "]"
    return f"a number in {left}{minimum:g}, {maximum:g}{right}"
