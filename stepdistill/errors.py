"""The exceptions the library raises; only the entry points turn them into exit statuses.

``InputError`` and its subclasses are bad input (a config key, a file, a value): the message is one
line naming it, raised before any work where possible (exit status 2). ``Interrupted`` is a run
stopped early with a checkpoint to resume from (3); ``NonFiniteError`` too many non-finite steps in a
row (4); ``OtherRankFailed`` a multi-process run whose main process failed (1). See ``stepdistill.cli``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message names the key, file or value."""


class ConfigError(InputError):
    """A config problem; the message names the key."""


class DataError(InputError):
    """A problem with user data; the message names the file."""


class TeacherLoadError(InputError):
    """A teacher path or pipeline that cannot be used; the message names it."""


class ExportError(InputError):
    """A student, run or destination that cannot be exported; the message names it."""


class EvalError(InputError):
    """A problem with an evaluation's inputs (path, weights, settings)."""


class OtherRankFailed(RuntimeError):
    """Another process of a multi-process run failed in a step they take together; its own error names why."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient; the message names the last good checkpoint."""


class Interrupted(BaseException):
    """The command stopped early: a run after writing a checkpoint (SIGTERM / SIGINT, or ``stop_after``),
    or any command in a phase without checkpoints (fitting, sampling, caching, exporting), whose finished
    parts are kept (``signal`` names what stopped it). A BaseException, like KeyboardInterrupt, so that
    code catching ``Exception`` (a damaged file, an unreadable image) never takes a stop for bad data."""

    def __init__(self, step: int | None, checkpoint=None, signal: str | None = None):
        if checkpoint is not None:
            text = f"stopped at step {step} with a checkpoint ({checkpoint}); re-run the same command to continue"
        else:
            text = (f"stopped by {signal or 'a signal'} before its next checkpoint; what was finished is kept, and "
                    f"re-running the same command continues from there")
        super().__init__(text)
        self.step = step
        self.checkpoint = checkpoint
