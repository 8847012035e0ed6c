"""Every command's `--help`: examples, option names whole at 80 columns, and agreement with
the README's command-line section.

"Agree" means, for every command the CLI registers:
1. the README's synopsis (the first code block of "## Command line") has a line starting
   `onnxshrink COMMAND`;
2. every option that synopsis names for the command exists in its `--help`;
3. every option of its `--help` (`--help` aside) is named in the synopsis, in one of its
   spellings (`-o` or `--output`; `--no-verify` for `--verify/--no-verify`);
4. every `--option` the command-line section mentions anywhere exists in some command.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from onnxshrink.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
runner = CliRunner()
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def _help(command: str, columns: int = 80) -> str:
    result = runner.invoke(
        app, [command, "--help"], env={"COLUMNS": str(columns)}, terminal_width=columns
    )
    assert result.exit_code == 0, result.output
    return result.output


def _spellings(command: str, hidden: bool = False) -> list[tuple[str, ...]]:
    """Each option parameter's names, e.g. ("-o", "--output"); hidden ones (an older spelling
    kept working, not in --help) only with `hidden`."""
    return [
        tuple(o for o in (*p.opts, *p.secondary_opts) if o.startswith("-"))
        for p in COMMANDS[command].params
        if any(o.startswith("-") for o in p.opts) and (hidden or not getattr(p, "hidden", False))
    ]


def _section() -> str:
    text = README.read_text()
    start = text.index("## Command line")
    return text[start : text.index("\n## ", start + 1)]


def _synopsis() -> dict[str, str]:
    """Command -> its synopsis text (the `onnxshrink COMMAND` line and its continuations)."""
    block = _section().split("```")[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        head = re.match(r"onnxshrink ([\w-]+)", line)
        if head:
            current = head.group(1)
            entries[current] = line.split("#")[0]
        elif line.startswith(" ") and current is not None:
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_name_is_whole_at_80_columns(command):
    text = _help(command)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    shown = set(OPTION.findall(text))
    for names in _spellings(command):
        for name in names:
            assert name in shown, f"{command} --help at 80 columns: {name} not shown whole"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_examples_that_fit_80_columns(command):
    text = _help(command)
    assert "Examples:" in text
    examples = []
    for line in text.split("Examples:")[1].splitlines()[1:]:
        if not line.strip():
            break
        examples.append(line.strip())
    assert examples and examples[0].startswith(f"onnxshrink {command}")
    # each line is the source's own: rich did not wrap it (a wrapped example breaks an
    # argument over two lines and reads as two commands)
    source = COMMANDS[command].help or ""
    for line in examples:
        assert line in source, f"{command}: example wrapped at 80 columns: {line!r}"


def test_calibration_loader_and_shape_spellings_are_documented():
    text = " ".join(_help("optimize", 200).split())
    assert "FUNCTION defaults to load_data" in text
    assert "x:[1,3,48,320]" in text and "x:1x3x48x320" in text


def test_readme_synopsis_names_every_command():
    entries = _synopsis()
    for command in COMMANDS:
        assert command in entries, f"README's command-line synopsis has no `onnxshrink {command}`"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_readme_synopsis_and_help_name_the_same_options(command):
    named = set(OPTION.findall(_synopsis()[command])) - {"-vv"}
    spellings = _spellings(command)
    known = {name for names in spellings for name in names}
    assert named <= known, f"README names options {command} does not have: {named - known}"
    for names in spellings:
        if "--help" in names:
            continue
        assert named & set(names), f"README's synopsis of {command} lacks {' / '.join(names)}"


def test_every_option_the_section_mentions_exists():
    known = {
        name for command in COMMANDS for names in _spellings(command, hidden=True) for name in names
    }
    known |= {"--version", "--help", "-vv"}
    mentioned = {m for m in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", _section())}
    assert mentioned <= known, f"README's command-line section names {mentioned - known}"
