"""The distillation command: the one place where the library's exceptions become exit statuses.

    accelerate launch train/distill.py --config configs/<teacher>/<method>_<N>step.yaml [key=value ...]
    stepdistill-distill --config ... [key=value ...]          # the same, installed as a console script
    stepdistill-distill --config ... --dry-run                # print the resolved config and exit

Re-running the same command resumes from the latest complete checkpoint in train.output_dir.
Exit status: 0 done; 2 bad input (one line on stderr names it); 3 stopped early (SIGTERM/SIGINT, or
--stop-after) with a checkpoint to continue from; 4 too many non-finite steps in a row.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import InputError, Interrupted, NonFiniteError

EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NONFINITE = 2, 3, 4
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def distill(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="stepdistill-distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help=f"YAML run config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop with a checkpoint after step N (exit status 3), as a preemption would")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_intermixed_args(argv)  # options may stand between the key=value overrides
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"--stop-after must be >= 1, got {args.stop_after}")

    from .config import dump_config, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.config is None and not DEFAULT_CONFIG.is_file():
            raise InputError(f"no --config given and the default config {DEFAULT_CONFIG} is not there "
                             f"(it ships with the repository checkout)")
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.dry_run:
            from .training import validate_inputs

            validate_inputs(cfg)
            print(dump_config(cfg), end="")
            return 0
        from .training import Trainer

        out = Trainer(cfg).fit(stop_after=args.stop_after)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        logging.getLogger("stepdistill").warning(str(exc))
        return EXIT_INTERRUPTED
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    print(f"student written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(distill())
