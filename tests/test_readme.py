"""The README's commands run as documented, so the documentation cannot rot.

Every line of a README code block that starts with `$ ` is a command: `onnxshrink ...` runs
through the CLI, `python ...` as a subprocess, both from a scratch folder that sees the repo's
`models/`. Lines after a command up to the next blank line or command are its expected output:
an `error:` line must appear verbatim, and a `nodes` row of the before/after table must match.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onnxshrink.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _commands() -> list[tuple[str, list[str]]]:
    commands: list[tuple[str, list[str]]] = []
    in_block = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if line.startswith("$ "):
            commands.append((line[2:].strip(), []))
        elif commands and line.strip():
            commands[-1][1].append(line)
    return commands


COMMANDS = _commands()


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for all README commands: later commands read what earlier ones wrote."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "models").symlink_to(ROOT / "models")
    (folder / "out").mkdir()
    return folder


@pytest.mark.zoo
@pytest.mark.parametrize("command, expected", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_readme_command(command, expected, scratch, monkeypatch):
    for ref in re.findall(r"models/zoo/[\w.-]+\.onnx", command):
        if not (ROOT / ref).exists():
            pytest.skip(f"{ref} missing: run `make models`")
    monkeypatch.chdir(scratch)
    argv = shlex.split(command)
    if argv[0] == "onnxshrink":
        result = CliRunner().invoke(app, argv[1:])
        output, code = result.output, result.exit_code
    else:
        assert argv[0] == "python", f"unknown README command {command!r}"
        proc = subprocess.run(
            [sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300
        )
        output, code = proc.stdout + proc.stderr, proc.returncode
    assert "Traceback" not in output
    errors = [line for line in expected if line.startswith("error:")]
    if errors:
        assert code == 2, output
        for line in errors:
            assert line in output
        return
    assert code == 0, output
    for line in expected:
        if re.match(r"[│|]\s*nodes\s", line):
            want = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
            got = next((ln for ln in output.splitlines() if re.match(r"[│|]\s*nodes\s", ln)), "")
            assert [c.strip() for c in re.split(r"[│|]", got) if c.strip()][:3] == want[:3]
