"""The `onnxshrink inspect MODEL` command: what a model is, and what `optimize` would do to it.

The account itself is `onnxshrink.engine.inspect`; this module prints it (rich tables) or, with
`--json`, prints its JSON object alone on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from onnxshrink.cli.common import err, one_line_errors, out, setup_logging, styled
from onnxshrink.engine.inspect import ModelInspection, TargetPlan

#: op types listed on the histogram line before "... N more"
OP_ROWS = 40
#: reasons for keeping layers float shown per target
REASON_ROWS = 4

_PARAGRAPHS = [
    "Describe a model and preview what `optimize` would do to it, without writing anything.",
    "Prints the inputs and outputs (dtypes; shapes with named dims by name), opset imports, IR "
    "version and producer; nodes, the op histogram, parameters and size (on disk, with external "
    "data files, each named); If/Loop/Scan subgraphs and their node counts.",
    "Then runs the lossless rules of `optimize` on the model in memory: which rules would fire "
    "and how often, which decline and why, and the node count after; a rule that waits for a "
    "higher opset (LayerNormalization 17, Gelu 20, HardSwish 14) is tried at that opset, and "
    "the patterns it finds are reported with the --opset that unlocks them. Last, the int8 "
    "plan on every --target without calibration data: layers that would compute in int8, store "
    "int8 weights, or stay float, and why (the error budget may keep more float).",
    "--json prints one JSON object on stdout instead, with the keys: path, ir_version, "
    "producer, opsets, inputs and outputs (name, dtype, shape), nodes, nodes_total, ops, "
    "initializers, constants, parameters, bytes (in memory), file_bytes (on disk, data files included), "
    "external_data (bytes, files: location, bytes, tensors), subgraphs (node, op, attribute, "
    "nodes, nodes_total, depth), optimize (opset, nodes_before, nodes_after, applied, declined: "
    "rule, reason, count; unlocks: opset, rules: rule, needs_opset, found, fires; nodes_after, "
    "op_changes, error; seconds, error), int8 (per target: target, layers, int8_compute, "
    "int8_weights, float, reasons, gather_tables, gather_bytes_before, gather_bytes_after, "
    "notes), seconds.",
    "Exit codes: 0 done; 2 bad input (missing file, not ONNX, a directory, --opset below the "
    "model's).",
    "\b\nExamples:\n"
    "  onnxshrink inspect model.onnx\n"
    "  onnxshrink inspect model.onnx --opset 20\n"
    "  onnxshrink inspect model.onnx --json > model.json",
]
HELP = "\n\n".join(_PARAGRAPHS)


def register(app: typer.Typer) -> None:
    """Add the command to the CLI app."""
    app.command("inspect", help=HELP)(inspect)


def inspect(
    model: Annotated[Path, typer.Argument(help="The ONNX model to inspect (never modified).")],
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="Print every figure as one JSON object on stdout, and nothing else."
        ),
    ] = False,
    opset: Annotated[
        int | None,
        typer.Option(
            "--opset",
            metavar="N",
            help="Preview the rules as `optimize --opset N` would run them, e.g. --opset 20.",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Log what happens, with tracebacks of bugs.")
    ] = False,
) -> None:
    """Describe MODEL and preview `optimize` on it (help text: HELP)."""
    from onnxshrink.engine.inspect import inspect_path

    setup_logging(verbose)
    with one_line_errors(verbose):
        if json_out:
            result = inspect_path(model, opset=opset)
        else:
            with err.status(f"inspecting {model.name}...", spinner="dots"):
                result = inspect_path(model, opset=opset)
    if json_out:
        # plain text, not rich: nothing wrapped or coloured, so that it parses
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    _print(result)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _shape(shape: list[int | str | None] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _print(r: ModelInspection) -> None:
    out.print(styled(("onnxshrink inspect", "bold"), f" {r.path}  ({r.seconds:.2f} s)"))
    opsets = ", ".join(f"{domain} {version}" for domain, version in r.opsets.items())
    out.print(
        f"IR version {r.ir_version}, producer {r.producer or '(none)'}; opsets: {opsets}",
        highlight=False,
    )

    io = Table(show_header=True, header_style="bold", title="inputs and outputs")
    io.add_column("")
    io.add_column("name", overflow="fold")
    io.add_column("dtype")
    io.add_column("shape", overflow="fold")
    for kind, values in (("input", r.inputs), ("output", r.outputs)):
        for v in values:
            io.add_row(kind, v.name, v.dtype, _shape(v.shape))
    out.print(io)

    size = _fmt_bytes(r.file_bytes if r.file_bytes is not None else r.bytes)
    where = "on disk" if r.file_bytes is not None else "in memory"
    out.print(
        f"size {size} {where}; {r.parameters:,} parameters in {r.initializers} initializer(s)"
        + (f" and {r.constants} Constant node(s)" if r.constants else ""),
        highlight=False,
    )
    ext = r.external_data
    if ext.files:
        files = ", ".join(
            f"{f.location} ({_fmt_bytes(f.bytes)}, {f.tensors} tensor(s))" for f in ext.files
        )
        out.print(f"external data: {_fmt_bytes(ext.bytes)} in {files}", highlight=False)
    else:
        out.print("external data: none (weights inside the .onnx file)", highlight=False)

    nodes = f"{r.nodes} nodes" + (
        f" ({r.nodes_total} with subgraphs)" if r.nodes_total != r.nodes else ""
    )
    shown = list(r.ops.items())[:OP_ROWS]
    more = len(r.ops) - len(shown)
    out.print(
        f"{nodes}, {len(r.ops)} op types: "
        + ", ".join(f"{op} {n}" for op, n in shown)
        + (f", ... {more} more" if more else ""),
        highlight=False,
    )
    if r.subgraphs:
        out.print(f"subgraphs: {len(r.subgraphs)}", highlight=False)
        for s in r.subgraphs:
            nested = f" ({s.nodes_total} with nested)" if s.nodes_total != s.nodes else ""
            out.print(
                f"{'  ' * s.depth}{s.op} {s.node or '(unnamed)'}.{s.attribute}: "
                f"{s.nodes} node(s){nested}",
                highlight=False,
            )
    else:
        out.print("subgraphs: none", highlight=False)
    _print_preview(r)
    _print_int8(r.int8)


def _print_preview(r: ModelInspection) -> None:
    p = r.optimize
    out.print()
    if p.error is not None:
        out.print(
            styled(("optimize (lossless rules):", "bold"), f" preview failed: {p.error}"),
            highlight=False,
        )
        return
    out.print(
        styled(
            ("optimize (lossless rules, preview)", "bold"),
            f": nodes {p.nodes_before} -> {p.nodes_after} at opset {p.opset}; "
            "`optimize` then checks parity with ONNX Runtime",
        ),
        highlight=False,
    )
    if p.applied:
        fired = Table(title="rules that would fire", show_header=True, header_style="bold")
        fired.add_column("rule")
        fired.add_column("times", justify="right")
        for name, count in p.applied.items():
            fired.add_row(name, str(count))
        out.print(fired)
    else:
        out.print("no rule would fire", highlight=False)
    if p.declined:
        declined = Table(title="rules that would decline", show_header=True, header_style="bold")
        declined.add_column("rule")
        declined.add_column("reason", overflow="fold")
        declined.add_column("times", justify="right")
        for d in p.declined:
            declined.add_row(d.rule, d.reason, str(d.count))
        out.print(declined)
    for unlock in p.unlocks:
        for rule in unlock.rules:
            if rule.found is None:  # declined before matching: the rerun below tells
                what = f"{rule.rule}: needs --opset {rule.needs_opset} (model is {p.opset})"
            else:
                what = (
                    f"{rule.rule}: {rule.found} pattern(s) found, needs --opset "
                    f"{rule.needs_opset} (model is {p.opset})"
                )
                if unlock.error is None and rule.fires != rule.found:
                    what += f"; it fires {rule.fires} time(s) there"
            out.print(styled(("hint:", "yellow"), f" {what}"), highlight=False)
        if unlock.error is not None:
            out.print(f"  cannot try --opset {unlock.opset}: {unlock.error}", highlight=False)
            continue
        changes = ", ".join(f"{op} {n:+d}" for op, n in unlock.op_changes.items())
        out.print(
            f"  with --opset {unlock.opset}: nodes {p.nodes_before} -> {unlock.nodes_after}"
            + (f" ({changes})" if changes else " (no op changes)"),
            highlight=False,
        )


def _print_int8(plans: list[TargetPlan]) -> None:
    out.print()
    out.print(
        styled(
            ("int8 plan per --target", "bold"),
            " (no calibration: the error budget may keep more layers float)",
        ),
        highlight=False,
    )
    table = Table(show_header=True, header_style="bold")
    table.add_column("target")
    table.add_column("layers", justify="right")
    table.add_column("int8 compute", justify="right")
    table.add_column("int8 weights", justify="right")
    table.add_column("float", justify="right")
    table.add_column("why not int8 compute (layers)", overflow="fold")
    for plan in plans:
        reasons = list(plan.reasons.items())
        why = "; ".join(f"{reason} ({n})" for reason, n in reasons[:REASON_ROWS])
        if len(reasons) > REASON_ROWS:
            why += f"; ... {len(reasons) - REASON_ROWS} more"
        table.add_row(
            plan.target,
            str(plan.layers),
            str(plan.int8_compute),
            str(plan.int8_weights),
            str(plan.float),
            why,
        )
    out.print(table)
    # a note every target shares (the opset raise) is said once
    shared = [n for n in plans[0].notes if all(n in p.notes for p in plans)] if plans else []
    if shared:
        out.print("every target: " + "; ".join(shared), highlight=False)
    for plan in plans:
        notes = [n for n in plan.notes if n not in shared]
        if plan.gather_tables:
            notes.insert(
                0,
                f"{plan.gather_tables} embedding table(s) stored int8 per row "
                f"({_fmt_bytes(plan.gather_bytes_before)} -> "
                f"{_fmt_bytes(plan.gather_bytes_after)})",
            )
        if notes:
            out.print(f"{plan.target}: " + "; ".join(notes), highlight=False)
