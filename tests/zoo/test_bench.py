"""bench/compare_onnxslim.py runs as bench/README.md shows and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.zoo.conftest import model_path

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.zoo
def test_compare_onnxslim_json(tmp_path):
    model_path("ppocr-v4-cls")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/compare_onnxslim.py",
            "--models",
            "ppocr-v4-cls",
            "--runs",
            "3",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ppocr-v4-cls" in proc.stdout  # the table
    (row,) = json.loads(out.read_text())["models"]
    assert row["nodes_original"] > 0 and row["nodes_onnxslim"] > 0 and row["nodes_onnxshrink"] > 0
    assert set(row["latency_ms"]) == {"original", "onnxshrink", "onnxslim"}
    assert row["max_rel_onnxshrink"] <= 1e-4 and row["runs"] == 3
