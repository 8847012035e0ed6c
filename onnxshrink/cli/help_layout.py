"""The layout of `--help` option tables: option names whole at any width from 80 columns.

Typer draws each panel of options as one rich table with six columns (long names, short
names, `--no-x` names, their short forms, type, help; a seventh, first, for the required
star) and lets rich share the width among them. At 80 columns rich's last resort shrinks every
column, names included, and cuts them (`--check-error-st…`), while the `--no-x` column keeps
its width on every row. `install()` replaces the table class typer uses with `HelpTable`,
which:

1. merges the four name columns into one cell per option, `-v, --verbose` on one line and a
   `--no-x` form on the next, so no column is reserved for the few options that have one;
2. never wraps or cuts that cell (the option names are what a reader looks up);
3. caps the type column at `TYPE_WIDTH` (a long metavar such as
   `unstructured:R|N:M|channels:R` folds onto two lines);
4. gives the help column all the width left.

Typer's command list (two columns) and anything else keep rich's default layout.
`tests/test_help.py` renders every command's help at 80 columns and checks every option name
appears whole, so a typer release that draws its tables differently fails there, not in front
of a user.
"""

from __future__ import annotations

import inspect
from typing import Any

from rich.console import Console, ConsoleOptions
from rich.table import Table
from rich.text import Text

#: the widest the type/metavar column gets; longer metavars fold
TYPE_WIDTH = 18

# Cells of one typer option row, after the optional required star.
_OPTION_CELLS = 6


class HelpTable(Table):
    """A rich Table that lays out typer's option rows as the module docstring says."""

    _options_layout = False

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        """Merge an option row's four name cells into one (1); other rows pass through."""
        cells = list(renderables)
        if len(cells) in (_OPTION_CELLS, _OPTION_CELLS + 1) and all(
            isinstance(c, str | Text) for c in cells[-_OPTION_CELLS:-2]
        ):
            head = cells[: len(cells) - _OPTION_CELLS]
            long, short, negative, negative_short = cells[-_OPTION_CELLS:-2]
            names = _joined([short, long])
            negatives = _joined([negative_short, negative])
            if negatives.plain:
                names.append("\n")
                names.append_text(negatives)
            cells = [*head, names, *cells[-2:]]
            self._options_layout = True
        super().add_row(*cells, **kwargs)

    def _calculate_column_widths(self, console: Console, options: ConsoleOptions) -> list[int]:
        if self._options_layout and len(self.columns) >= 3:
            *lead, names, types, help_column = self.columns
            for column in (*lead, names):
                column.no_wrap = True  # (2)
                column.overflow = "ignore"
            types.max_width = TYPE_WIDTH  # (3)
            help_column.ratio = 1  # (4)
        return super()._calculate_column_widths(console, options)


def _joined(parts: list[Any]) -> Text:
    result = Text()
    for part in parts:
        text = part if isinstance(part, Text) else Text(str(part))
        if not text.plain:
            continue
        if result.plain:
            result.append(", ")
        result.append_text(text)
    return result


def install() -> None:
    """Make typer's help draw option tables with `HelpTable` (idempotent)."""
    try:
        import typer.rich_utils as rich_utils
    except ImportError:  # typer without rich: click's plain help never cuts names
        return
    if getattr(rich_utils, "Table", None) is Table:
        rich_utils.Table = HelpTable  # type: ignore[misc]


def paragraphs(doc: str) -> str:
    """A command's help from its docstring: each paragraph's lines joined, so the terminal
    wraps them (typer keeps the docstring's line breaks after the first paragraph), except
    paragraphs that start with a `\\b` line (click's mark for a block kept as written: the
    Examples)."""
    blocks = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(
        b if b.startswith("\b") else " ".join(line.strip() for line in b.splitlines())
        for b in blocks
    )
