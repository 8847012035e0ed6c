"""The optimization report: HTML, markdown and JSON from a real `optimize` run on a tiny model."""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

import onnxshrink
from onnxshrink.errors import UsageError
from onnxshrink.report import (
    charts,
    render_html,
    render_markdown,
    report_dict,
    report_format,
    short_names,
    write_report,
)
from onnxshrink.verify.parity import OutputParity

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<script>alert('x')</script>"


# Stand-ins for onnxshrink.bench's BenchRow/BenchReport: the report reads them duck-typed.
@dataclass
class FakeRow:
    model: str
    provider: str
    p50_ms: float
    p90_ms: float
    mean_ms: float
    throughput: float
    session_s: float
    peak_mb: float | None
    placement: dict[str, float]
    ratio: float | None
    runs: int


@dataclass
class FakeBench:
    rows: list[FakeRow]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    environment: dict = field(default_factory=dict)


def fake_bench() -> FakeBench:
    rows = [
        FakeRow("m/a.onnx", "CPUExecutionProvider", 12.5, 14.0, 12.9, 77.5, 0.21, 31.0,
                {"CPUExecutionProvider": 1.0}, 1.0, 40),
        FakeRow("m/a.opt.onnx", "CPUExecutionProvider", 7.25, 8.5, 7.6, 131.6, 0.12, None,
                {"CPUExecutionProvider": 1.0}, 0.58, 40),
    ]  # fmt: skip
    return FakeBench(rows, [("cuda", "CUDAExecutionProvider is not available")], {"threads": 2})


class _Page(HTMLParser):
    """Tables (by id, as rows of cell text), images, every src/href, every tag name."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        self.links += [v for k, v in a.items() if k in ("src", "href")]
        if tag == "table":
            self._table = a.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def svg_of(img: dict[str, str]) -> ET.Element:
    prefix = "data:image/svg+xml;base64,"
    assert img["src"].startswith(prefix)
    return ET.fromstring(base64.b64decode(img["src"][len(prefix) :]).decode("utf-8"))


def svg_texts(svg: ET.Element) -> list[str]:
    """What each <text> shows (its own text and what follows a <title> child)."""
    return [
        (t.text or "") + "".join(c.tail or "" for c in t)
        for t in svg.iter("{http://www.w3.org/2000/svg}text")
    ]


@pytest.fixture
def result(conv_bn_model):
    return onnxshrink.optimize(conv_bn_model)


ARGS = dict(command="onnxshrink optimize conv_bn.onnx", model_path="conv_bn.onnx", output_path=None)


def test_html_has_tables_and_embedded_svg_chart(tmp_path, result):
    path = write_report(tmp_path / "r.html", result, **ARGS)
    page = parse(path.read_text(encoding="utf-8"))

    assert {"before-after", "op-histogram", "rules-applied", "parity-table"} <= set(page.tables)
    before_after = {row[0]: row[1:] for row in page.tables["before-after"][1:]}
    assert before_after["nodes"][:2] == [str(result.before.nodes), str(result.after.nodes)]
    ops = {row[0]: row[1:3] for row in page.tables["op-histogram"][1:]}
    for op in set(result.before.ops) | set(result.after.ops):
        assert ops[op] == [str(result.before.ops.get(op, 0)), str(result.after.ops.get(op, 0))]
    rules = {row[0]: row[1] for row in page.tables["rules-applied"][1:]}
    assert rules == {name: str(n) for name, n in result.stats.applied.items() if n}
    parity_rows = page.tables["parity-table"][1:]
    assert [r[0] for r in parity_rows] == [o.name for o in result.parity.outputs]
    assert all(r[-1] == "ok" for r in parity_rows)

    # The op chart: an <svg> root, one bar per series for each op that changed, readable text.
    assert page.images, "no embedded chart"
    svg = svg_of(page.images[0])
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert {"Constant", "Identity", "BatchNormalization"} <= set(svg_texts(svg))
    assert page.images[0]["alt"]

    # Self-contained: nothing fetched, no scripts, styles inline.
    assert not [u for u in page.links if u.startswith(("http:", "https:", "//"))]
    assert not page.tags & {"script", "link", "iframe", "object"}


def test_html_header_headline_figures(result):
    html = render_html(result, **ARGS)
    pct = (result.after.nodes - result.before.nodes) / result.before.nodes * 100
    assert f"{pct:+.1f}%" in html
    assert ">ok<" in html  # parity headline


def test_json_holds_the_same_figures(tmp_path, result):
    path = write_report(tmp_path / "r.json", result, **ARGS)

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    assert data["summary"]["before"]["nodes"] == result.before.nodes
    assert data["summary"]["after"]["nodes"] == result.after.nodes
    assert data["summary"]["after"]["nodes_total"] == result.after.nodes_total
    assert data["summary"]["before"]["bytes"] == result.before.bytes
    assert {r["op"]: (r["before"], r["after"]) for r in data["ops"]} == {
        op: (result.before.ops.get(op, 0), result.after.ops.get(op, 0))
        for op in set(result.before.ops) | set(result.after.ops)
    }
    assert {r["rule"]: r["times"] for r in data["rules"]["applied"]} == {
        k: v for k, v in result.stats.applied.items() if v
    }
    assert data["parity"]["passed"] is True
    assert [o["max_rel"] for o in data["parity"]["outputs"]] == [
        o.max_rel for o in result.parity.outputs
    ]
    assert set(data["versions"]) >= {"onnxshrink", "onnx", "onnxruntime", "numpy", "python"}
    assert data["command"] == ARGS["command"]


def test_json_non_finite_figures_are_strings(result):
    result.parity.outputs.append(OutputParity("broken", math.inf, math.nan, False))
    data = report_dict(result, **ARGS, layer_errors=[("x", math.inf)])
    text = json.dumps(data, allow_nan=False)  # raises on a bare inf/nan
    back = json.loads(text)
    assert back["parity"]["outputs"][-1]["max_abs"] == "inf"
    assert back["parity"]["outputs"][-1]["max_rel"] == "nan"
    assert back["layer_errors"] == [{"layer": "x", "rel_error": "inf"}]


def _md_tables(md: str) -> list[list[str]]:
    tables, current = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def test_markdown_has_the_tables(tmp_path, result):
    md = write_report(tmp_path / "r.md", result, **ARGS).read_text(encoding="utf-8")
    tables = _md_tables(md)
    headers = [t[0] for t in tables]
    assert "| op | before | after | change |" in headers
    assert "| rule | times | seconds |" in headers
    assert any(h.startswith("| output | max abs err | max rel err |") for h in headers)
    for t in tables:  # GFM: a separator row, every row as wide as the header
        assert set(t[1]) <= set("|-: ")
        widths = {line.count("|") - line.count("\\|") for line in t}
        assert len(widths) == 1, t
    assert f"| nodes | {result.before.nodes} | {result.after.nodes} |" in md
    assert "Charts are in the HTML report" in md


def test_unknown_suffix_is_a_usage_error(tmp_path, result):
    with pytest.raises(UsageError) as info:
        write_report(tmp_path / "r.txt", result, **ARGS)
    assert "\n" not in str(info.value) and ".html, .md or .json" in str(info.value)
    with pytest.raises(UsageError):
        write_report(tmp_path / "missing" / "r.html", result, **ARGS)
    assert list(tmp_path.iterdir()) == []
    assert report_format(tmp_path / "R.HTML") == "html"


def test_write_is_atomic(tmp_path, result, monkeypatch):
    dest = tmp_path / "r.html"
    write_report(dest, result, **ARGS)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    good = dest.read_bytes()

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_report(dest, result, **ARGS, layer_errors=[("x", 1.0)])
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left
    assert dest.read_bytes() == good  # the old report is untouched


def test_user_strings_are_escaped(result):
    result.notes.append(f"note {HOSTILE}")
    result.stats.declined[("some-rule", "run `a && b <c>` first")] += 1
    result.parity.outputs[0].name = f"out{HOSTILE}"
    result.before.ops[f"Op{HOSTILE}"] = 2
    args = dict(
        command=f"onnxshrink optimize '{HOSTILE}.onnx'",
        model_path=f"dir/{HOSTILE}.onnx",
        output_path=f"{HOSTILE}.opt.onnx",
        layer_errors=[(f"layer{HOSTILE}", 0.5), ("other", 1e-4)],
        bench=FakeBench([FakeRow(f"{HOSTILE}.onnx", "CPUExecutionProvider", 1.0, 1.2, 1.1,
                                 900.0, 0.1, None, {}, 1.0, 5)]),
    )  # fmt: skip
    html = render_html(result, **args)
    page = parse(html)
    assert "script" not in page.tags
    assert "&lt;script&gt;" in html
    for img in page.images:  # the SVGs stay well-formed XML, names escaped inside
        svg = svg_of(img)
        assert not [e for e in svg.iter() if e.tag.endswith("script")]
    assert len(page.images) == 3  # ops, latency, layer errors
    md = render_markdown(result, **args)
    assert "<script>" not in md.replace(f"'{HOSTILE}.onnx'", "")  # only inside the code fence
    assert "run `a && b <c>` first" in md  # code spans show their text as is


def test_bench_table_and_latency_chart(tmp_path, result):
    bench = fake_bench()
    path = write_report(tmp_path / "r.html", result, **ARGS, bench=bench)
    page = parse(path.read_text(encoding="utf-8"))
    rows = page.tables["bench-table"]
    assert rows[0][:3] == ["model", "provider", "p50 ms"]
    assert [r[2] for r in rows[1:]] == ["12.50", "7.25"]
    assert [r[8] for r in rows[1:]] == ["1.000", "0.580"]
    latency = [img for img in page.images if "latency" in img["alt"].lower()]
    assert len(latency) == 1
    texts = svg_texts(svg_of(latency[0]))
    assert "p50 12.50 \u00b7 p90 14.00 ms" in texts and "p50 7.25 \u00b7 p90 8.50 ms" in texts
    html = path.read_text(encoding="utf-8")
    assert "CUDAExecutionProvider is not available" in html

    md = render_markdown(result, **ARGS, bench=bench)
    assert any(t[0].startswith("| model | provider | p50 ms") for t in _md_tables(md))
    data = report_dict(result, **ARGS, bench=bench)
    assert [r["p50_ms"] for r in data["bench"]["rows"]] == [12.5, 7.25]
    assert data["bench"]["skipped"] == [
        {"what": "cuda", "reason": "CUDAExecutionProvider is not available"}
    ]


def test_layer_error_chart_shows_the_largest(result):
    errors = [(f"/block.{i}/conv/Conv", 10.0 ** (-i / 3)) for i in range(30)]
    page = parse(render_html(result, **ARGS, layer_errors=errors))
    imgs = [img for img in page.images if "layer" in img["alt"].lower()]
    svg = svg_of(imgs[0])
    bars = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.find("*") is not None]
    assert len(bars) == 20
    assert "relative error (log scale)" in svg_texts(svg)  # 30 values over ten decades
    assert page.tables["layer-error-table"][1] == ["/block.0/conv/Conv", "1.00e+00"]


def test_no_verify_says_parity_was_not_checked(conv_bn_model):
    unchecked = onnxshrink.optimize(conv_bn_model, verify=False)
    html = render_html(unchecked, **ARGS)
    assert "not checked" in html and "parity-table" not in html
    assert report_dict(unchecked, **ARGS)["parity"]["checked"] is False


def test_chart_helpers():
    assert charts.nice_ticks(420) == [0, 100, 200, 300, 400, 500]
    assert charts.nice_ticks(0.37)[-1] >= 0.37
    assert charts.op_histogram_chart({"Conv": 2}, {"Conv": 2}) is None
    long = "/encoder/layer.11/attention/self/query/MatMul_output_0"
    cut = charts._truncate(long, 20)
    assert len(cut) == 20 and cut.endswith("output_0") and "\u2026" in cut
    svg = ET.fromstring(charts.op_histogram_chart({long: 3}, {}))
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    assert long in titles  # the full name stays as a tooltip
    assert short_names(["a/x.onnx", "b/x.onnx", "c/y.onnx"]) == {
        "a/x.onnx": "a/x.onnx",
        "b/x.onnx": "b/x.onnx",
        "c/y.onnx": "y.onnx",
    }


def _render_script():
    spec = importlib.util.spec_from_file_location("render_report", ROOT / "bench/render_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    not any(shutil.which(n) for n in ("chromium", "chromium-browser")), reason="no chromium"
)
def test_render_script_makes_a_png(tmp_path, result):
    html = write_report(tmp_path / "r.html", result, **ARGS, bench=fake_bench())
    png = _render_script().render(html, tmp_path / "r.png", width=1000)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


@pytest.fixture(scope="module")
def int8_result(tmp_path_factory):
    """optimize(quantize="int8") on the tiny conv net: a sensitive layer, a depthwise one."""
    import numpy as np

    from tests.rules.test_int8 import _samples, build_net

    calib = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(calib, x=_samples(1, 8))
    model = build_net()
    model.graph.node[0].name = f"conv{HOSTILE}"
    result = onnxshrink.optimize(model, quantize="int8", calibration_data=calib, max_error=0.0)
    assert result.quantization.budget.ranking  # the tight budget ran the sensitivity ranking
    return result


def test_int8_section_in_every_format(tmp_path, int8_result):
    html = render_html(int8_result, **ARGS)
    page = parse(html)
    assert {"kept-float-table", "held-out-table"} <= set(page.tables)
    kept = {row[0]: row[2] for row in page.tables["kept-float-table"][1:]}
    assert len(kept) == len(int8_result.quantization.kept_float)
    assert any("depthwise" in reason for reason in kept.values())
    assert any(reason.startswith("sensitive") for reason in kept.values())
    assert f"conv{HOSTILE}" in kept and HOSTILE not in html  # escaped
    charts_alt = [img["alt"] for img in page.images]
    assert any("one layer quantized alone" in alt for alt in charts_alt)
    assert not [u for u in page.links if u.startswith(("http:", "https:", "//"))]
    assert not page.tags & {"script", "link", "iframe", "object"}
    assert "generated random inputs" in html  # no --inputs: the check says what it ran on

    md = render_markdown(int8_result, **ARGS)
    assert "## int8 quantization" in md and "Layers kept float" in md and "NSR alone" in md
    assert HOSTILE not in md

    data = json.loads(write_report(tmp_path / "r.json", int8_result, **ARGS).read_text())
    quant = data["quantization"]
    assert quant["layers_total"] == len(int8_result.quantization.layers)
    assert len(quant["sensitivity"]) == len(int8_result.quantization.budget.ranking)
    assert quant["budget"]["max_error"] == 0.0 and quant["held_out_check"]["verified"]


def test_no_int8_section_without_quantization(result):
    assert report_dict(result, **ARGS)["quantization"] is None
    assert 'id="quantization"' not in render_html(result, **ARGS)


# Item 3 of issue 12: a report that tells the truth at a glance.


def _cards(html: str) -> dict[str, str]:
    """Headline cards: label -> the card's text (value and detail)."""
    import re

    cards = {}
    for label, rest in re.findall(
        r'<div class="card"><div class="label">(.*?)</div>(.*?)</div></div>', html
    ):
        cards[label] = re.sub(r"<[^>]+>", " ", rest)
    return cards


def test_headline_describes_the_lossy_model(int8_result):
    from onnxshrink.report.model import headline

    data = report_dict(int8_result, **ARGS)
    head = data["headline"]
    check = int8_result.quantized_parity
    assert head["model"] == "lossy" and head["stage"] == "int8"
    assert head["error"] == pytest.approx(check.error) and head["budget"] == 0.0
    assert head["ok"] is True and head["status"] == "within budget"  # every layer kept float
    cards = _cards(render_html(int8_result, **ARGS))
    assert "parity" not in cards  # the lossless check is not the headline
    verdict = cards["int8 vs original"]
    assert "within budget" in verdict and "budget 0" in verdict and "NSR" in verdict
    assert "NOT held-out" in verdict  # generated inputs: not held-out, and it says so
    assert "ok" in cards["lossless stage parity"]
    md = render_markdown(int8_result, **ARGS)
    assert "**int8 vs original** within budget" in md and "**lossless stage parity** ok" in md
    # over the budget on the held-out data: the headline says so, whatever the lossless parity
    data["quantization"]["held_out_check"]["error"] = 0.5
    over = headline(data)
    assert over["ok"] is False and over["status"] == "OVER budget" and over["error"] == 0.5
    data["quantization"]["held_out_check"] = None  # --no-verify
    assert headline(data)["status"] == "not checked" and headline(data)["ok"] is None


def test_headline_without_a_lossy_stage_is_parity(result):
    head = report_dict(result, **ARGS)["headline"]
    assert head["model"] == "lossless" and head["ok"] is True and head["status"] == "ok"
    cards = _cards(render_html(result, **ARGS))
    assert "max rel err" in cards["parity"] and "lossless stage parity" not in cards


def test_distinct_labels_keep_what_tells_layers_apart():
    a = "/inner/encoder/layer.3/output/dense/MatMul"
    b = "/inner/encoder/layer.4/output/dense/MatMul"
    assert charts.distinct_labels([a, b]) == (
        ["layer.3/output/dense/MatMul", "layer.4/output/dense/MatMul"],
        "/inner/encoder/",
        "",
    )
    # still too long: the common tail goes too, and the chart's subtitle says what went
    long = [f"/m/block.{i}/attention/output/dense/projection/MatMul" for i in range(3)]
    shown, prefix, suffix = charts.distinct_labels(long, max_chars=20)
    assert shown == ["block.0", "block.1", "block.2"]
    assert (prefix, suffix) == ("/m/", "/attention/output/dense/projection/MatMul")
    assert "/m/" in charts.dropped_text(prefix, suffix)
    # one label, or labels that would collapse, are left whole
    assert charts.distinct_labels([a]) == ([a], "", "")
    assert charts.distinct_labels(["x/a", "x/a/b"])[0] == ["a", "a/b"]
    assert charts.distinct_labels(["conv1", "conv2"]) == (["conv1", "conv2"], "", "")


def test_sensitivity_chart_marks_kept_layers_and_budget(int8_result):
    from onnxshrink.report.html import _KEPT_COLOR, _sensitivity_chart

    quant = report_dict(int8_result, **ARGS)["quantization"]
    quant["budget"]["max_error"] = 1e-3  # the fixture's budget is 0: no line for that
    # the fixture's budget kept every layer float; say only the most sensitive was
    top = max(quant["sensitivity"], key=lambda e: e["error"])["layer"]
    quant["kept_float"] = [k for k in quant["kept_float"] if k["name"] == top]
    svg = ET.fromstring(_sensitivity_chart(quant))
    ns = "{http://www.w3.org/2000/svg}"
    texts = svg_texts(svg)
    assert "budget 0.001" in texts and "kept float" in texts
    assert [line for line in svg.iter(f"{ns}line") if line.get("class") == "reference"]
    kept = {k["name"] for k in quant["kept_float"]}
    sensitive = [e["layer"] for e in quant["sensitivity"] if e["layer"] in kept]
    assert sensitive == [top]
    bars = {
        r.find(f"{ns}title").text.split(": ")[0]: r.get("fill")
        for r in svg.iter(f"{ns}rect")
        if r.find(f"{ns}title") is not None
    }
    assert {bars[name] for name in sensitive} == {_KEPT_COLOR}
    assert {c for n, c in bars.items() if n not in kept} == {"#2f6fde"}


def _bench_rows(shapes_b: list[int]) -> dict:
    def row(model, role, p50, shape):
        return {
            "model": model, "provider": "CPUExecutionProvider", "p50_ms": p50,
            "p90_ms": p50 * 1.1, "mean_ms": p50, "throughput": 10.0, "session_s": 0.1,
            "peak_mb": 12.0, "placement": {}, "ratio": None, "runs": 5,
            "input_shapes": {"x": shape}, "role": role,
        }  # fmt: skip

    return {
        "rows": [
            row("m/a.onnx", "original", 10.0, [1, 3, 16, 16]),
            row("a.lossless.onnx (not written)", "lossless", 8.0, [1, 3, 16, 16]),
            row("m/a.opt.onnx", "result", 6.0, shapes_b),
        ],
        "skipped": [],
        "environment": {},
    }


def test_bench_states_inputs_roles_and_what_peak_measures(result):
    html = render_html(result, **ARGS, bench=_bench_rows([1, 3, 16, 16]))
    assert "Inputs of every timing: <b>x: 1x3x16x16</b>" in html
    rows = parse(html).tables["bench-table"]
    assert "inputs" not in rows[0]  # the same for all: said once, above the table
    assert [r[0].split(":")[0] for r in rows[1:]] == ["original", "lossless fp32", "result"]
    assert "peak resident memory" in html and "handed back" in html
    latency = next(svg_of(i) for i in parse(html).images if "latency" in i["alt"])
    assert {"original", "lossless fp32", "result", "inputs x: 1x3x16x16"} <= set(svg_texts(latency))
    # shapes that differ: a column says each row's
    html = render_html(result, **ARGS, bench=_bench_rows([4, 3, 16, 16]))
    rows = parse(html).tables["bench-table"]
    column = rows[0].index("inputs")
    assert [r[column] for r in rows[1:]] == ["x: 1x3x16x16", "x: 1x3x16x16", "x: 4x3x16x16"]
    md = render_markdown(result, **ARGS, bench=_bench_rows([1, 3, 16, 16]))
    assert "Inputs of every timing: **x: 1x3x16x16**" in md and "| lossless fp32: " in md


def test_shapes_text():
    from onnxshrink.report.text import shapes_text

    assert shapes_text({"x": [1, 3, 640, 640]}) == "x: 1x3x640x640"
    assert shapes_text({"ids": [4, 21], "mask": [4, 21], "n": []}) == "ids, mask: 4x21; n: scalar"
    assert shapes_text({}) == "" and shapes_text(None) == ""


def _chromium() -> str | None:
    return next(
        (p for n in ("chromium", "chromium-browser") if (p := shutil.which(n)) is not None), None
    )


@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path, int8_result):
    """The page as a browser shows it: the DOM Chromium built holds the headline and every
    section, nothing failed to load, and the screenshot is a page, not a blank window."""
    import subprocess

    bench = _bench_rows([1, 3, 16, 16])
    page = write_report(tmp_path / "r.html", int8_result, **ARGS, bench=bench)
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
    ]  # fmt: skip
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in ("int8 vs original", "within budget", "lossless stage parity", "Benchmark",
                 "Inputs of every timing", "layers kept float"):  # fmt: skip
        assert text in dom.stdout, text
    assert "<script" not in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console  # no JS errors, nothing that failed to load

    png = _render_script().render(page, tmp_path / "r.png", width=1000)
    image = pytest.importorskip("PIL.Image").open(png).convert("L")
    width, height = image.size
    assert width == 1000 and height > 1500  # every section laid out, not one screen
    top = image.crop((0, 0, width, 600))
    lo, hi = top.getextrema()
    assert hi - lo > 100  # text and cards, not a blank page
    # the charts are drawn: some rows hold the bars' colours (not grey text only)
    rgb = _render_script_png_colors(png)
    assert rgb["blue"] > 500 and rgb["red"] > 100


def _render_script_png_colors(png: Path) -> dict[str, int]:
    """Pixels close to the bar colours of the charts (blue: changed/after, red: kept float)."""
    image = pytest.importorskip("PIL.Image").open(png).convert("RGB")
    counts = {"blue": 0, "red": 0}
    for r, g, b in image.getdata():
        if abs(r - 0x2F) < 20 and abs(g - 0x6F) < 20 and abs(b - 0xDE) < 20:
            counts["blue"] += 1
        elif abs(r - 0xC9) < 20 and abs(g - 0x50) < 20 and abs(b - 0x3C) < 20:
            counts["red"] += 1
    return counts
