"""The output of the bench scripts: one results table on stdout and, optionally, the rows as JSON.

The scripts run as files (``python bench/NAME.py``), so they import this module by its name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

# (title, format spec of the value: "<" first for a left-aligned column, the value: a row's key
# or a function of the row). A value that is a string (e.g. "-" for not measured) is shown as it is.
Column = tuple[str, str, str | Callable[[dict], Any]]


def _cell(row: dict, spec: str, get: str | Callable[[dict], Any]) -> str:
    value = row[get] if isinstance(get, str) else get(row)
    return value if isinstance(value, str) else format(value, spec.lstrip("<"))


def print_table(columns: Sequence[Column], rows: Sequence[dict]) -> None:
    """Print ``rows`` under a header line and a rule, each column as wide as its widest cell."""
    cells = [[_cell(row, spec, get) for _, spec, get in columns] for row in rows]
    widths = [max([len(title)] + [len(line[i]) for line in cells]) for i, (title, _, _) in enumerate(columns)]
    aligns = ["<" if spec.startswith("<") else ">" for _, spec, _ in columns]
    header = " ".join(f"{title:{a}{w}}" for (title, _, _), a, w in zip(columns, aligns, widths))
    print(header)
    print("-" * len(header))
    for line in cells:
        print(" ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, aligns, widths)))


def write_json(path: str | None, rows: Sequence[dict]) -> None:
    """Write ``rows`` to ``path`` as indented JSON (nothing when ``path`` is empty)."""
    if path:
        with open(path, "w") as stream:
            json.dump(list(rows), stream, indent=2)
