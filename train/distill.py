#!/usr/bin/env python
"""Distil a teacher into a few-step student.

    accelerate launch train/distill.py --config configs/<teacher>/<method>_<N>step.yaml [key=value ...]
    python train/distill.py --config ... --dry-run        # print the resolved config and exit

Re-running the same command resumes from the latest complete checkpoint in train.output_dir.
Exit status: 0 done; 2 bad input (one line on stderr names it); 3 stopped early by SIGTERM/SIGINT
(preemption) with a checkpoint to continue from; 4 too many non-finite steps in a row.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

NONFINITE_EXIT = 4
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help=f"YAML run config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)

    from stepdistill.config import ConfigError, dump_config, load_config
    from stepdistill.data import DataError
    from stepdistill.teachers import TeacherLoadError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.dry_run:
            from stepdistill.trainer import validate_inputs

            validate_inputs(cfg)
            print(dump_config(cfg), end="")
            return 0
        from stepdistill.trainer import NonFiniteError, Trainer

        try:
            out = Trainer(cfg).fit()
        except NonFiniteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return NONFINITE_EXIT
    except (ConfigError, DataError, TeacherLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"student written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
