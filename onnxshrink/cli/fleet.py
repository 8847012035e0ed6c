"""`onnxshrink optimize-many`: optimize every model a glob names, one task per model.

The command takes every option of `optimize` without declaring them again: `OptimizeManyCommand`
copies the click parameters of the registered `optimize` command (all but the model, `-o`,
`--json`, `-v`, and `--report`, per-model work this command does not do)
onto itself, and `optimize_kwargs` maps their values to `onnxshrink.optimize`'s keyword
arguments the way `optimize` does. `tests/test_fleet.py` checks that every option of
`optimize` is either carried over or named in `NOT_CARRIED`, so a new option cannot be
silently dropped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from onnxshrink.cli.common import err, fail, one_line_errors, out, setup_logging, styled
from onnxshrink.cli.help_layout import paragraphs
from onnxshrink.errors import UsageError

#: optimize's parameters this command does not carry over (it has its own, or they are
#: per-model work): name -> why
NOT_CARRIED = {
    "model": "the models come from PATTERN",
    "output": "outputs are named in --out",
    "json_path": "--json is the whole run's",
    "verbose": "its own -v",
    "report": "per-model reports are not written",
}
#: the carried options that go to `optimize_many(bench=...)`, not to `optimize`
BENCH_OPTIONS = ("bench", "bench_provider", "bench_runs")

#: optimize CLI parameter -> onnxshrink.optimize keyword, where the names differ
RENAMED = {"quantize_target": "target", "input_shape": "input_shapes"}
#: `--no-x` flags -> the keyword they turn off
NEGATED = {"no_speed_check": "check_speed", "no_reconstruct": "reconstruct"}

#: the help panel of the carried options that have none of their own
OPTIMIZE_PANEL = "optimize options (as `onnxshrink optimize`)"

_META_KEY = "onnxshrink.optimize_values"


def _optimize_params() -> list[Any]:
    """Fresh click parameters of the registered `optimize` command, minus `NOT_CARRIED`."""
    from onnxshrink.cli import app

    info = next(c for c in app.registered_commands if c.name == "optimize")
    command = typer.main.get_command_from_info(
        info, pretty_exceptions_short=False, rich_markup_mode="rich"
    )
    params = []
    for param in command.params:
        if param.name in NOT_CARRIED or param.param_type_name != "option":
            continue
        if getattr(param, "rich_help_panel", None) is None:
            param.rich_help_panel = OPTIMIZE_PANEL  # type: ignore[attr-defined]
        params.append(param)
    return params


class OptimizeManyCommand(typer.core.TyperCommand):
    """A typer command that also takes `optimize`'s options (module docstring); their values
    go to `ctx.meta`, not to the callback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        own = {p.name for p in self.params}
        self.carried = [p for p in _optimize_params() if p.name not in own]
        self.params.extend(self.carried)

    def invoke(self, ctx: Any) -> Any:
        ctx.meta[_META_KEY] = {
            p.name: ctx.params.pop(p.name) for p in self.carried if p.name in ctx.params
        }
        return super().invoke(ctx)


def bench_settings(values: dict[str, Any]) -> dict[str, Any] | None:
    """`optimize_many`'s `bench` from the carried `--bench*` options (None without --bench);
    they are taken out of `values`."""
    bench, providers, runs = (values.pop(name, None) for name in BENCH_OPTIONS)
    if not bench:
        return None
    return {"providers": providers or "cpu", "runs": runs or 30}


def optimize_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """`onnxshrink.optimize` keyword arguments from the carried options' values (as the
    `optimize` command passes them)."""
    from onnxshrink.engine.shapes import parse_input_shapes

    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name in NEGATED:
            kwargs[NEGATED[name]] = not value
        elif name == "input_shape":
            kwargs["input_shapes"] = parse_input_shapes(value)
        elif name == "exclude":
            kwargs["exclude"] = list(value or ())
        elif isinstance(value, Path):
            kwargs[RENAMED.get(name, name)] = str(value)
        else:
            kwargs[RENAMED.get(name, name)] = value
    return kwargs


def _ray_backend(address: str | None, workers: int | None) -> Any:
    """The Ray backend (`onnxshrink.fleet_ray`), or a UsageError where it is not there."""
    try:
        from onnxshrink import fleet_ray
    except ImportError:
        raise UsageError(
            "Ray backend not available (pip install onnxshrink[ray]; --workers N runs a local pool)"
        ) from None
    # a local instance gets --workers CPUs; a cluster's own nodes say what they have
    backend = fleet_ray.RayBackend(address=address, num_cpus=workers if address is None else None)
    backend.workers = workers
    return backend


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _figure(record: dict[str, Any]) -> str:
    """The record's quality figure: the lossy stage's held-out error, else parity."""
    lossy = record.get("lossy")
    if lossy:
        if lossy.get("held_out_error") is not None:
            what = "held-out" if lossy.get("held_out") else "NOT held-out"
            text = f"{lossy['stage']} {what} NSR {lossy['held_out_error']:.3g}"
            if lossy.get("metric_value") is not None:
                text += f", metric {lossy['metric_value']:.4g}"
            return text
        return f"{lossy['stage']} calibration NSR {lossy.get('calibration_error', 0):.3g}"
    parity = record.get("parity") or {}
    if parity.get("verified"):
        max_rel = parity.get("max_rel")
        return "parity ok" + ("" if max_rel is None else f" (max rel {max_rel:.1e})")
    return f"parity not verified: {parity.get('reason')}" if parity else ""


def _timing(record: dict[str, Any]) -> str:
    """The --bench figure: the result's p50 and its ratio to the original, per provider."""
    rows = (record.get("bench") or {}).get("rows") or []
    parts = [
        f"{r['provider']} {r['p50_ms']:.2f} ms"
        + ("" if r.get("ratio") is None else f" ({r['ratio']:.2f}x)")
        for r in rows
        if r.get("role") == "result" and r.get("p50_ms") is not None
    ]
    return ("  p50 " + ", ".join(parts)) if parts else ""


def _change(record: dict[str, Any]) -> str:
    before, after = record.get("bytes_before"), record.get("bytes_after")
    if before is None or after is None:
        return ""
    pct = f" ({(after - before) / before * 100:+.1f}%)" if before else ""
    return f"{_size(before)} -> {_size(after)}{pct}"


def _line(record: dict[str, Any]) -> None:
    """One line per model as it finishes, on and off a terminal."""
    name = Path(record["model"]).name
    status = record["status"]
    if status == "failed":
        seconds = record.get("seconds")
        out.print(
            styled(("FAILED ", "red"), f"{name}")
            + (f"  {seconds:.1f} s" if seconds is not None else "")
            + f"  {record.get('error')}",
            highlight=False,
            soft_wrap=True,
        )
        return
    if status == "skipped":
        out.print(
            styled(("skipped", "dim"), f" {name}  done before (manifest)  {_change(record)}"),
            highlight=False,
            soft_wrap=True,
        )
        return
    out.print(
        styled(("ok     ", "green"), f" {name}  {record.get('seconds', 0):.1f} s  ")
        + f"{_change(record)}  {_figure(record)}{_timing(record)}",
        highlight=False,
        soft_wrap=True,
    )


def _summary(report: Any) -> None:
    table = Table(title=f"optimize-many: {report.out_dir}", show_header=True, header_style="bold")
    table.add_column("model")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("size", justify="right")
    table.add_column("nodes", justify="right")
    table.add_column("figure / error")
    for r in report.records:
        seconds = r.get("seconds")
        nodes = (
            f"{r['nodes_before']} -> {r['nodes_after']}"
            if r.get("nodes_before") is not None
            else "-"
        )
        table.add_row(
            Path(r["model"]).name,
            r["status"],
            "-" if seconds is None or r["status"] == "skipped" else f"{seconds:.1f}",
            _change(r) or "-",
            nodes,
            r.get("error") or _figure(r),
        )
    out.print(table)
    counts = report.counts
    out.print(
        f"{counts['ok']} optimized, {counts['skipped']} skipped (done before), "
        f"{counts['failed']} failed in {report.seconds:.1f} s; manifest: {report.manifest}",
        highlight=False,
    )


def optimize_many(
    ctx: typer.Context,
    patterns: Annotated[
        list[str],
        typer.Argument(
            metavar="PATTERN...",
            help="Models: files or glob patterns (quote them: 'models/*.onnx', "
            "'zoo/**/*.onnx'). Each pattern must match at least one file.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="The output folder: DIR/<stem>.opt.onnx per model, and DIR/manifest.jsonl.",
            show_default=False,
        ),
    ],
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            metavar="N",
            help="Models optimized at once, each in its own process with CPUs/N ONNX Runtime "
            "threads \\[default: 1].",
            show_default=False,
        ),
    ] = None,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            min=0,
            metavar="N",
            help="Run a model that failed, or whose worker died, again at most N times.",
        ),
    ] = 1,
    json_path: Annotated[
        str | None,
        typer.Option(
            "--json",
            metavar="PATH|-",
            help="Also write the whole run as JSON to PATH ('-': only the JSON, on stdout).",
            show_default=False,
        ),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option("--ray", help="Run the tasks on a local Ray instance, started for the run."),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="ADDR",
            help="Run the tasks on a Ray cluster: auto (a running one) or ray://HOST:PORT.",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        int,
        typer.Option("-v", "--verbose", count=True, help="Log what the run does."),
    ] = 0,
) -> None:
    """Optimize many models, one task per model, in parallel: every option of `optimize`
    applies to each model. A line per model as it finishes, then a summary table.

    DIR/manifest.jsonl records each finished model (keyed by the model's sha256, the options
    and the onnxshrink and ONNX Runtime versions): a rerun skips the models done before whose
    output is unchanged. A model that fails is retried (--retries), then recorded with its
    one-line error; the other models finish. Timing work (--bench, int8's speed check)
    never runs beside other timing work.

    Exit codes: 0 every model optimized (or done before); 1 a model failed; 2 bad input.

    \b
    Examples:
      onnxshrink optimize-many 'models/*.onnx' --out small/
      onnxshrink optimize-many 'models/*.onnx' --out small/ --workers 2
      onnxshrink optimize-many a.onnx b.onnx --out small/ --opset 17
      onnxshrink optimize-many 'models/*.onnx' --out int8/ --workers 2 \\
          --quantize int8 --calibration-data random --json run.json
      onnxshrink optimize-many 'models/*.onnx' --out small/ --workers 2 --bench
      onnxshrink optimize-many 'models/*.onnx' --out small/ --ray-address auto
    """
    import json

    from onnxshrink.cli import _refuse_lossy_only_options
    from onnxshrink.fleet import optimize_many as run_many

    setup_logging(verbose)
    values = ctx.meta.get(_META_KEY, {})
    stdout = sys.stdout
    if json_path == "-":  # only the JSON on stdout
        sys.stdout = sys.stderr
    try:
        with one_line_errors(verbose):
            if values.get("quantize") is None and values.get("sparsify") is None:
                _refuse_lossy_only_options(ctx)
            if json_path not in (None, "-"):
                from onnxshrink.engine.io import check_output_path

                check_output_path(json_path)
            bench = bench_settings(values)
            options = optimize_kwargs(values)
            backend = _ray_backend(ray_address, workers) if ray or ray_address else None
            try:
                report = run_many(
                    patterns,
                    out_dir,
                    options,
                    backend=backend,
                    workers=workers,
                    retries=retries,
                    progress=_line,
                    bench=bench,
                )
            finally:
                if backend is not None:
                    for warning in getattr(backend, "warnings", []):
                        err.print(styled(("warning:", "yellow"), f" {warning}"), highlight=False)
                    backend.close()  # a local Ray instance it started; a cluster stays up
        _summary(report)
    finally:
        sys.stdout = stdout
    if json_path is not None:
        document = {"command": "optimize-many", **report.to_dict()}
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
        if json_path == "-":
            stdout.write(text)
            stdout.flush()
        else:
            from onnxshrink.engine.io import write_text_atomic

            try:
                write_text_atomic(Path(json_path), text)
            except OSError as exc:
                fail(f"--json {json_path}: cannot write ({exc.strerror or exc})", 2)
            err.print(f"json: {json_path}", highlight=False)
    failed = report.failed
    if failed:
        names = ", ".join(Path(r["model"]).name for r in failed)
        fail(f"{len(failed)} of {len(report.records)} model(s) failed: {names}", 1)


def register(app: typer.Typer) -> None:
    """Add the command to the CLI app."""
    app.command(
        "optimize-many",
        cls=OptimizeManyCommand,
        help=paragraphs(optimize_many.__doc__ or ""),
    )(optimize_many)
