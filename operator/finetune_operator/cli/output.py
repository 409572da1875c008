"""Rendering for people and for scripts: kubectl-like tables, ``-o json|yaml``, durations, sizes.

Every command that prints data takes ``-o/--output``; ``table`` is for people, ``json`` and ``yaml``
print the same data as a stable document for scripts (``jq``), never a table.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

FORMATS = ("table", "json", "yaml")


def add_output_option(parser: argparse.ArgumentParser, default: str = "table") -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=default,
        help="table for people; json or yaml for scripts (default: %(default)s)",
    )


def dump(data: Any, fmt: str) -> str:
    """``data`` as JSON (indented, keys in their given order) or YAML."""
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n")
    return json.dumps(data, indent=2, default=str)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns as kubectl prints them: upper-case headers, left-aligned, three spaces apart."""
    cells = [[str(h).upper() for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 time as the API server writes it (``2026-01-01T12:00:00Z``), or None."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age(value: str | None, now: datetime) -> str:
    """kubectl's AGE column: ``45s``, ``12m``, ``5h``, ``3d``; ``<unknown>`` without a time."""
    then = parse_time(value)
    if then is None:
        return "<unknown>"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 120 * 60:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def duration(seconds: float | None) -> str:
    """``1h05m``, ``4m10s``, ``9s``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def gib(n: float) -> str:
    """Bytes as GiB with two decimals (the unit GPUs are sold in)."""
    return f"{n / 1024**3:.2f} GiB"


def number(value: float | None, digits: int = 4) -> str:
    """A metric for a table: ``-`` when unset, else ``digits`` significant digits."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}"
