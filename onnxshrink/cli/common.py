"""What the CLI's commands share: the consoles, one-line failures, logging, progress (bars on a
terminal, plain lines off one), number formatting, and the benchmark table (printed by `bench`
and by `optimize --bench`).

The command modules (`onnxshrink.cli`, `onnxshrink.cli.parity`, `onnxshrink.cli.bench`) import
from here and never from each other, except that `onnxshrink.cli` registers the other two on
its `app`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

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


#: off a terminal, the least seconds between two progress lines of one stage (the first and
#: the last line of a stage are always printed)
PROGRESS_INTERVAL = 10.0

#: what a progress callback receives: (stage, done, total); total 0 (or below done) is unknown
StagedUpdate = Callable[[str, int, int], None]


def _seconds(value: float) -> str:
    value = max(0.0, value)
    if value < 60:
        return f"{value:.0f} s"
    minutes, seconds = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _count(done: int, total: int, unit: str) -> str:
    """`40/128 runs`, or "40 runs" when the total is unknown (0, or passed already)."""
    known = total > 0 and done <= total
    return (f"{done}/{total}" if known else f"{done}") + (f" {unit}" if unit else "")


class PlainProgress:
    """Progress as plain lines for logs (CI, `| tee`, nohup), throttled per stage.

    `update(stage, done, total)` prints `progress: STAGE DONE/TOTAL UNIT, E elapsed, ~L left`
    for a stage's first update, then at most one line per `interval` seconds, and its last:
    the update that reaches `total`, or, when the total is unknown, the last one seen, printed
    when the next stage starts or the work ends (`close`). A stage's clock starts at its first
    update (the callers report work done, not work begun); the estimate is the pace since then
    applied to what is left, so the first line has none, and there is none while the total is
    unknown.
    """

    def __init__(
        self,
        file: IO[str],
        units: Mapping[str, str] | None = None,
        interval: float = PROGRESS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.file = file
        self.units = dict(units or {})
        self.interval = interval
        self.clock = clock
        self._stage: str | None = None
        self._start = 0.0
        self._first = 0  # `done` at the stage's first update
        self._printed_at = 0.0
        self._printed: tuple[int, int] | None = None
        self._pending: tuple[int, int] | None = None  # the last update not printed

    def update(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage != self._stage:
            self.close()
            self._stage, self._start, self._first, self._printed = stage, now, done, None
            self._print(done, total, now)
            return
        if (done, total) == self._printed:
            return
        finished = total > 0 and done >= total
        if finished or now - self._printed_at >= self.interval:
            self._print(done, total, now)
        else:
            self._pending = (done, total)

    def close(self) -> None:
        """Print the current stage's last update if it was held back."""
        if self._pending is not None:
            self._print(*self._pending, self.clock())

    def _print(self, done: int, total: int, now: float) -> None:
        assert self._stage is not None
        elapsed = now - self._start
        line = f"progress: {self._stage} {_count(done, total, self.units.get(self._stage, ''))}"
        if done > self._first:
            line += f", {_seconds(elapsed)} elapsed"
            if done < total:
                pace = elapsed / (done - self._first)
                line += f", ~{_seconds(pace * (total - done))} left"
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except (OSError, ValueError):  # a closed pipe must not end the run
            pass
        self._printed_at = now
        self._printed = (done, total)
        self._pending = None


@contextmanager
def staged_progress(
    console: Console,
    title: str | None = None,
    units: Mapping[str, str] | None = None,
    enabled: bool = True,
) -> Iterator[StagedUpdate | None]:
    """The progress of a command's stages, on `console` (stderr: stdout carries --json).

    Yields `update(stage, done, total)` (None when disabled). On a terminal: rich bars, one
    per stage (an earlier stage's bar goes when the next starts), below a spinner line `title`
    while no stage has begun. Off a terminal (CI logs, pipes): `PlainProgress` lines.
    `units` names what a stage counts ("runs", "rounds"); total 0 means unknown.

    Every progress display of the CLI comes from here (`progress_bar` is the one-stage case).
    """
    if not enabled:
        yield None
        return
    units = dict(units or {})
    if not console.is_terminal:
        plain = PlainProgress(console.file, units)
        try:
            yield plain.update
        finally:
            plain.close()
        return
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        TextColumn("{task.fields[count]}", markup=False),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}
        if title is not None:
            tasks[""] = bar.add_task(title, total=None, count="")

        def update(stage: str, done: int, total: int) -> None:
            known = total > 0 and done <= total
            if stage not in tasks:
                for task in tasks.values():  # an earlier stage is over
                    bar.update(task, visible=False)
                tasks[stage] = bar.add_task(stage, total=None, count="")
            bar.update(
                tasks[stage],
                completed=done,
                total=total if known else None,
                count=_count(done, total, units.get(stage, "")),
            )

        yield update


@contextmanager
def progress_bar(
    console: Console, label: str, enabled: bool = True, unit: str = ""
) -> Iterator[Callable[[int, int], None] | None]:
    """A one-stage `staged_progress`: yields `update(done, total)`, or None when disabled.

    Every command's progress (parity, localize, bench, optimize --bench) comes from here or
    from `staged_progress`: a rich bar on a terminal, throttled plain lines off one.
    """
    with staged_progress(console, units={label: unit}, enabled=enabled) as staged:
        if staged is None:
            yield None
            return
        update = staged

        def one(done: int, total: int) -> None:
            update(label, done, total)

        yield one


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
