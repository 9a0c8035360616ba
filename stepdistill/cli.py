"""The ``stepdistill`` command, and the one place where the library's exceptions become exit statuses.

    stepdistill distill --config configs/<teacher>/<method>_<N>step.yaml [key=value ...]
    stepdistill cache   --config C.yaml [--out DIR] [key=value ...]
    stepdistill export  RUN_OR_STUDENT OUT [--ema] [--lora]
    stepdistill fid     ref IMAGES ref.npz | calc IMAGES --ref ref.npz
    stepdistill msd     --config C.yaml --students K [key=value ...]
    stepdistill coco30k --pipeline P --out DIR ...

Several processes: ``accelerate launch -m stepdistill distill ...`` (or ``train/distill.py``, the
same command). Exit status: 0 done; 1 the environment failed (a disk full or read-only, another
process of the run failed); 2 bad input (one line on stderr names the key, file or value); 3 stopped
early (SIGTERM/SIGINT, or --stop-after) with a checkpoint to continue from; 4 too many non-finite
steps in a row.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import signal
import sys
import threading

from .errors import InputError, Interrupted, NonFiniteError, OtherRankFailed

EXIT_ENVIRONMENT, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NONFINITE = 1, 2, 3, 4
# the command's name -> (module with add_arguments(parser) and run(args) -> message, one line of help)
COMMANDS = {
    "distill": ("stepdistill.distill", "distil a teacher into a few-step student (resumes when re-run)"),
    "cache": ("stepdistill.data.cache", "encode a run's captions and images once, for runs with data.cache"),
    "export": ("stepdistill.export", "write a finished student as a stock diffusers pipeline folder"),
    "fid": ("stepdistill.evaluation.fid", "FID of an image folder under the clean-fid protocol"),
    "msd": ("stepdistill.msd", "several students on caption clusters, routed by prompt (MSD)"),
    "coco30k": ("stepdistill.evaluation.coco30k", "FID and CLIP score of a pipeline on COCO-2014 captions"),
}
# errno values of an OSError that mean a path the user gave is wrong, not that the machine failed
INPUT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}
# loggers whose import-time warnings say nothing about the user's run (torch's pytree registry, torchao)
QUIET_LOGGERS = ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_imports() -> None:
    """Silence the warnings that third-party packages print when imported (not when used)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM / SIGINT (a preemption) stop any phase of a command with :class:`Interrupted` (exit status
    3): what was finished is kept (every file is written atomically) and re-running the command goes on.
    The training loop replaces this with its own handler while it runs, which finishes the iteration and
    writes a checkpoint first."""
    def stop(signum, frame):
        raise Interrupted(None, signal=signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# what the machine says when it, not the input, failed; libraries that write files (torch.save, safetensors)
# wrap these OSErrors in their own exception types, so the text is what is left to recognise
MACHINE_FAILURES = ("No space left on device", "Read-only file system", "Disk quota exceeded")


def machine_failure(exc: BaseException) -> str | None:
    """One line for an exception that is a full, read-only or over-quota disk under another library's
    exception type (anywhere in its chain of causes), or None."""
    seen = exc
    while seen is not None:
        text = " ".join(str(seen).split())
        for failure in MACHINE_FAILURES:
            if failure in text:
                return f"{failure} ({type(exc).__name__}: {text[:300]})"
        seen = seen.__cause__ or seen.__context__
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def run_command(name: str, argv: list[str]) -> int:
    """Run one subcommand and turn what it raises into an exit status (module docstring)."""
    module_name, help_line = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"stepdistill {name}", description=help_line,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    args = parser.parse_intermixed_args(argv) if getattr(module, "INTERMIXED", False) else parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with stop_on_signals():
            message = module.run(args)
    except InputError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        logging.getLogger("stepdistill").warning(str(exc))
        return EXIT_INTERRUPTED
    except NonFiniteError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_NONFINITE
    except OtherRankFailed as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in str(exc) else ""
        print(f"error: {_one_line(exc)}{where}", file=sys.stderr)
        return EXIT_BAD_INPUT if exc.errno in INPUT_ERRNOS else EXIT_ENVIRONMENT
    except Exception as exc:  # noqa: BLE001  (only a machine failure that a library wrapped is turned into a line)
        failure = machine_failure(exc)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    if message:
        print(message)
    return 0


def main(argv=None) -> int:
    """``stepdistill <command> ...``; without a command, or with an unknown one, one line and status 2."""
    quiet_imports()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: stepdistill <command> [options]\n\nDistil diffusers teachers into one-to-few-step students.\n\ncommands:")
        for name, (_, help_line) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_line}")
        print("\n`stepdistill <command> --help` describes a command's options.")
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command '{argv[0]}'" if argv else "no command given"
        print(f"error: {what}; the commands are {', '.join(COMMANDS)} (stepdistill --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_command(argv[0], argv[1:])


def distill(argv=None) -> int:
    """``train/distill.py``: the distill command."""
    quiet_imports()
    return run_command("distill", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
