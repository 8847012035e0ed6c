"""The `onnxshrink bench` command: latency of one or more models, interleaved, per provider."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from onnxshrink.bench import BenchReport


def register(app: typer.Typer) -> None:
    """Add the command to the CLI app."""
    app.command("bench", help=_paragraphs(bench.__doc__ or ""))(bench)


def _paragraphs(doc: str) -> str:
    # Typer's rich help keeps the docstring's line breaks after the first paragraph; join the
    # lines of each paragraph so the terminal wraps them.
    blocks = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in b.splitlines()) for b in blocks)


def bench(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="One or more ONNX models. The first is the reference for the ratio column.",
            show_default=False,
        ),
    ],
    provider: Annotated[
        list[str] | None,
        typer.Option(
            "--provider",
            "-p",
            help="Execution providers, comma-separated or repeated: cpu, cuda, tensorrt "
            "(ORT's CPU, CUDA and TensorRT EPs; the GPU ones need onnxruntime-gpu, and TensorRT "
            "its libraries). One that is not available is reported and skipped. \\[default: cpu]",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="Intra-op threads per session \\[default: ONNX Runtime's, one per physical core].",
            show_default=False,
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            help="Axis 0 of generated inputs whose axis 0 the model leaves dynamic (throughput "
            "counts it as samples) \\[default: 1, or what --input-shape says].",
            show_default=False,
        ),
    ] = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="Dims of a generated input, NAME:D0,D1,... e.g. x:1,3,48,320 (repeatable; "
            "applies to every model that has that input). Unknown dims default to 1 on axis 0 "
            "and 32 elsewhere.",
            show_default=False,
        ),
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            help="An .npz with one array per input name (a folder: its first .npz), used as "
            "is for every model, instead of generated random inputs.",
            show_default=False,
        ),
    ] = None,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed interleaved rounds before timing.")
    ] = 10,
    runs: Annotated[
        int,
        typer.Option(
            "--runs", help="Timed rounds; each runs every model once, rotating the order."
        ),
    ] = 50,
    iobinding: Annotated[
        bool,
        typer.Option(
            "--iobinding",
            help="Bind inputs and outputs on the provider's device (ORT IOBinding): inputs "
            "are copied once, outputs stay on the device, so host-device transfers are not "
            "timed. On CPU it binds CPU buffers.",
        ),
    ] = False,
    trt_fp16: Annotated[
        bool,
        typer.Option(
            "--trt-fp16",
            help="Let TensorRT build FP16 engines (trt_fp16_enable); changes numerics.",
        ),
    ] = False,
    trt_cache: Annotated[
        Path | None,
        typer.Option(
            "--trt-cache",
            help="Keep TensorRT engines in this folder across runs (trt_engine_cache_path) "
            "\\[default: a temporary folder, so session time includes the engine build].",
            show_default=False,
        ),
    ] = None,
    device_id: Annotated[
        int, typer.Option("--device-id", help="GPU index for CUDA and TensorRT.")
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for generated inputs.")] = 0,
    json_path: Annotated[
        str | None,
        typer.Option(
            "--json",
            help="Also write every figure as JSON to this file; '-' prints only the JSON, on "
            "stdout.",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log what happens.")] = False,
) -> None:
    """Measure latency, throughput, session time, peak memory and node placement of MODELs on
    ONNX Runtime, with all models in one process, run in interleaved rounds (A B, B A, ...), so
    that their ratio holds on a noisy machine.

    Reports p50/p90/mean latency, throughput (samples/s), session creation time, peak memory
    (CPU: resident memory growth over session creation and the first run; GPU: device memory
    growth), the ratio of each p50 to the first model's on the same provider, and the share of
    nodes each execution provider ran (from an ORT profile). Warns when the requested provider
    did not run most of the nodes, and when a quantized model falls back to CPU on CUDA or
    TensorRT.

    Exit codes: 0 when at least one provider ran; 1 when nothing ran (every provider skipped,
    every model failed); 2 bad input (missing model, bad --provider, --input-shape, --inputs).
    """
    from onnxshrink import cli
    from onnxshrink.bench import benchmark, parse_providers
    from onnxshrink.cli_parity import _progress
    from onnxshrink.engine.io import write_text_atomic
    from onnxshrink.engine.shapes import parse_input_shapes
    from onnxshrink.errors import OnnxShrinkError, UsageError

    cli._setup_logging(verbose)
    json_to_stdout = json_path == "-"
    try:
        providers = parse_providers(provider or ["cpu"])
        shapes = parse_input_shapes(input_shape)
        if json_path and not json_to_stdout:
            parent = Path(json_path).parent
            if not parent.is_dir():
                raise UsageError(f"--json {json_path}: folder {parent} does not exist")
        with _progress(cli.err, "benchmarking", not json_to_stdout) as progress:
            report = benchmark(
                [str(m) for m in models],
                providers,
                threads=threads,
                batch=batch,
                input_shapes=shapes,
                inputs=inputs,
                warmup=warmup,
                runs=runs,
                iobinding=iobinding,
                progress=progress,
                device_id=device_id,
                trt_fp16=trt_fp16,
                trt_cache=trt_cache,
                seed=seed,
            )
    except OnnxShrinkError as exc:
        cli._fail(str(exc), exc.exit_code)
    except Exception as exc:  # a bug of ours: still one line, the traceback only with -v
        if verbose:
            raise
        cli._fail(
            f"internal error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)", 1
        )

    if json_to_stdout:
        # Plain text, not rich: nothing wrapped or coloured, so it parses.
        typer.echo(report.to_json())
    else:
        _print_report(cli.out, report)
        if json_path:
            try:
                write_text_atomic(Path(json_path), report.to_json() + "\n")
            except OSError as exc:
                cli._fail(f"--json {json_path}: cannot write ({exc.strerror or exc})", 2)
    for provider_name, reason in report.skipped:
        cli.err.print(
            f"[yellow]skipped {provider_name}:[/yellow] {escape(reason)}",
            highlight=False,
            soft_wrap=True,
        )
    if json_to_stdout:
        for warning in report.warnings:
            cli.err.print(
                f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True
            )
    if not report.rows:
        cli._fail("nothing ran: every requested provider or model was skipped (see above)", 1)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.2f}"


def _placement(shares: dict[str, float]) -> str:
    if not shares:
        return "?"
    return ", ".join(f"{p.removesuffix('ExecutionProvider')} {s:.0%}" for p, s in shares.items())


def _print_report(console, report: BenchReport) -> None:
    env = report.environment
    threads = env.threads if env.threads is not None else "ORT default"
    header = (
        f"[bold]onnxshrink bench[/bold]: ONNX Runtime {env.onnxruntime}, {env.cpu_count} CPUs, "
        f"intra-op threads {threads}"
        + (f", GPU {env.gpu}" if env.gpu else "")
        + f"; {report.warmup} warmup + {report.runs} timed interleaved rounds"
        + (", IOBinding" if report.iobinding else "")
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
            _fmt(r.peak_mb, ".1f"),
            _fmt(r.ratio, ".3f"),
            _placement(r.placement),
        )
    # Off a terminal (logs, pipes) print the table whole rather than crop it at 120 columns.
    if console.is_terminal:
        console.print(table)
    else:
        Console(file=console.file, width=200).print(table)
    gpu_rows = [r for r in report.rows if r.provider != "cpu"]
    notes = ["peak MB: resident memory growth over session creation and the first run"]
    if gpu_rows:
        notes.append(
            "on GPU rows, device memory growth (" + (gpu_rows[0].peak_source or "n/a") + ")"
        )
    console.print("; ".join(notes), style="dim", highlight=False)
    for warning in report.warnings:
        console.print(
            f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True
        )
