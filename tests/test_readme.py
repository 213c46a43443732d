"""The README says what the tool does: its command table's commands and options exist, its demo table
is the demo's own output (spliced by `make readme-demo`), and it stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cpl_cache.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def command_rows() -> list[str]:
    table = README.split("## Command line", 1)[1].split("\n\n", 2)[1]
    return [line for line in table.splitlines() if line.startswith("| `cpl-cache ")]


@pytest.mark.parametrize("row", command_rows(), ids=lambda r: r.split("`")[1])
def test_every_command_and_option_in_the_command_table_exists(row: str):
    usage = row.split("`")[1]
    name = usage.split()[1]
    help_text = CliRunner().invoke(app, [name, "--help"], terminal_width=200).output
    assert "Usage" in help_text, help_text
    for option in re.findall(r"--[a-z][a-z-]*", usage):
        assert option in help_text, (name, option)
    # The table's positional arguments (upper-case words not after an option) are the command's own.
    words = re.sub(r"\[[^\]]*\]", "", usage).split()[2:]
    positional = [w for i, w in enumerate(words) if w.isupper() and not (i and words[i - 1].startswith("-"))]
    usage_line = next(line for line in help_text.splitlines() if "Usage" in line)
    takes = usage_line.split("[OPTIONS]", 1)[1].split()
    assert len(positional) == len(takes), (usage, usage_line)


def test_the_demo_table_is_spliced_from_the_demos_output():
    block = README.split("<!-- demo-table -->", 1)[1].split("<!-- /demo-table -->", 1)[0].strip()
    lines = block.splitlines()
    assert lines[0].startswith("| Method |") and lines[1].startswith("|---")
    rows = [line.split("|")[1].strip() for line in lines[2:] if line.startswith("|")]
    assert rows[0] == "Weak" and "CPL" in rows and rows[-1] == "Strong ceiling"


def test_the_readme_stays_short():
    assert len(README.splitlines()) <= 200


def test_every_file_the_readme_links_or_names_is_in_the_repository():
    """It cited a DESIGN.md that the repository did not hold; the contract is docs/design.md."""
    root = Path(__file__).resolve().parents[1]
    linked = re.findall(r"\]\(([^)#\s]+)\)", README)
    assert "docs/design.md" in linked
    for target in linked:
        if not target.startswith(("http://", "https://")):
            assert (root / target).exists(), target
    assert "DESIGN.md" not in README.replace("docs/design.md", "")


def _helps() -> dict[str, str]:
    names = [c.name for c in app.registered_commands]
    return {n: CliRunner().invoke(app, [n, "--help"], terminal_width=200).output for n in names}


def test_every_command_takes_progress_and_no_progress():
    """The README says `--no-progress` is silent; eight commands rejected it."""
    for name, help_text in _helps().items():
        assert "--progress" in help_text and "--no-progress" in help_text, name


def test_every_flag_the_readme_gives_a_command_is_one_of_its_options():
    helps = _helps()
    for line in README.splitlines():
        for m in re.finditer(r"cpl-cache ([a-z-]+)([^`|]*)", line):
            name, rest = m.group(1), m.group(2)
            if name not in helps:
                continue
            for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                assert option in helps[name], (name, option, line)
