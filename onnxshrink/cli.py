"""The `onnxshrink` command line. The CLI owns the terminal: rich tables, one-line errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from onnxshrink import __version__
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.optimize import ModelSummary, OptimizeResult
from onnxshrink.parity import DEFAULT_ATOL, DEFAULT_RTOL

app = typer.Typer(
    help="Post-export ONNX model compressor: rewrites a model with lossless rules and "
    "verifies the result against the original with ONNX Runtime.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)
# Off a terminal (CI logs, pipes) rich would wrap at 80 columns; tables read better wider.
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _version(value: bool) -> None:
    if value:
        out.print(f"onnxshrink {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """onnxshrink: make exported ONNX models smaller and faster, with proof of parity."""


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="The ONNX model to optimize (never modified).")],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Where to write the result \\[default: MODEL.opt.onnx beside MODEL].",
        ),
    ] = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="Pin a dynamic input's dims, e.g. x:1,3,48,320 (repeatable). The output keeps "
            "that shape, and shape computations are folded for it.",
        ),
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            help="Inputs for the parity check: an .npz with one array per model input, or a "
            "folder of them \\[default: generated random inputs].",
        ),
    ] = None,
    opset: Annotated[
        int | None,
        typer.Option(
            "--opset",
            help="Raise the ai.onnx opset first (e.g. 17 enables LayerNormalization fusion).",
        ),
    ] = None,
    rtol: Annotated[
        float,
        typer.Option(
            "--rtol", help="Largest relative output error accepted: max|new-old| / max|old|."
        ),
    ] = DEFAULT_RTOL,
    atol: Annotated[
        float,
        typer.Option(
            "--atol", help="Absolute slack added to the bound, for outputs that are nearly zero."
        ),
    ] = DEFAULT_ATOL,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify", help="Compare outputs with the original before writing."
        ),
    ] = True,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Generated input samples for parity.")
    ] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed for generated inputs.")] = 0,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Also write a report of the run: .html (self-contained, with charts), .md or .json.",
        ),
    ] = None,
    bench: Annotated[
        bool,
        typer.Option(
            "--bench",
            help="After writing, time the original and the result in interleaved runs "
            "(as `onnxshrink bench` does); the table goes into the output and the report.",
        ),
    ] = False,
    bench_provider: Annotated[
        str,
        typer.Option(
            "--bench-provider", help="Providers for --bench: cpu, cuda, tensorrt (comma-separated)."
        ),
    ] = "cpu",
    bench_runs: Annotated[
        int, typer.Option("--bench-runs", min=1, help="Timed runs per model for --bench.")
    ] = 30,
    verbose: Annotated[
        bool,
        typer.Option(
            "-v", "--verbose", help="Show every rule, including those that declined and why."
        ),
    ] = False,
) -> None:
    """Apply the lossless rules (dead-layer removal, constant folding, operator fusion), check
    parity with ONNX Runtime CPU, and write the result atomically.

    Exit codes: 0 written; 1 parity failed or internal failure (nothing written); 2 bad input.
    """
    from onnxshrink.optimize import optimize as run_optimize
    from onnxshrink.shapes import parse_input_shapes

    _setup_logging(verbose)
    target = output if output is not None else model.with_name(model.stem + ".opt.onnx")
    bench_report = None
    try:
        shapes = parse_input_shapes(input_shape)
        if report is not None:
            from onnxshrink.report import report_format

            report_format(report)  # a bad --report path fails before the work, not after
        with (
            err.status(f"optimizing {model.name}...", spinner="dots")
            if err.is_terminal
            else _null()
        ):
            result = run_optimize(
                model,
                target,
                input_shapes=shapes,
                inputs=inputs,
                opset=opset,
                rtol=rtol,
                atol=atol,
                verify=verify,
                samples=samples,
                seed=seed,
            )
        if bench:
            from onnxshrink.bench import benchmark, parse_providers
            from onnxshrink.cli_parity import _progress

            with _progress(err, "benchmarking") as progress:
                bench_report = benchmark(
                    [str(model), str(result.output_path)],
                    parse_providers(bench_provider),
                    input_shapes=shapes,
                    inputs=inputs,
                    runs=bench_runs,
                    progress=progress,
                )
    except OnnxShrinkError as exc:
        _fail(str(exc), exc.exit_code)
    except Exception as exc:  # a bug of ours: still one line, the traceback only with -v
        if verbose:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)", 1)
    _print_result(model, result, verbose)
    if bench_report is not None:
        from onnxshrink.cli_bench import _print_report

        _print_report(out, bench_report)
        for provider_name, reason in bench_report.skipped:
            err.print(
                f"[yellow]bench skipped {provider_name}:[/yellow] {reason}",
                highlight=False,
                soft_wrap=True,
            )
    if report is not None:
        import shlex

        from onnxshrink.report import write_report

        try:
            written = write_report(
                report,
                result,
                command=shlex.join(["onnxshrink", *sys.argv[1:]]),
                model_path=str(model),
                output_path=result.output_path,
                bench=bench_report,
            )
        except OnnxShrinkError as exc:
            _fail(str(exc), exc.exit_code)
        out.print(f"report: {written}")


def _register_commands() -> None:
    # Commands that live in their own modules; each adds itself to `app`.
    from onnxshrink import cli_bench, cli_parity

    cli_parity.register(app)
    cli_bench.register(app)


_register_commands()


@app.command("rules")
def list_rules() -> None:
    """List the rules `optimize` applies, in order."""
    from onnxshrink.rules import CLEANUP_RULES, FUSION_RULES, lossless_passes

    table = Table(title="onnxshrink rules, in the order they run")
    table.add_column("pass")
    table.add_column("rule")
    table.add_column("min opset", justify="right")
    table.add_column("what it does")
    for p in lossless_passes():
        rules = getattr(p, "rules", None)
        if rules is None:
            table.add_row(p.name, "", "", _first_line(getattr(p, "fn", None)))
            continue
        for rule in rules:
            table.add_row(p.name, rule.name, str(rule.min_opset), _first_line(type(rule)))
    del CLEANUP_RULES, FUSION_RULES
    out.print(table)


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _change(before: float, after: float) -> str:
    if before == 0:
        return ""
    pct = (after - before) / before * 100
    return f"{pct:+.1f}%"


def _print_result(model: Path, result: OptimizeResult, verbose: bool) -> None:
    b: ModelSummary = result.before
    a: ModelSummary = result.after
    where = str(result.output_path) if result.output_path else "(not written)"
    out.print(f"[bold]onnxshrink optimize[/bold] {model} -> {where}  ({result.seconds:.2f} s)")

    summary = Table(show_header=True, header_style="bold")
    summary.add_column("")
    summary.add_column("before", justify="right")
    summary.add_column("after", justify="right")
    summary.add_column("change", justify="right")
    summary.add_row("nodes", str(b.nodes), str(a.nodes), _change(b.nodes, a.nodes))
    if b.nodes_total != b.nodes or a.nodes_total != a.nodes:
        summary.add_row(
            "nodes incl. subgraphs",
            str(b.nodes_total),
            str(a.nodes_total),
            _change(b.nodes_total, a.nodes_total),
        )
    summary.add_row(
        "initializers",
        str(b.initializers),
        str(a.initializers),
        _change(b.initializers, a.initializers),
    )
    summary.add_row(
        "parameters", f"{b.parameters:,}", f"{a.parameters:,}", _change(b.parameters, a.parameters)
    )
    summary.add_row("size", _fmt_bytes(b.bytes), _fmt_bytes(a.bytes), _change(b.bytes, a.bytes))
    out.print(summary)

    ops = sorted(set(b.ops) | set(a.ops))
    changed = [op for op in ops if b.ops.get(op, 0) != a.ops.get(op, 0)]
    if changed:
        hist = Table(title="op types that changed", show_header=True, header_style="bold")
        hist.add_column("op")
        hist.add_column("before", justify="right")
        hist.add_column("after", justify="right")
        for op in sorted(changed, key=lambda o: a.ops.get(o, 0) - b.ops.get(o, 0)):
            hist.add_row(op, str(b.ops.get(op, 0)), str(a.ops.get(op, 0)))
        out.print(hist)

    applied = result.stats.applied
    if applied or verbose:
        rules = Table(title="rules applied", show_header=True, header_style="bold")
        rules.add_column("rule")
        rules.add_column("times", justify="right")
        if verbose:
            rules.add_column("seconds", justify="right")
        for name, count in applied.most_common():
            row = [name, str(count)]
            if verbose:
                row.append(f"{result.stats.seconds.get(name, 0.0):.3f}")
            rules.add_row(*row)
        out.print(rules)
    if verbose and result.stats.declined:
        declined = Table(title="rules that declined", show_header=True, header_style="bold")
        declined.add_column("rule")
        declined.add_column("reason")
        declined.add_column("times", justify="right")
        for (name, reason), count in sorted(result.stats.declined.items()):
            declined.add_row(name, reason, str(count))
        out.print(declined)

    for note in result.notes:
        if not note.startswith("parity not verified"):
            out.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    parity = result.parity
    if parity is None:
        out.print("[yellow]parity not checked (--no-verify)[/yellow]")
    elif not parity.verified:
        out.print(f"[yellow]parity not verified: {parity.reason}[/yellow]")
    else:
        out.print(
            f"parity vs original: ONNX Runtime CPU, {parity.samples} input sample(s), rtol {parity.rtol:g}"
        )
        table = Table(show_header=True, header_style="bold")
        table.add_column("output")
        table.add_column("max abs err", justify="right")
        table.add_column("max rel err", justify="right")
        table.add_column("")
        for o in parity.outputs:
            table.add_row(
                o.name,
                f"{o.max_abs:.2e}",
                f"{o.max_rel:.2e}",
                "[green]ok[/green]" if o.ok else "[red]FAIL[/red]",
            )
        out.print(table)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # onnx-graphsurgeon logs its own warnings through its own logger; keep them for -v.
    if not verbose:
        try:
            import onnx_graphsurgeon as gs

            gs.logger.severity = gs.logger.ERROR
        except Exception:
            pass


def _fail(message: str, code: int) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()
