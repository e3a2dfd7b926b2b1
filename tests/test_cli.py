"""The ``fusedpg`` entry point: its help, --version, and how it passes commands and their exit codes on."""
from __future__ import annotations

from importlib import metadata

import pytest

import fusedpg
from fusedpg import cli
from fusedpg.bench import default_out


def test_help_names_both_commands_and_where_bench_writes(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("usage: fusedpg COMMAND") and "fusedpg COMMAND --help" in lines[0]
    assert any(line.startswith("  verify ") and "float64" in line for line in lines)
    assert any(line.startswith("  bench ") for line in lines)
    assert default_out() in text and "--version" in text
    assert cli.main(["-h"]) == 0 and capsys.readouterr().out == text


def test_no_command_prints_help_to_stderr_and_fails(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: fusedpg COMMAND" in captured.err


def test_unknown_command_says_what_is_expected(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fusedpg: unknown command 'frobnicate' (expected verify or bench; fusedpg --help)"


def test_version(capsys, monkeypatch):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fusedpg {metadata.version('fusedpg')}"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)  # a bare checkout on sys.path: the package's own
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fusedpg {fusedpg.__version__}"


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_command_help_and_usage_errors_return_codes(command, capsys):
    assert cli.main([command, "--help"]) == 0  # argparse's exit becomes a return code
    assert f"usage: fusedpg {command}" in capsys.readouterr().out
    assert cli.main([command, "--no-such-option"]) == 2
    assert "--no-such-option" in capsys.readouterr().err
