"""README's example output is what the commands print: every `$ qwenhw plan|detect|backends ...` line of its
console blocks that is followed by output is run, and each output line shown (whitespace aside; `...` marks
lines left out) must appear in what the command prints."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwenhw import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", README.read_text(), flags=re.S):
        for chunk in re.split(r"\n(?=\$ )", block.strip()):
            command, *shown = chunk.splitlines()
            shown = [line for line in shown if line.strip() and line.strip() != "..."]
            if shown and command.startswith("$ qwenhw ") and "|" not in command:
                out.append((command[2:].split("  #")[0].strip(), shown))
    return out


def squeeze(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_readme_has_examples_with_output():
    assert len(examples()) >= 4


@pytest.mark.parametrize("command, shown", examples(), ids=[c for c, _ in examples()])
def test_readme_example_output_is_what_the_command_prints(command, shown):
    result = CliRunner(env={"COLUMNS": "110"}).invoke(cli.main, shlex.split(command)[1:])
    printed = squeeze(result.output)
    for line in shown:
        assert squeeze(line) in printed, f"README shows {line!r}; `{command}` printed:\n{result.output}"
