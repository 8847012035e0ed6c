"""The `onnxshrink bench` command: latency of one or more models, interleaved, per provider."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onnxshrink.cli.common import (
    VERBOSE_HELP,
    err,
    fail,
    one_line_errors,
    out,
    print_bench_report,
    progress_bar,
    setup_logging,
    styled,
)
from onnxshrink.cli.help_layout import paragraphs
from onnxshrink.verify.parity import BATCH_HELP


def register(app: typer.Typer) -> None:
    """Add the command to the CLI app."""
    app.command("bench", help=paragraphs(bench.__doc__ or ""))(bench)


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
        typer.Option("--batch", min=1, metavar="N", help=BATCH_HELP, show_default=False),
    ] = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            metavar="NAME:DIMS",
            help="Dims of a generated input: x:1,3,48,320, x:[1,3,48,320] or x:1x3x48x320 "
            "(repeatable; "
            "applies to every model that has that input). Unknown dims default to 1 on axis 0 "
            "and 32 elsewhere.",
            show_default=False,
        ),
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            help="An .npz with one array per input name, axis 0 the samples (or a folder of "
            "them), instead of generated random inputs: every model is timed on its first run "
            "of --batch samples (a model pinned to batch 1: one sample).",
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
    verbose: Annotated[
        int,
        typer.Option("-v", "--verbose", count=True, help="Log what happens. " + VERBOSE_HELP),
    ] = 0,
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

    \b
    Examples:
      onnxshrink bench model.onnx model.opt.onnx
      onnxshrink bench a.onnx b.onnx --provider cpu,cuda --runs 100
      onnxshrink bench model.onnx --input-shape x:8,3,224,224 --threads 4
      onnxshrink bench a.onnx b.onnx --inputs sample.npz --json bench.json
      onnxshrink bench a.onnx b.onnx -p tensorrt --trt-fp16 --trt-cache trt/
    """
    from onnxshrink.bench import benchmark, parse_providers
    from onnxshrink.engine.io import write_text_atomic
    from onnxshrink.engine.shapes import parse_input_shapes
    from onnxshrink.errors import UsageError

    setup_logging(verbose)
    json_to_stdout = json_path == "-"
    with one_line_errors(verbose):
        providers = parse_providers(provider or ["cpu"])
        shapes = parse_input_shapes(input_shape)
        if json_path and not json_to_stdout:
            parent = Path(json_path).parent
            if not parent.is_dir():
                raise UsageError(f"--json {json_path}: folder {parent} does not exist")
        with progress_bar(err, "benchmarking", unit="rounds") as progress:
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

    if json_to_stdout:
        # Plain text, not rich: nothing wrapped or coloured, so it parses.
        typer.echo(report.to_json())
    else:
        print_bench_report(out, report)
        if json_path:
            try:
                write_text_atomic(Path(json_path), report.to_json() + "\n")
            except OSError as exc:
                fail(f"--json {json_path}: cannot write ({exc.strerror or exc})", 2)
    for provider_name, reason in report.skipped:
        err.print(
            styled((f"skipped {provider_name}:", "yellow"), f" {reason}"),
            highlight=False,
            soft_wrap=True,
        )
    if json_to_stdout:
        for warning in report.warnings:
            err.print(
                styled(("warning:", "yellow"), f" {warning}"), highlight=False, soft_wrap=True
            )
    if not report.rows:
        fail("nothing ran: every requested provider or model was skipped (see above)", 1)
