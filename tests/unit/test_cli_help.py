"""Every job's `--help` names the command to type, shows an example of it, and says what the job writes."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hlm.cli import command_parser

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted(f"pipelines.{p.stem}" for p in (REPO / "pipelines").glob("*.py") if p.stem != "__init__")


def test_every_job_module_is_covered():
    assert len(JOBS) >= 11 and {"pipelines.evaluate", "pipelines.publish_index", "pipelines.index"} <= set(JOBS)


@pytest.mark.parametrize("module", JOBS)
def test_help_shows_the_command_an_example_and_what_the_job_writes(module, capsys):
    # When a job's --help is asked for, as a caller that is not `python -m` would (a test, a wrapper script)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    shown = capsys.readouterr().out
    # Then it exits 0 and shows the real command, not `<job>.py` or `__main__.py`
    assert exit_.value.code == 0
    assert shown.startswith(f"usage: python -m {module} ")
    # and at least one example of that command, and a paragraph that says what the job writes
    lines = [line.strip() for line in shown.splitlines()]
    assert any(line.startswith(f"python -m {module} ") for line in lines), f"{module}: no example in --help"
    assert any(re.match(r"Writes\b", line) for line in lines), f"{module}: --help does not say what it writes"
    # and a continued example line keeps its backslash, so it pastes into a shell as written
    assert not re.search(r"\S {5,}--", shown.split("\n\n", 2)[-1]), f"{module}: an example lost its line break"


def test_help_through_python_dash_m_shows_the_same_command():
    done = subprocess.run([sys.executable, "-m", "pipelines.index", "--help"], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert done.stdout.startswith("usage: python -m pipelines.index ")
    assert "python -m pipelines.index export --index ads" in done.stdout


def test_the_parser_takes_its_command_from_the_file_and_its_text_from_the_docstring():
    doc = "One line.\n\n    python -m pipelines.thing --x 1\n\nWrites OUT/x.\n"
    parser = command_parser(doc, "/a/pipelines/thing.py")
    assert parser.prog == "python -m pipelines.thing" and parser.description == "One line."
    assert parser.epilog == "    python -m pipelines.thing --x 1\n\nWrites OUT/x."
