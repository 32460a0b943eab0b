"""The one output sink of the command line: results and tables on stdout, progress on stderr.

For people: the result's text, tables that fit 100 columns, notes, and tqdm bars with an ETA when
stderr is a terminal. With --json, stdout holds exactly one JSON document of the same data, and no
bars are drawn. The sink is
the `Progress` the library jobs report to (coopt_hub.core.progress).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import click

from coopt_hub.core.progress import Bar, terminal_bar

TABLE_WIDTH = 100
GAP = "  "
ELLIPSIS = "…"
# A shortened cell keeps at least this much: "ViT-B-3…" still names the model.
MIN_ELIDED_WIDTH = 8

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Column:
    """A table column: its header, the value a row shows in it, and how a cell too long to fit is shortened.

    `value(row)` defaults to the row's field named `header`; None shows as "-". A column with `elide`
    is shortened first when the table is too wide: at the "end" (names) or in the "middle"
    (hashes, paths: their start and end identify them); the full text is listed under the table.
    """

    header: str
    value: Callable[[Row], Any] | None = None
    elide: Literal["end", "middle"] | None = None

    def text(self, row: Row) -> str:
        value = self.value(row) if self.value is not None else row.get(self.header)
        return "-" if value is None else str(value)


def _widths(columns: Sequence[Column], cells: list[list[str]], width: int) -> list[int]:
    """Each column's width: what its longest cell needs, less what the table must lose to fit `width`."""
    widths = [max([len(column.header), *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]
    floors = [max(len(column.header), MIN_ELIDED_WIDTH) if column.elide else widths[i]
              for i, column in enumerate(columns)]
    excess = sum(widths) + len(GAP) * (len(columns) - 1) - width
    while excess > 0:
        shrinkable = [i for i in range(len(columns)) if widths[i] > floors[i]]
        if not shrinkable:
            break  # the columns that may not be shortened are wider than the page: show them whole
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    return widths


def _elide(text: str, width: int, how: str | None) -> str:
    if len(text) <= width:
        return text
    if how == "middle":
        head = width // 2
        return text[:head] + ELLIPSIS + text[len(text) - (width - head - 1):]
    return text[: width - 1] + ELLIPSIS


def format_table(rows: Sequence[Row], columns: Sequence[Column], width: int = TABLE_WIDTH) -> list[str]:
    """The table's lines, then one line per distinct full text of a shortened cell, keyed by the first column."""
    cells = [[column.text(row) for column in columns] for row in rows]
    widths = _widths(columns, cells, width)
    lines = []
    for row in [[column.header for column in columns], *cells]:
        shown = [_elide(cell, w, column.elide).ljust(w) for cell, w, column in zip(row, widths, columns)]
        lines.append(GAP.join(shown).rstrip())
    for i, column in enumerate(columns):
        shortened: dict[str, list[str]] = {}
        for row in cells:
            if len(row[i]) > widths[i]:
                shortened.setdefault(row[i], []).append(row[0])
        lines += [f"{column.header} of {columns[0].header} {', '.join(keys)}: {full}"
                  for full, keys in shortened.items()]
    return lines


class Output:
    """Prints what a command has to say; `as_json` (--json) makes stdout one JSON document and turns bars off."""

    def __init__(self, as_json: bool = False):
        self.as_json = as_json
        if as_json:
            _silence_library_bars()

    def info(self, message: str) -> None:
        """A note on the way (stderr); silent with --json."""
        if not self.as_json:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        click.secho(f"Warning: {message}", fg="yellow", err=True)

    def bar(self, total: int | None, description: str, unit: str = "it") -> Bar:
        """A tqdm bar with an ETA on a terminal; none with --json, nor in a log, where it would be clutter."""
        return terminal_bar(total, description, unit, enabled=not self.as_json and sys.stderr.isatty())

    def result(self, message: str, /, **data: Any) -> None:
        """The outcome: `message` for people, or with --json one JSON document of `data`."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif message:
            click.echo(message)

    def table(self, rows: Sequence[Row], columns: Sequence[Column], *, message: str = "",
              notes: Sequence[str] = (), key: str = "rows", **data: Any) -> None:
        """`message`, the rows as a table and `notes` for people; with --json, `data` with the rows under `key`."""
        text = [message, ""] if message else []
        self.result("\n".join([*text, *format_table(rows, columns), *notes]), **data, **{key: list(rows)})


def _silence_library_bars() -> None:
    """huggingface_hub and datasets draw their own bars: --json wants none, on either stream."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
