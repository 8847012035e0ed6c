"""What the CLI's commands share: the consoles, one-line failures, logging, progress bars,
number formatting, and the benchmark table (printed by `bench` and by `optimize --bench`).

The command modules (`onnxshrink.cli`, `onnxshrink.cli.parity`, `onnxshrink.cli.bench`) import
from here and never from each other, except that `onnxshrink.cli` registers the other two on
its `app`.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from onnxshrink.errors import OnnxShrinkError, require_onnxruntime

if TYPE_CHECKING:
    from onnxshrink.bench import BenchReport

# Off a terminal (CI logs, pipes) rich would wrap at 80 columns; tables read better wider.
# Markup off: model paths, tensor and layer names are the user's and may hold "[/x]", which
# rich would read as a closing tag (a MarkupError after the output was written). Styles are
# given as `style=` or through `styled`.
out = Console(width=None if sys.stdout.isatty() else 120, markup=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200, markup=False)


def styled(*parts: str | tuple[str, str]) -> Text:
    """A line of plain strings and (text, style) pairs; no string is read as markup."""
    return Text.assemble(*parts)


def setup_logging(verbose: int) -> None:
    """Log to stderr at the level `-v` counts: warnings; INFO with -v; DEBUG with -vv.

    -v is for a reader: what each stage did, one line each. -vv adds the DEBUG lines (every
    declined match, every sweep) and lets the libraries speak: onnx-graphsurgeon's warnings and
    ONNX Runtime's own (coloured) log lines, which below -vv are cut to errors.
    """
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger().setLevel(level)  # basicConfig does nothing when already configured
    if verbose >= 2:
        return
    try:
        import onnx_graphsurgeon as gs

        gs.logger.severity = gs.logger.ERROR
    except Exception:
        pass
    try:
        import onnxruntime

        # Sessions made without their own options (onnx-graphsurgeon's constant folding) log
        # at this severity: 3 is errors only.
        onnxruntime.set_default_logger_severity(3)
    except Exception:
        pass


#: the help of every command's -v option
VERBOSE_HELP = "-v: what each stage did (INFO); -vv: also DEBUG lines and library warnings."


@contextmanager
def one_line_errors(verbose: int) -> Iterator[None]:
    """Every command's error contract: an OnnxShrinkError is its one line and exit code; any
    other exception is a bug of ours, one "internal error" line and exit 1 (the traceback
    only with -v). Without ONNX Runtime the command stops first, naming the install command
    (every command that runs models comes through here; `--help` and `rules` do not)."""
    try:
        require_onnxruntime()
        yield
    except typer.Exit:
        raise
    except OnnxShrinkError as exc:
        fail(str(exc), exc.exit_code)
    except Exception as exc:
        if verbose:
            raise
        fail(f"internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)", 1)


def fail(message: str, code: int) -> None:
    """Print `error: message` on stderr, one line, and exit with `code` (raises typer.Exit).

    Newlines in the message (a file name holding one, a library's multi-line error) are shown
    as `\\n`, so a CI log gets exactly one line.
    """
    one_line = message.replace("\r", "\\r").replace("\n", "\\n")
    err.print(styled(("error:", "red"), f" {one_line}"), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def progress_bar(console, label: str, enabled: bool = True):
    """A progress callback drawn as a rich bar on a terminal; None otherwise (or when disabled).

    Every command's progress bar (parity, localize, bench, optimize --bench) comes from here.
    """
    if not (enabled and console.is_terminal):
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


def fmt(value: float | None, spec: str = ".2e") -> str:
    """`value` formatted with `spec`; "-" for None, "nan", "inf" and "-inf" as such."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.2f}"


def _placement(shares: dict[str, float]) -> str:
    if not shares:
        return "?"
    return ", ".join(f"{p.removesuffix('ExecutionProvider')} {s:.0%}" for p, s in shares.items())


def print_bench_report(console, report: BenchReport) -> None:
    """The benchmark table, its notes and warnings, as `onnxshrink bench` prints them."""
    env = report.environment
    threads = env.threads if env.threads is not None else "ORT default"
    header = styled(
        ("onnxshrink bench", "bold"),
        f": ONNX Runtime {env.onnxruntime}, {env.cpu_count} CPUs, "
        f"intra-op threads {threads}"
        + (f", GPU {env.gpu}" if env.gpu else "")
        + f"; {report.warmup} warmup + {report.runs} timed interleaved rounds"
        + (", IOBinding" if report.iobinding else ""),
    )
    console.print(header, highlight=False, soft_wrap=True)
    if not report.rows:
        return
    table = Table(show_header=True, header_style="bold")
    # Model paths are what the reader needs whole; let the placement column wrap instead.
    width = min(max(len(r.model) for r in report.rows), 60)
    table.add_column("model", min_width=width, overflow="fold")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("provider", "left"),
        ("p50 ms", "right"),
        ("p90 ms", "right"),
        ("mean ms", "right"),
        ("samples/s", "right"),
        ("session s", "right"),
        ("peak MB", "right"),
        ("vs first", "right"),
    )
    for title, justify in columns:
        table.add_column(title, justify=justify)
    table.add_column("placement", overflow="fold")
    for r in report.rows:
        table.add_row(
            r.model,
            r.provider,
            _ms(r.p50_ms),
            _ms(r.p90_ms),
            _ms(r.mean_ms),
            f"{r.throughput:.1f}",
            f"{r.session_s:.2f}",
            fmt(r.peak_mb, ".1f"),
            fmt(r.ratio, ".3f"),
            _placement(r.placement),
        )
    # Off a terminal (logs, pipes) print the table whole rather than crop it at 120 columns.
    if console.is_terminal:
        console.print(table)
    else:
        Console(file=console.file, width=200, markup=False).print(table)
    from onnxshrink.report.text import shapes_text

    shapes = {shapes_text(r.input_shapes) for r in report.rows}
    if len(shapes) == 1:
        console.print(f"inputs of every timing: {shapes.pop() or 'none'}", highlight=False)
    else:
        for r in report.rows:
            console.print(f"inputs of {r.model}: {shapes_text(r.input_shapes)}", highlight=False)
    gpu_rows = [r for r in report.rows if r.provider != "cpu"]
    notes = [
        "peak MB: peak resident memory growth over session creation and the first run, free "
        "heap memory handed back first (- where it cannot be measured)"
    ]
    if gpu_rows:
        notes.append(
            "on GPU rows, device memory growth (" + (gpu_rows[0].peak_source or "n/a") + ")"
        )
    console.print("; ".join(notes), style="dim", highlight=False)
    for warning in report.warnings:
        console.print(
            styled(("warning:", "yellow"), f" {warning}"), highlight=False, soft_wrap=True
        )
