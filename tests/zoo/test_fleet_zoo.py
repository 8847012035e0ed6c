"""`optimize-many` on real models: the smallest zoo models with `--workers 2` give the files
`optimize` writes for each alone (sha256), a manifest, and a rerun that skips them all."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from onnxshrink import optimize
from onnxshrink.cli import app
from tests.zoo.conftest import ZOO_DIR, sha256_of

pytestmark = pytest.mark.zoo

#: how many zoo models the test runs: the smallest files, so that it stays under a minute
MODELS = 3


def test_optimize_many_matches_optimize_alone_on_the_smallest_zoo_models(tmp_path):
    found = sorted(ZOO_DIR.glob("*.onnx"), key=lambda p: p.stat().st_size)[:MODELS]
    if len(found) < MODELS:
        pytest.skip(f"fewer than {MODELS} models in {ZOO_DIR}: run `make models`")
    folder = tmp_path / "models"
    folder.mkdir()
    for path in found:
        (folder / path.name).symlink_to(path)
    out = tmp_path / "out"
    # --allow-unverified: a model that needs --input-shape for its parity run is written too
    command = [
        "optimize-many",
        str(folder / "*.onnx"),
        "--out",
        str(out),
        "--workers",
        "2",
        "--allow-unverified",
    ]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    for path in found:
        alone = tmp_path / f"{path.stem}.alone.onnx"
        optimize(path, alone, allow_unverified=True)
        assert sha256_of(out / f"{path.stem}.opt.onnx") == sha256_of(alone), path.name
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["model"].rsplit("/", 1)[-1] for r in lines) == sorted(p.name for p in found)
    start = time.perf_counter()
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert sum(line.startswith("skipped ") for line in again.output.splitlines()) == MODELS
    assert time.perf_counter() - start < 10
