"""The `onnxshrink parity REF CAND` command: how far a candidate's outputs moved, and where from."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from onnxshrink.cli.common import (
    VERBOSE_HELP,
    err,
    fail,
    fmt,
    one_line_errors,
    out,
    progress_bar,
    setup_logging,
    styled,
)
from onnxshrink.verify.parity import (
    BATCH_HELP,
    DEFAULT_ATOL,
    DEFAULT_ERROR_QUANTILE,
    DEFAULT_GENERATED_SAMPLES,
    DEFAULT_RTOL,
    DEFAULT_TIME_LIMIT,
    samples_text,
)

DEFAULT_SAMPLES = DEFAULT_GENERATED_SAMPLES


class ErrorStat(str, Enum):
    """The statistic of |cand - ref| compared against the bound."""

    max = "max"
    mean = "mean"
    median = "median"
    quantile = "quantile"


_PARAGRAPHS = [
    "Compare a candidate model's outputs with a reference's, on ONNX Runtime CPU.",
    "Both models run on the same inputs; per output the table shows max abs error, mean abs "
    "error, max relative error (max|cand-ref| / max|ref|), cosine similarity, SNR in dB and, "
    "for outputs whose last axis looks like classes (float, rank >= 2, last dim >= 2), argmax "
    "agreement. An output passes when, on every run, ERR <= atol + rtol * max|ref| (ERR: the "
    "--check-error-stat of |cand-ref|, max by default) and its cosine over all runs is at "
    "least --min-cosine (when given). Integer outputs must match exactly.",
    "On failure (or with --localize) it also finds where the error enters: intermediate "
    "tensors that both graphs have (by name; across inserted Q/DQ pairs, the dequantized value "
    "against the float tensor it replaced) are compared, and the candidate's nodes are ranked "
    "by the error they add: the relative error of a node's output when its inputs are the "
    "reference's own values.",
    "Exit codes: 0 all outputs pass; 1 an output fails (or the candidate cannot run, or a run "
    "passes --time-limit); 2 bad input.",
    "\b\nExamples:\n"
    "  onnxshrink parity model.onnx model.opt.onnx\n"
    "  onnxshrink parity model.onnx model.int8.onnx --inputs calib/ \\\n"
    "      --rtol 1e-2 --min-cosine 0.999\n"
    "  onnxshrink parity a.onnx b.onnx --input-shape x:1,3,224,224 \\\n"
    "      --input-range x:-1,1 --samples 8\n"
    "  onnxshrink parity a.onnx b.onnx --check-error-stat quantile \\\n"
    "      --error-quantile 0.99 --atol 1e-3\n"
    "  onnxshrink parity a.onnx b.onnx --atol 1e-5 --atol logits:1e-3 --json -\n"
    "  onnxshrink parity a.onnx b.onnx --localize --top 5",
    f"Defaults: rtol {DEFAULT_RTOL:g}, atol {DEFAULT_ATOL:g}, {DEFAULT_SAMPLES} generated samples, "
    f"time limit {DEFAULT_TIME_LIMIT:g} s per run.",
]
HELP = "\n\n".join(_PARAGRAPHS)


def register(app: typer.Typer) -> None:
    """Add the command to the CLI app."""
    app.command("parity", help=HELP)(parity)


def parity(
    reference: Annotated[
        Path, typer.Argument(metavar="REF", help="The reference model (e.g. the original).")
    ],
    candidate: Annotated[
        Path,
        typer.Argument(
            metavar="CAND", help="The candidate model (e.g. the optimized or quantized one)."
        ),
    ],
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            metavar="NPZ|DIR",
            help="An .npz with one array per model input, or a folder of them (read one at a "
            "time). Axis 0 holds the samples, one per entry: a file of 6 samples runs 6 times "
            "on a model pinned to batch 1, 3 times with a fixed batch of 2, and in runs of "
            "--batch where the batch dim is dynamic. E.g. --inputs calib.npz (default: "
            "generated inputs).",
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option("--batch", min=1, metavar="N", help=BATCH_HELP),
    ] = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            metavar="NAME:DIMS",
            help="Shape of a generated input (repeatable): x:1,3,48,320, x:[1,3,48,320] or "
            "x:1x3x48x320. Unknown dims default to the batch on axis 0 and 32 elsewhere.",
        ),
    ] = None,
    input_range: Annotated[
        list[str] | None,
        typer.Option(
            "--input-range",
            metavar="[NAME:]LOW,HIGH",
            help="Value range of a generated input, e.g. x:-1,1 (repeatable; without NAME: "
            "every input): floats uniform in [LOW, HIGH), integers in [LOW, HIGH) (default: "
            "floats in [0, 1); integers that index an embedding table below its size, others "
            "0 or 1).",
        ),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            "--samples",
            min=1,
            help=f"How many generated feeds to run, e.g. --samples 16 (default: {DEFAULT_SAMPLES}).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for generated inputs.")] = 0,
    atol: Annotated[
        list[str] | None,
        typer.Option(
            "--atol",
            metavar="[OUTPUT:]VALUE",
            help="Absolute slack of the bound: --atol 1e-5 for every output, --atol "
            f"OUTPUT:1e-3 for one (repeatable) (default: {DEFAULT_ATOL:g}).",
        ),
    ] = None,
    rtol: Annotated[
        list[str] | None,
        typer.Option(
            "--rtol",
            metavar="[OUTPUT:]VALUE",
            help="Error allowed relative to the output's scale max|ref|: --rtol 1e-3, or "
            f"--rtol OUTPUT:1e-2 for one output (repeatable) (default: {DEFAULT_RTOL:g}).",
        ),
    ] = None,
    min_cosine: Annotated[
        list[str] | None,
        typer.Option(
            "--min-cosine",
            metavar="[OUTPUT:]VALUE",
            help="Also require this cosine similarity over all runs: --min-cosine 0.999, or "
            "--min-cosine OUTPUT:0.99 for one output (repeatable) (default: not checked).",
        ),
    ] = None,
    check_error_stat: Annotated[
        ErrorStat,
        typer.Option(
            "--check-error-stat",
            help="Which statistic of the elementwise |cand-ref| of a run is held to "
            "atol + rtol * max|ref|: max (the strictest), mean, median, or quantile (see "
            "--error-quantile). E.g. --check-error-stat median.",
        ),
    ] = ErrorStat.max,
    error_quantile: Annotated[
        float,
        typer.Option(
            "--error-quantile",
            help="The quantile for --check-error-stat quantile, e.g. --error-quantile 0.999.",
        ),
    ] = DEFAULT_ERROR_QUANTILE,
    localize: Annotated[
        bool | None,
        typer.Option(
            "--localize/--no-localize",
            help="Find where the error enters even when all outputs pass (--localize), or "
            "never (--no-localize) (default: only when an output fails).",
        ),
    ] = None,
    top: Annotated[
        int, typer.Option("--top", min=1, help="How many nodes the localization table lists.")
    ] = 10,
    localize_samples: Annotated[
        int,
        typer.Option(
            "--localize-samples",
            min=1,
            help="How many of the feeds localization runs on (each runs every intermediate "
            "tensor of both models).",
        ),
    ] = 2,
    time_limit: Annotated[
        float,
        typer.Option(
            "--time-limit",
            min=0.0,
            metavar="SECONDS",
            help="Stop any one ONNX Runtime run (one model, one input) that takes longer than "
            "this and exit 1: a model whose Loop never ends cannot hang the command. 0: no "
            "limit.",
        ),
    ] = DEFAULT_TIME_LIMIT,
    json_path: Annotated[
        str | None,
        typer.Option(
            "--json",
            metavar="PATH|-",
            help="Write every figure as JSON to this file (written atomically), or to stdout "
            "with --json - (the tables then go to stderr).",
        ),
    ] = None,
    verbose: Annotated[
        int,
        typer.Option(
            "-v",
            "--verbose",
            count=True,
            help="Log what happens, with tracebacks of bugs. " + VERBOSE_HELP,
        ),
    ] = 0,
) -> None:
    """Compare CAND's outputs with REF's; localize the error on failure (help text: HELP)."""
    from onnxshrink.errors import OnnxShrinkError

    setup_logging(verbose)
    console = err if json_path == "-" else out
    with one_line_errors(verbose):
        run = _Run(
            reference,
            candidate,
            inputs=inputs,
            batch=batch,
            input_shape=input_shape,
            input_range=input_range,
            samples=samples,
            seed=seed,
            atol=atol,
            rtol=rtol,
            min_cosine=min_cosine,
            error_stat=check_error_stat.value,
            error_quantile=error_quantile,
            json_path=json_path,
            time_limit=time_limit,
        )
        report = run.check(err)
        loc = None
        failed = report.verified and not report.passed and bool(report.outputs)
        wanted = localize if localize is not None else failed
        if wanted and report.verified:
            loc = run.localize(err, localize_samples)
    if not report.verified:
        bad_input = (report.reason or "").startswith(("the reference model fails", "no inputs"))
        if json_path is not None and not bad_input:
            run.write_json(report, None, top)
        fail(f"parity not verified: {report.reason}", 2 if bad_input else 1)
    _print_report(console, run, report)
    if loc is not None:
        _print_localization(console, loc, top)
    if json_path is not None:
        try:
            run.write_json(report, loc, top)
        except OnnxShrinkError as exc:
            fail(str(exc), exc.exit_code)
    if not report.passed:
        raise typer.Exit(1)


class _Run:
    """One `parity` invocation: validated arguments, the inputs, the results."""

    def __init__(
        self,
        reference: Path,
        candidate: Path,
        *,
        inputs: Path | None,
        batch: int | None,
        input_shape: list[str] | None,
        input_range: list[str] | None,
        samples: int | None,
        seed: int,
        atol: list[str] | None,
        rtol: list[str] | None,
        min_cosine: list[str] | None,
        error_stat: str,
        error_quantile: float,
        json_path: str | None,
        time_limit: float = DEFAULT_TIME_LIMIT,
    ):
        from onnxshrink.engine.io import check_output_path, load_model
        from onnxshrink.engine.shapes import parse_input_shapes
        from onnxshrink.verify.parity import criteria_from_specs, parity_inputs, parse_input_ranges

        if json_path is not None and json_path != "-":
            check_output_path(json_path)
        self.reference_path = reference
        self.candidate_path = candidate
        self.json_path = json_path
        self.time_limit = time_limit
        self.criteria = criteria_from_specs(atol, rtol, min_cosine, error_stat, error_quantile)
        self.reference = load_model(reference)
        self.candidate = load_model(candidate)
        self.criteria.check_outputs(o.name for o in self.reference.graph.output)
        # The library chooses the feeds (onnxshrink.parity does the same from Python).
        feeds = parity_inputs(
            self.reference,
            inputs,
            batch=batch,
            input_shapes=parse_input_shapes(input_shape),
            input_ranges=parse_input_ranges(input_range, self.reference),
            samples=samples,
            seed=seed,
        )
        self.total = feeds.total
        self._feeds: Callable[[], Iterator[dict]] = feeds.feeds
        self.inputs_info: dict[str, Any] = feeds.info

    def check(self, console):
        from onnxshrink.verify.parity import check_parity

        with progress_bar(console, "parity", unit="runs") as progress:
            return check_parity(
                self.reference_path,
                self.candidate_path,
                self._feeds(),
                criteria=self.criteria,
                progress=progress,
                total=self.total,
                labels=("reference", "candidate"),
                time_limit=self.time_limit,
                inputs_given=self.inputs_info["source"] != "generated",
            )

    def localize(self, console, samples: int):
        from onnxshrink.verify.localize import localize

        with progress_bar(console, "localizing", unit="runs") as progress:
            return localize(
                self.reference,
                self.candidate,
                self._feeds(),
                samples,
                progress=progress,
                time_limit=self.time_limit,
            )

    def write_json(self, report, loc, top: int) -> None:
        import onnx
        import onnxruntime

        from onnxshrink import __version__
        from onnxshrink.verify.parity import jsonable

        document = {
            "command": "parity",
            "reference": str(self.reference_path),
            "candidate": str(self.candidate_path),
            "versions": {
                "onnxshrink": __version__,
                "onnxruntime": onnxruntime.__version__,
                "onnx": onnx.__version__,
            },
            "inputs": self.inputs_info,
            **report.to_dict(),
            "localization": loc.to_dict() if loc is not None else None,
        }
        text = json.dumps(jsonable(document), indent=2) + "\n"
        if self.json_path == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        assert self.json_path is not None  # write_json is only called with --json
        _write_atomic(Path(self.json_path), text)


def _write_atomic(dest: Path, text: str) -> None:
    from onnxshrink.engine.io import write_text_atomic
    from onnxshrink.errors import UsageError

    try:
        write_text_atomic(dest, text)
    except OSError as exc:
        raise UsageError(f"{dest}: cannot write JSON ({exc.strerror or exc})") from None


def _print_report(console, run: _Run, report) -> None:
    from rich.table import Table

    criteria = run.criteria
    stat = report.outputs[0].error_stat if report.outputs else criteria.error_stat
    source = run.inputs_info["source"]
    where = "generated inputs" if source == "generated" else source
    cosine = f", min cosine {criteria.min_cosine:g}" if criteria.min_cosine is not None else ""
    console.print(
        styled(
            ("onnxshrink parity", "bold"),
            f" {run.reference_path} vs {run.candidate_path}: "
            f"ONNX Runtime CPU, {samples_text(report.samples, report.rows)} on {where}; pass when {stat} |err| <= "
            f"atol + rtol * max|ref| (rtol {criteria.rtol:g}, atol {criteria.atol:g}{cosine})",
        ),
        highlight=False,
    )
    if criteria.overrides:
        console.print(
            "overrides: "
            + "; ".join(
                f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in o.items())
                for name, o in criteria.overrides.items()
            ),
            highlight=False,
        )
    if not report.outputs:
        console.print(styled(("FAIL", "red"), f": {report.reason}"), highlight=False)
        return
    legend = (
        "max abs, mean abs: of |cand-ref| over every element of every run; max rel: max abs / "
        "max|ref|"
    )
    if stat != "max":
        legend += (
            f"; checked: the {stat} of |cand-ref| within one run, the worst run (what the "
            "bound holds)"
        )
    table = Table(show_header=True, header_style="bold", caption=legend)
    table.add_column("output", overflow="fold")
    for title in ("max abs", "mean abs", "max rel", "cosine", "SNR dB", "argmax agr."):
        table.add_column(title, justify="right")
    if stat != "max":
        table.add_column(f"checked: {stat}", justify="right")
    table.add_column("status")
    for o in report.outputs:
        row = [
            o.name,
            fmt(o.max_abs),
            fmt(o.mean_abs),
            fmt(o.max_rel),
            fmt(o.cosine, ".6f"),
            fmt(o.snr_db, ".1f"),
            "-" if o.argmax_agreement is None else f"{100 * o.argmax_agreement:.2f}%",
        ]
        if stat != "max":
            row.append(fmt(o.error_stat_value))
        row.append(Text("ok", style="green") if o.ok else Text("FAIL", style="red"))
        table.add_row(*row)
    console.print(table)
    for o in report.outputs:
        if not o.ok:
            console.print(styled(("FAIL", "red"), f" {o.name}: {o.reason}"), highlight=False)


def _print_localization(console, loc, top: int) -> None:
    from rich.table import Table

    if loc.reason:
        console.print(styled(("localization:", "yellow"), f" {loc.reason}"), highlight=False)
    if loc.unchanged:
        console.print(
            f"not ranked: {loc.unchanged} nodes that compute what the reference's do (kept "
            "float, or untouched): they add no error of their own",
            highlight=False,
        )
    if not loc.nodes:
        return
    not_compared = sum(loc.skipped.values())
    table = Table(
        title=f"where the error enters: top {min(top, len(loc.nodes))} of {len(loc.nodes)} nodes "
        f"({loc.compared} tensors compared, {loc.samples} sample(s))",
        show_header=True,
        header_style="bold",
        caption="error: max|cand-ref| / max|ref| of the node's output (worst sample); at "
        "inputs: the largest error among its inputs; added: the output's error when its inputs "
        "are fed the reference's values (the node's own share); added NSR: the same as "
        "sum (cand-ref)^2 / sum ref^2, which ranks",
    )
    table.add_column("#", justify="right")
    table.add_column("op")
    table.add_column("node", overflow="fold")
    table.add_column("output", overflow="fold")
    table.add_column("error", justify="right")
    table.add_column("at inputs", justify="right")
    table.add_column("added", justify="right")
    table.add_column("added NSR", justify="right")
    for rank, n in enumerate(loc.top(top), 1):
        output = n.output if n.reference == n.output else f"{n.output} (vs {n.reference})"
        table.add_row(
            str(rank),
            n.op_type,
            n.node,
            output,
            fmt(n.error),
            fmt(n.input_error),
            fmt(n.added),
            fmt(n.added_nsr),
        )
    console.print(table)
    if loc.rematched:
        console.print(
            f"{loc.rematched} candidate tensors keep a name for another value (a fold, e.g. "
            "BatchNormalization into Conv): compared with the reference tensor of that value, "
            "shown as 'output (vs reference)'",
            highlight=False,
        )
    if not_compared:
        console.print(
            f"not compared: {not_compared} tensors ("
            + ", ".join(f"{count} {why}" for why, count in loc.skipped.most_common())
            + ")",
            highlight=False,
        )
