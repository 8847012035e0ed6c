"""The optimization report: one document with everything `optimize` did and measured.

`write_report(path, result, ...)` picks the format from the suffix:

1. `.html` (or `.htm`): a single self-contained page (inline CSS, charts as base64 SVG `data:`
   images from `onnxshrink.report.charts`, no script, nothing fetched from the network).
2. `.md`: the same tables as GitHub-flavoured markdown; no charts (GitHub does not show `data:`
   images), a line says so.
3. `.json`: every figure, numbers as numbers; non-finite floats become the strings "inf",
   "-inf", "nan" so the file is strict JSON.

Contents: the command, versions and date; before/after size, node counts, initializers and
parameters; the op-type histogram; rules applied (times, seconds), rules that declined (reason,
times); notes; the parity table; the benchmark table when a bench report is given; per-layer
errors when given; with int8 quantization, its settings, counts, every layer kept float and
why, the sensitivity ranking (bars in HTML) and the check of the int8 model against the original
(`onnxshrink.rules.int8`).

The modules: `model` builds the figures as data (what the .json report holds) from the
`OptimizeResult`, reading the bench report and the lossy stage's result duck-typed; `text` turns
figures into the text both renderers share; `html` and `markdown` are the renderers; `charts`
draws the SVG charts. Every user-controlled string (paths, node, output and layer names) is
escaped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxshrink.engine.io import check_output_path, write_text_atomic
from onnxshrink.errors import UsageError
from onnxshrink.report import charts
from onnxshrink.report.html import render_html
from onnxshrink.report.markdown import render_markdown
from onnxshrink.report.model import SCHEMA, report_dict, versions
from onnxshrink.report.text import format_bytes, short_names

if TYPE_CHECKING:  # onnxshrink.bench is only read duck-typed, never imported at run time
    from onnxshrink.bench import BenchReport
    from onnxshrink.engine.optimize import OptimizeResult

logger = logging.getLogger(__name__)

FORMATS = {".html": "html", ".htm": "html", ".md": "markdown", ".json": "json"}


def report_format(path: str | os.PathLike[str]) -> str:
    """The format a report path asks for ("html", "markdown", "json"); UsageError otherwise.

    Call it before long work so that a bad `--report` fails first; it also checks the folder.
    """
    dest = Path(path)
    fmt = FORMATS.get(dest.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"{dest}: unknown report format {dest.suffix or '(no suffix)'!r}; "
            "use .html, .md or .json"
        )
    check_output_path(dest)
    return fmt


def write_report(
    path: str | os.PathLike[str],
    result: OptimizeResult,
    *,
    command: str,
    model_path: str | os.PathLike[str] | None,
    output_path: str | os.PathLike[str] | None,
    bench: BenchReport | None = None,
    layer_errors: Sequence[tuple[str, float]] | None = None,
) -> Path:
    """Write the report for an `OptimizeResult`; the format follows the suffix (.html .md .json).

    Atomic: written to a temporary file in the same folder, then renamed into place; nothing is
    left behind on failure. Raises UsageError for an unknown suffix or an unusable folder.
    """
    dest = Path(path)
    fmt = report_format(dest)
    args: dict[str, Any] = dict(
        command=command,
        model_path=model_path,
        output_path=output_path,
        bench=bench,
        layer_errors=layer_errors,
    )
    if fmt == "html":
        text = render_html(result, **args)
    elif fmt == "markdown":
        text = render_markdown(result, **args)
    else:
        text = json.dumps(report_dict(result, **args), indent=2, allow_nan=False) + "\n"
    write_text_atomic(dest, text)
    logger.info("report written to %s", dest)
    return dest


__all__ = [
    "FORMATS",
    "SCHEMA",
    "charts",
    "format_bytes",
    "render_html",
    "render_markdown",
    "report_dict",
    "report_format",
    "short_names",
    "versions",
    "write_report",
]
