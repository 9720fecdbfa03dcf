"""Number formatting and plain tables shared by the reports and the command line (no results logic)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def as_dict(obj: Any) -> Any:
    """A result object or its JSON dict → the dict form."""
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    value = float(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def pm(value: float | None, half: float | None, digits: int = 4) -> str:
    """``value ± half`` (half = a 95% half-width)."""
    if value is None:
        return "–"
    if half is None or half == 0:
        return fmt(value, digits)
    return f"{fmt(value, digits)} ± {fmt(half, 2)}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned table for the terminal."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
