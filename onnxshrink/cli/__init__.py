"""The `onnxshrink` command line. The CLI owns the terminal: rich tables, one-line errors.

This module holds the typer `app`, `main` (the console script) and the `optimize` and `rules`
commands; `parity` and `bench` live in their own modules and register themselves on `app`.
What the commands share (consoles, failures, progress bars, the benchmark table) is in
`onnxshrink.cli.common`.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from onnxshrink import __version__
from onnxshrink.cli import help_layout
from onnxshrink.cli.common import (
    VERBOSE_HELP,
    err,
    fail,
    fmt,
    one_line_errors,
    out,
    print_bench_report,
    progress_bar,
    setup_logging,
    staged_progress,
    styled,
)
from onnxshrink.cli.help_layout import paragraphs
from onnxshrink.engine.optimize import ModelSummary, OptimizeResult
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.quant.calibration import DEFAULT_BATCH as CALIBRATION_BATCH
from onnxshrink.quant.sensitivity import DEFAULT_MAX_ERROR
from onnxshrink.quant.sparsity import DEFAULT_SPARSIFY_MAX_ERROR
from onnxshrink.quant.targets import TARGETS as QUANTIZE_TARGETS
from onnxshrink.rules import LOSSY_STAGES
from onnxshrink.verify.parity import (
    BATCH_HELP,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    DEFAULT_TIME_LIMIT,
    samples_text,
)

help_layout.install()

app = typer.Typer(
    help="Post-export ONNX model compressor: rewrites a model with lossless rules and "
    "verifies the result against the original with ONNX Runtime.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)


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


def optimize(
    ctx: typer.Context,
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
            metavar="NAME:DIMS",
            help="Pin a dynamic input's dims (repeatable): x:1,3,48,320, Polygraphy's "
            "x:[1,3,48,320] or trtexec's x:1x3x48x320. The output keeps that shape, and shape "
            "computations are folded for it.",
        ),
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            help="Inputs for the parity check: an .npz with one array per model input, or a "
            "folder of them \\[default: generated random inputs]. With --quantize, the int8 "
            "model is judged on them too: give held-out samples, not the calibration data.",
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
    allow_unverified: Annotated[
        bool,
        typer.Option(
            "--allow-unverified",
            help="Write the result even when the parity check cannot run (ONNX Runtime cannot "
            "run the original, e.g. custom ops); the output says so. Without it that is exit 1 "
            "and nothing is written, so that exit 0 always means verified.",
        ),
    ] = False,
    debug_verify: Annotated[
        bool,
        typer.Option(
            "--debug-verify",
            help="Check the model after every pass that changed it: onnx.checker, then parity "
            "with the model just before that pass (ONNX Runtime CPU, --samples generated "
            "inputs, --rtol/--atol). Stops at the first pass that breaks the model and names "
            "it, what it applied and the passes before it (exit 1, nothing written). Slow: "
            "for finding the pass behind a parity failure.",
        ),
    ] = False,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Generated input samples for parity.")
    ] = 2,
    time_limit: Annotated[
        float,
        typer.Option(
            "--time-limit",
            min=0.0,
            metavar="SECONDS",
            help="Stop any one ONNX Runtime run of the parity check (one model, one input) "
            "that takes longer than this: exit 1, nothing written. A model whose Loop never "
            "ends cannot hang the command. 0: no limit.",
        ),
    ] = DEFAULT_TIME_LIMIT,
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
            "(as `onnxshrink bench` does), and with a lossy stage the lossless fp32 rewrite "
            "between them; the table goes into the output and the report.",
        ),
    ] = False,
    json_path: Annotated[
        str | None,
        typer.Option(
            "--json",
            metavar="PATH|-",
            help="Also write every figure of the run as JSON to PATH (what --report x.json "
            "holds, plus the verdict and phase times); '-' prints only the JSON, on stdout.",
            show_default=False,
        ),
    ] = None,
    bench_provider: Annotated[
        str,
        typer.Option(
            "--bench-provider", help="Providers for --bench: cpu, cuda, tensorrt (comma-separated)."
        ),
    ] = "cpu",
    bench_runs: Annotated[
        int, typer.Option("--bench-runs", min=1, help="Timed runs per model for --bench.")
    ] = 30,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            metavar="|".join(stage.name for stage in LOSSY_STAGES),
            help="Also run a lossy stage, within the --max-error budget and checked on --inputs: "
            + "; ".join(f"{stage.name}: {stage.summary}" for stage in LOSSY_STAGES)
            + ". Needs --calibration-data.",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = None,
    calibration_data: Annotated[
        str | None,
        typer.Option(
            "--calibration-data",
            metavar="SPEC",
            help="Samples for calibration and the error budget: an .npz with one array per "
            "model input (N samples along axis 0), a folder of .npz files, a loader script "
            "loader.py[:FUNCTION] (FUNCTION defaults to load_data: called with no arguments, "
            "it returns or yields feed dicts {input name: array}; the script may import "
            "modules beside it), or 'random' (synthetic; poor ranges, flagged in the output). "
            "Used only by --quantize and --sparsify: without them it is an error.",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option("--batch", min=1, metavar="N", help=BATCH_HELP),
    ] = None,
    calibration_batch: Annotated[
        int,
        typer.Option(
            "--calibration-batch",
            min=1,
            hidden=True,  # the older name of --batch's default; --batch N sets both
            help="Runs of at most this many samples where --batch is not given.",
        ),
    ] = CALIBRATION_BATCH,
    calibration_method: Annotated[
        str,
        typer.Option(
            "--calibration-method",
            metavar="minmax|percentile|entropy|mse",
            help="How activation ranges are chosen from the calibration statistics.",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = "percentile",
    calibration_workers: Annotated[
        int,
        typer.Option(
            "--calibration-workers",
            min=1,
            metavar="N",
            help="Run int8's statistics pass on N shards of the calibration samples in N "
            "processes, each with its own ONNX Runtime session on CPUs/N threads; the ranges "
            "are identical to one process's. Default 1 (in this process).",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = 1,
    search_workers: Annotated[
        int,
        typer.Option(
            "--search-workers",
            min=1,
            metavar="N",
            help="Measure the sensitivity ranking's candidates (each layer applied alone) in N "
            "processes, each with its own ONNX Runtime sessions on CPUs/N threads; the ranking "
            "and the result are those of one process. Default 1 (in this process).",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = 1,
    quantize_target: Annotated[
        str,
        typer.Option(
            "--target",
            metavar="|".join(QUANTIZE_TARGETS),
            help="The runtime the lossy layout is for: ort-cpu (uint8 activations, Q/DQ on "
            "layer inputs and on Conv/Gemm outputs for ORT's int8 kernels), tensorrt (symmetric int8, Q/DQ on "
            "inputs, residual Adds and pooling), or ort-cuda (ORT's CUDA EP has no int8 "
            "convolution kernels: weights stored int8, compute in float).",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = "ort-cpu",
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            metavar="REGEX",
            help="Keep a node float when REGEX is found in its name or matches its op type "
            "(repeatable; e.g. --exclude Conv keeps every Conv float).",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = None,
    max_error: Annotated[
        float | None,
        typer.Option(
            "--max-error",
            show_default=False,
            help="Error budget: the noise-to-signal ratio sum (q-f)^2 / sum f^2 allowed on "
            "calibration samples, per output channel group (so a small-valued part of an "
            "output counts as much as a large one), worst output; padded positions left out "
            "(--mask-input). The most sensitive layers stay float (or dense) until it holds "
            "(measured on up to 32 calibration samples). Default "
            f"{DEFAULT_MAX_ERROR:g} ({-10 * math.log10(DEFAULT_MAX_ERROR):.0f} dB SNR) for "
            f"--quantize, {DEFAULT_SPARSIFY_MAX_ERROR:g} for --sparsify; with both, each stage "
            "has its own budget against the model it starts from. Lower it for more accuracy "
            "(more layers kept: slower, larger), raise it for speed.",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            metavar="MODULE:FUNCTION",
            help="A task metric for the held-out check: FUNCTION(reference, candidate) gets the "
            "original's and the quantized model's outputs of each --inputs batch (dicts of "
            "output name -> array) and returns a number (e.g. 1 - IoU); its mean is reported. "
            "MODULE may be a file.py.",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = None,
    mask_input: Annotated[
        str | None,
        typer.Option(
            "--mask-input",
            metavar="INPUT|none",
            help="An integer input whose zeros mark padded positions (shape \\[batch, seq]): "
            "outputs at those positions are left out of every error figure. Default: an input "
            "named attention_mask, if the model has one; 'none' counts every position.",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = None,
    block_size: Annotated[
        int,
        typer.Option(
            "--block-size",
            metavar="16|32|64|128|256",
            help="int4: values per block along the reduction axis, each block with its own "
            "scale (and zero point). Smaller blocks: more accurate, a larger file.",
            rich_help_panel="int4",
        ),
    ] = 32,
    int4_method: Annotated[
        str,
        typer.Option(
            "--int4-method",
            metavar="rtn|gptq",
            help="int4: gptq uses the layer inputs seen on --calibration-data to spread each "
            "rounding error over the weights not yet rounded (lower output error, one more "
            "pass over the calibration data); rtn rounds each weight to the nearest step.",
            rich_help_panel="int4",
        ),
    ] = "gptq",
    symmetric: Annotated[
        bool,
        typer.Option(
            "--symmetric",
            help="int4: a grid symmetric about 0 (no zero points) instead of one fitted to each "
            "block's range.",
            rich_help_panel="int4",
        ),
    ] = False,
    accuracy_level: Annotated[
        int,
        typer.Option(
            "--accuracy-level",
            min=0,
            max=4,
            help="int4 on ort-cpu/ort-cuda: MatMulNBits' accuracy_level. 4 lets ONNX Runtime "
            "quantize the float input to int8 per block inside the kernel (its fast path on CPUs "
            "with VNNI); 0 computes on the float input. The error budget measures the choice.",
            rich_help_panel="int4",
        ),
    ] = 4,
    sparsify: Annotated[
        str | None,
        typer.Option(
            "--sparsify",
            metavar="unstructured:R|N:M|channels:R",
            help="Also prune weights, within the --max-error budget (layers too sensitive stay "
            "dense) and checked on --inputs: unstructured:R zeroes a share R of each layer's "
            "weights (smaller compressed file, same speed); N:M (e.g. 2:4) keeps at most N "
            "non-zeros in every M weights along the reduction axis (TensorRT's sparse tensor "
            "cores); channels:R removes a share R of conv/linear output channels, FFN neurons "
            "and attention heads, and refits the next layer to the original's outputs (faster "
            "on every runtime). Data-aware with --calibration-data, by magnitude without. "
            "Runs before --quantize when both are given.",
            rich_help_panel="sparsify",
        ),
    ] = None,
    compress: Annotated[
        bool,
        typer.Option(
            "--compress",
            help="With --sparsify unstructured:R or N:M: store pruned weights packed, so the file "
            "itself shrinks: a bit mask plus the non-zero values, expanded by standard ops that "
            "ONNX Runtime folds into the dense weight at load (or an ONNX sparse initializer "
            "where that is smaller).",
            rich_help_panel="sparsify",
        ),
    ] = False,
    no_reconstruct: Annotated[
        bool,
        typer.Option(
            "--no-reconstruct",
            help="With --sparsify channels:R: skip the teacher-guided reconstruction (the "
            "layers reading pruned channels are otherwise refit by least squares to the "
            "original model's outputs on the calibration data).",
            rich_help_panel="sparsify",
        ),
    ] = False,
    calibration_provider: Annotated[
        str,
        typer.Option(
            "--calibration-provider",
            metavar="cpu|cuda",
            help="ONNX Runtime provider for the calibration pass.",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = "cpu",
    no_speed_check: Annotated[
        bool,
        typer.Option(
            "--no-speed-check",
            help="Keep int8 compute without timing it. By default (target ort-cpu) int8 compute "
            "is timed against float compute with int8 weights on ORT CPU and kept only where "
            "it is faster.",
            rich_help_panel="lossy stages (int8, fp16, int4)",
        ),
    ] = False,
    verbose: Annotated[
        int,
        typer.Option(
            "-v",
            "--verbose",
            count=True,
            help="Also list the rules that declined and why, and the time per rule; log what "
            "each stage did. " + VERBOSE_HELP,
        ),
    ] = 0,
) -> None:
    """Apply the lossless rules (dead-layer removal, constant folding, operator fusion), check
    parity with ONNX Runtime CPU, and write the result atomically.

    With --quantize int8, the lossless result is then quantized to int8 (QDQ, per-channel
    weights): activation ranges come from --calibration-data; the layers whose quantization
    hurts the outputs most stay float until the error on calibration samples is within
    --max-error. The int8 model is then compared with the original on --inputs (use held-out
    samples, not the calibration data): cosine, SNR, noise-to-signal ratio, argmax agreement.

    With --quantize int4, MatMul/Gemm weights and Gather (embedding) tables are stored in 4 bits
    per block of --block-size values (ONNX Runtime's MatMulNBits and GatherBlockQuantized, or
    opset-21 blocked DequantizeLinear for --target tensorrt); --int4-method gptq uses the
    calibration data to lower the rounding error; layers that break --max-error stay float.

    Exit codes: 0 written; 1 parity failed, a parity run passed --time-limit, --debug-verify
    caught a broken pass, or internal failure (nothing written); 2 bad input; 3 written, but
    --bench could not time every model.

    \b
    Examples:
      onnxshrink optimize model.onnx
      onnxshrink optimize model.onnx -o small.onnx --opset 20 -v
      onnxshrink optimize model.onnx --input-shape x:1,3,224,224 --bench
      onnxshrink optimize model.onnx --inputs eval.npz --report run.html
      onnxshrink optimize model.onnx --quantize int8 \\
          --calibration-data calib.npz --inputs heldout.npz
      onnxshrink optimize model.onnx --quantize int8 --target tensorrt \\
          --calibration-data loader.py:batches --max-error 0.005
      onnxshrink optimize model.onnx --quantize int4 --calibration-data calib/
      onnxshrink optimize model.onnx --sparsify channels:0.3 \\
          --calibration-data calib/ --inputs heldout/
    """
    from onnxshrink.engine.optimize import optimize as run_optimize
    from onnxshrink.engine.shapes import parse_input_shapes

    setup_logging(verbose)
    target = output if output is not None else model.with_name(model.stem + ".opt.onnx")
    bench_report = None
    with one_line_errors(verbose):
        if quantize is None and sparsify is None:
            _refuse_lossy_only_options(ctx)
        shapes = parse_input_shapes(input_shape)
        if report is not None:
            from onnxshrink.report import report_format

            report_format(report)  # a bad --report path fails before the work, not after
        if json_path not in (None, "-"):
            from onnxshrink.engine.io import check_output_path

            check_output_path(json_path)  # likewise a bad --json path
        lossy = quantize is not None or sparsify is not None
        # with a lossy stage, --bench also times the lossless model, written aside from memory
        scratch = tempfile.TemporaryDirectory(prefix="onnxshrink-") if bench and lossy else None
        with _optimize_progress(err, model.name) as progress:
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
                quantize=quantize,
                calibration_data=calibration_data,
                calibration_method=calibration_method,
                calibration_workers=calibration_workers,
                search_workers=search_workers,
                target=quantize_target,
                exclude=tuple(exclude or ()),
                max_error=max_error,
                calibration_provider=calibration_provider,
                check_speed=not no_speed_check,
                calibration_batch=calibration_batch,
                batch=batch,
                metric=metric,
                mask_input=mask_input,
                block_size=block_size,
                int4_method=int4_method,
                symmetric=symmetric,
                accuracy_level=accuracy_level,
                sparsify=sparsify,
                compress=compress,
                reconstruct=not no_reconstruct,
                allow_unverified=allow_unverified,
                progress=progress,
                debug_verify=debug_verify,
                time_limit=time_limit,
                lossless_output=Path(scratch.name, "lossless.onnx") if scratch else None,
            )
        bench_seconds = time.perf_counter()
        if bench:
            from onnxshrink.bench import benchmark_optimized, parse_providers

            with progress_bar(err, "benchmarking", unit="rounds") as bench_progress:
                bench_report = benchmark_optimized(
                    model,
                    result,
                    parse_providers(bench_provider),
                    input_shapes=shapes,
                    inputs=inputs,
                    runs=bench_runs,
                    batch=batch,
                    progress=bench_progress,
                )
        bench_seconds = time.perf_counter() - bench_seconds
        if scratch is not None:
            scratch.cleanup()
    stdout = sys.stdout
    if json_path == "-":  # only the JSON on stdout: what is printed for people goes to stderr
        sys.stdout = sys.stderr  # `out` writes to whatever sys.stdout is when it prints
    _print_result(model, result, verbose)
    if result.quantization is not None:
        _print_quantization(result)
    if bench_report is not None:
        print_bench_report(out, bench_report)
        for provider_name, reason in bench_report.skipped:
            err.print(
                styled(
                    ("warning:", "yellow"), f" --bench could not time on {provider_name}: {reason}"
                ),
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
            fail(str(exc), exc.exit_code)
        out.print(f"report: {written}")
    if json_path is not None:
        _write_json(
            json_path, model, result, bench_report, bench_seconds if bench else None, stdout
        )
    if bench_report is not None and bench_report.skipped:
        # --bench was asked for and did not time every model: exit 3, not 0 (the model is
        # written and verified; CI sees that the timing it asked for is missing)
        fail(
            "--bench did not time every model on every provider (see the warnings); "
            f"the model is written: {result.output_path}",
            3,
        )


def _write_json(
    json_path: str,
    model: Path,
    result: OptimizeResult,
    bench_report,
    bench_seconds: float | None,
    stdout,
) -> None:
    """`optimize --json`: the report's figures (`onnxshrink.report.report_dict`) with the
    command's name first, as `parity --json` has it, and the seconds of each phase."""
    import json
    import shlex

    from onnxshrink.engine.io import write_text_atomic
    from onnxshrink.report import report_dict
    from onnxshrink.verify.parity import jsonable

    data = report_dict(
        result,
        command=shlex.join(["onnxshrink", *sys.argv[1:]]),
        model_path=str(model),
        output_path=result.output_path,
        bench=bench_report,
    )
    quant = data["quantization"]
    phases = {"optimize": result.seconds}
    phases.update((quant or {}).get("phase_seconds") or {})
    if bench_seconds is not None:
        phases["bench"] = bench_seconds
    document = {"command": "optimize", "command_line": data.pop("command"), **data}
    document["phase_seconds"] = phases
    text = json.dumps(jsonable(document), indent=2, allow_nan=False) + "\n"
    if json_path == "-":
        sys.stdout = stdout
        stdout.write(text)
        stdout.flush()
        return
    try:
        write_text_atomic(Path(json_path), text)
    except OSError as exc:
        fail(f"--json {json_path}: cannot write ({exc.strerror or exc})", 2)
    out.print(f"json: {json_path}")


app.command("optimize", help=paragraphs(optimize.__doc__ or ""))(optimize)


#: help panels whose options serve only a lossy stage (--quantize, --sparsify)
LOSSY_PANELS = ("lossy stages (int8, fp16, int4)", "int4", "sparsify")


def _refuse_lossy_only_options(ctx: typer.Context) -> None:
    """UsageError naming the options of a lossy stage given without --quantize or --sparsify.

    An error rather than a warning: `--calibration-data calib.npz` without `--quantize` almost
    always means the user expected int8 and would get an fp32 model with exit 0. Options are
    told apart by their help panel; "given" means set on the command line, not left at the
    default.
    """
    from onnxshrink.errors import UsageError

    given = {
        param.opts[-1]: getattr(param, "rich_help_panel", None)
        for param in ctx.command.params
        if getattr(param, "rich_help_panel", None) in LOSSY_PANELS
        and param.name not in ("quantize", "sparsify")
        # by name: click 8.2+ moved ParameterSource, so identity with one import can fail
        and getattr(ctx.get_parameter_source(param.name or ""), "name", "") == "COMMANDLINE"
    }
    if not given:
        return
    panels = set(given.values())
    need = (
        "--sparsify"
        if panels == {"sparsify"}
        else "--quantize int4 (or int8+int4)"
        if panels == {"int4"}
        else "--quantize or --sparsify"
    )
    names = ", ".join(given)
    raise UsageError(
        f"{names}: it needs {need}, and is not used without (add it, or drop "
        f"{'it' if len(given) == 1 else 'them'})"
    )


def _register_commands() -> None:
    # Commands that live in their own modules; each adds itself to `app`.
    from onnxshrink.cli import bench, fleet, inspect, parity

    parity.register(app)
    bench.register(app)
    inspect.register(app)
    fleet.register(app)


_register_commands()


def list_rules() -> None:
    """List the rules `optimize` applies, in the order they run, with what each does and the
    lowest opset whose ops its rewrite needs (below it the rule declines; `optimize --opset N`
    raises the model's opset first, and `optimize -v` lists the declines with their reasons).

    \b
    Examples:
      onnxshrink rules
      onnxshrink rules | grep fuse
      onnxshrink optimize model.onnx --opset 20 -v
    """
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


app.command("rules", help=paragraphs(list_rules.__doc__ or ""))(list_rules)


#: "Case 1: ", "Cases 1-4: ", "Cases 3 and 4: " at the start of a docstring line
_CASE_PREFIX = re.compile(r"^Cases? [0-9][0-9a-z]*(?:(?:-|, | and )[0-9][0-9a-z]*)*: ")
#: " (case 1)", " (cases 5, 6)", " (case 2b)" anywhere in it
_CASE_REFERENCE = re.compile(r" \(cases? [0-9][0-9a-z]*(?:(?:-|, | and )[0-9][0-9a-z]*)*\)")


def _first_line(obj: object) -> str:
    """The first line of `obj`'s docstring, for users: without the numbered cases that refer
    to the module docstring (which `onnxshrink rules` does not show)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    line = doc.splitlines()[0] if doc else ""
    line = _CASE_REFERENCE.sub("", _CASE_PREFIX.sub("", line))
    return line[:1].upper() + line[1:]


def _fmt_bytes(n: float) -> str:
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


def _print_result(model: Path, result: OptimizeResult, verbose: int) -> None:
    b: ModelSummary = result.before
    a: ModelSummary = result.after
    where = str(result.output_path) if result.output_path else "(not written)"
    out.print(
        styled(("onnxshrink optimize", "bold"), f" {model} -> {where}  ({result.seconds:.2f} s)")
    )

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
        if note.startswith("warning: "):
            out.print(
                styled(("warning:", "yellow"), f" {note[len('warning: ') :]}"), highlight=False
            )
        elif not note.startswith("parity not verified"):
            out.print(styled(("note:", "yellow"), f" {note}"), highlight=False)
    parity = result.parity
    if parity is None:
        out.print("parity not checked (--no-verify)", style="yellow")
    elif not parity.verified:
        out.print(f"parity not verified: {parity.reason}", style="yellow", highlight=False)
    else:
        stage = (
            f" (lossless stage, before {result.quantization.stage})"
            if result.quantization is not None
            else ""
        )
        out.print(
            f"parity vs original{stage}: ONNX Runtime CPU, {samples_text(parity.samples, parity.rows)}, "
            f"rtol {parity.rtol:g}"
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
                Text("ok", style="green") if o.ok else Text("FAIL", style="red"),
            )
        out.print(table)


#: what each stage of `optimize` counts, for its progress line
_STAGE_UNITS = {
    "parity": "runs",
    "calibration": "runs",
    "held-out check": "runs",
    "speed check": "rounds",
    "benchmarking": "rounds",
}


def _optimize_progress(console: Console, name: str):
    """optimize()'s progress callback (stage, done, total), as `staged_progress` shows it: a
    spinner and one bar per stage on a terminal (parity, calibration, sensitivity, speed
    check, held-out check), throttled plain lines off one."""
    return staged_progress(console, f"optimizing {name}", _STAGE_UNITS)


#: rows of the "layers kept float" table in the terminal
KEPT_ROWS = 25


def _print_quantization(result: OptimizeResult) -> None:
    """The lossy stage's section: settings, counts, layers kept float and why, the held-out
    check."""
    q = result.quantization
    assert q is not None  # the caller checks
    budget = q.budget
    out.print()
    seen = f"{q.samples} sample(s) in {q.feeds} run(s)" if q.samples else f"{q.feeds} run(s)"
    # one sample per run (a model pinned to batch 1): say so, not "of at most 8"
    runs_of = "of 1" if q.samples and q.samples == q.feeds else f"of at most {q.batch}"
    method = f", calibration method {q.method}" if q.method else ""
    out.print(
        styled(
            (f"{q.stage} {q.family}", "bold"),
            f": target {q.target}{method}, {seen} {runs_of} from {q.calibration}",
        ),
        highlight=False,
    )
    if q.timings:
        out.print(
            "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in q.timings.items()),
            highlight=False,
        )
    if q.synthetic:
        out.print(
            (
                "warning: no real calibration data: pruned by magnitude, the budget measured "
                "on random inputs. "
                if q.family == "pruning"
                else "warning: calibrated on random inputs; ranges do not come from real data. "
            )
            + "Pass real samples with --calibration-data.",
            style="yellow",
            highlight=False,
        )
    if q.quantize is not None:  # int8
        out.print(
            f"quantized {len(q.quantized)} of {len(q.layers)} Conv/ConvTranspose/Gemm/MatMul "
            f"layers; {len(q.kept_float)} kept float ({len(budget.kept_float)} for accuracy), "
            f"{len(q.quantize.weight_only)} of them with int8 weights; bias correction on "
            f"{len(q.quantize.bias_corrected)} layer(s)",
            highlight=False,
        )
    else:
        out.print(
            f"{q.stage}: {len(q.quantized)} of {len(q.layers)} nodes changed; "
            f"{len(q.kept_float)} kept as they were ({len(budget.kept_float)} for accuracy)",
            highlight=False,
        )
    if q.kept_float:
        # those kept for accuracy first; a long tail of structural reasons goes to the report
        kept = sorted(q.kept_float, key=lambda layer: layer.name not in budget.kept_float)
        table = Table(title=f"layers kept {q.kept_as}", show_header=True, header_style="bold")
        table.add_column("layer")
        table.add_column("op")
        table.add_column("reason")
        for layer in kept[:KEPT_ROWS]:
            table.add_row(layer.name, layer.op, layer.reason or "")
        out.print(table)
        if len(kept) > KEPT_ROWS:
            out.print(f"... and {len(kept) - KEPT_ROWS} more (all in --report)", highlight=False)
    verdict = "within" if budget.within_budget else "OVER"
    out.print(
        f"error on calibration samples (output noise-to-signal, worst channel group): full "
        f"{q.stage} {budget.full_error:.3g} -> final {budget.final_error:.3g}, {verdict} the budget "
        f"{budget.max_error:g} ({budget.sessions} ORT session(s))",
        highlight=False,
    )
    if q.speed is not None:
        from onnxshrink.report.text import shapes_text

        out.print(
            f"speed check (ORT CPU, {q.speed.how}"
            + (f" on {shapes_text(q.speed.input_shapes)}" if q.speed.input_shapes else "")
            + "): float "
            f"{q.speed.float_ms:.2f} ms, int8 compute {q.speed.int8_ms:.2f} ms"
            + (
                ""
                if q.speed.weights_ms is None
                else f", float compute with int8 weights {q.speed.weights_ms:.2f} ms"
            )
            + f"; result {q.speed.ratio:.2f}x the float model ("
            + ("int8 compute" if q.speed.chosen == "int8" else "float compute, int8 weights")
            + ")",
            highlight=False,
        )
    check = result.quantized_parity
    if check is None or not check.verified:
        return
    what = "held-out" if check.held_out else "NOT held-out"
    out.print(
        f"{q.stage} vs original on {check.source} "
        f"({what}, {samples_text(check.samples, check.rows)}): "
        f"noise-to-signal {check.error:.3g} (worst channel group)"
        + (
            ""
            if check.metric is None
            else f"; --metric {check.metric}: {fmt(check.metric_value, '.4g')}"
        ),
        highlight=False,
    )
    table = Table(show_header=True, header_style="bold")
    table.add_column("output")
    table.add_column("cosine", justify="right")
    table.add_column("SNR dB", justify="right")
    table.add_column("NSR", justify="right")
    table.add_column("argmax agree", justify="right")
    for o in check.outputs:
        agree = "-" if o.argmax_agreement is None else f"{o.argmax_agreement * 100:.1f}%"
        table.add_row(
            o.name,
            fmt(o.cosine, ".6f"),
            fmt(o.snr_db, ".1f"),
            fmt(o.nsr, ".2e"),
            agree,
        )
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    app()
