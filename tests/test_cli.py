"""The stepdistill command: one line and status 2 without a command or with an unknown one, and the one
mapping from what a command raises to its exit status."""

import errno
import subprocess
import sys
import types

import pytest

from stepdistill import cli
from stepdistill.errors import ConfigError, Interrupted, NonFiniteError, OtherRankFailed


@pytest.mark.parametrize("argv,message", [([], "no command given"), (["distil"], "unknown command 'distil'"),
                                          (["--config", "x.yaml"], "unknown command '--config'")])
def test_no_or_unknown_command_is_one_line_and_status_2(argv, message):
    r = subprocess.run([sys.executable, "-m", "stepdistill", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: {message}; the commands are distill, cache, export, fid, msd, "
                                             f"coco30k (stepdistill --help)"]


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in cli.COMMANDS)


def _raising(exc):
    module = types.ModuleType("raising_command")
    module.add_arguments = lambda parser: None

    def run(args):
        raise exc

    module.run = run
    return module


@pytest.mark.parametrize("exc,status", [
    (ConfigError("train.max_steps: must be >= 1, got 0"), 2),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "missing.yaml"), 2),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "a_folder"), 2),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints"), 1),
    (PermissionError(errno.EROFS, "Read-only file system", "runs/x/.lock"), 1),
    (OtherRankFailed("writing checkpoint-4 failed on the main process: disk full"), 1),
    (Interrupted(4, "runs/x/checkpoints/checkpoint-4"), 3),
    (NonFiniteError("10 steps in a row had a non-finite loss"), 4),
])
def test_each_exception_becomes_its_exit_status(monkeypatch, capsys, exc, status):
    monkeypatch.setitem(sys.modules, "raising_command", _raising(exc))
    monkeypatch.setitem(cli.COMMANDS, "raising", ("raising_command", "a test command"))
    assert cli.main(["raising"]) == status
    err = capsys.readouterr().err
    if status in (1, 2, 4):
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
        if isinstance(exc, OSError):
            assert exc.filename in err  # the line names the file


def test_an_unexpected_error_is_not_swallowed(monkeypatch):
    monkeypatch.setitem(sys.modules, "raising_command", _raising(KeyError("a bug")))
    monkeypatch.setitem(cli.COMMANDS, "raising", ("raising_command", "a test command"))
    with pytest.raises(KeyError):
        cli.main(["raising"])
