"""Verbs are thin: only the CLI imports them, and what they print comes from library calls."""

from __future__ import annotations

import ast
from pathlib import Path

import moekit
from moekit.cli import main
from tests.analysis.helpers import save_tiny_checkpoint


def test_nothing_but_the_cli_imports_a_command():
    package = Path(moekit.__file__).parent
    offenders = []
    for file in package.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "moekit.commands" or n.startswith("moekit.commands.") for n in names):
                offenders.append(str(file.relative_to(package)))
    assert sorted(set(offenders)) == ["cli.py"]


def test_generate_stops_before_a_stop_string(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "run")
    argv = [
        "generate",
        "--checkpoint",
        str(tmp_path / "run"),
        "--prompt",
        "ab",
        "--seed",
        "3",
        "--max-new-tokens",
        "40",
    ]
    assert main(argv) == 0
    new = capsys.readouterr().out[2:-1]  # the prompt comes first, a newline last
    stop = next(c for c in new[3:] if c.isascii() and c.isprintable())
    assert main([*argv, "--stop", stop]) == 0
    assert capsys.readouterr().out == "ab" + new[: new.find(stop)] + "\n"
    assert new.find(stop) > 0  # the run above printed text, then stopped short
