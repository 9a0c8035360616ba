"""The distill command: train a run from its config (resuming when re-run) and, with ``train.export``,
export the student as a stock pipeline (``stepdistill.export``) at the end.

    stepdistill distill --config configs/<teacher>/<method>_<N>step.yaml [key=value ...]
    accelerate launch train/distill.py --config ... [key=value ...]     # the same command
    stepdistill distill --config ... --dry-run                          # print the resolved config
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import RunConfig, dump_config, load_config
from .errors import InputError
from .export import check_exportable, export_run
from .training import Trainer, validate_inputs

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
INTERMIXED = True  # options may stand between the key=value overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help=f"YAML run config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop with a checkpoint after step N (exit status 3), as a preemption would")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")


def train(cfg: RunConfig, stop_after: int | None = None) -> Path:
    """Train ``cfg``'s run to the end (or ``stop_after``) and return the student folder; with
    ``train.export``, also ``<output_dir>/pipeline``, refused before training when the student has no
    pipeline form."""
    trainer = Trainer(cfg)
    if cfg.train.export:
        try:
            check_exportable(trainer.distiller, trainer.teacher)
        except BaseException:
            trainer.close()
            raise
        has_ema = any(st.ema is not None for st in trainer.states.values())
        trainer.finishers.append(lambda: export_run(trainer.run_dir, cfg.teacher.path, use_ema=has_ema))
    return trainer.fit(stop_after=stop_after)


def run(args) -> str | None:
    if args.stop_after is not None and args.stop_after < 1:
        raise InputError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.config is None and not DEFAULT_CONFIG.is_file():
        raise InputError(f"no --config given and the default config {DEFAULT_CONFIG} is not there (it ships with "
                         f"the repository checkout)")
    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    if args.dry_run:  # checked as the smallest launch the config allows (one process, or one context group)
        validate_inputs(cfg, cfg.train.context_parallel)
        print(dump_config(cfg), end="")
        return None
    return f"student written to {train(cfg, args.stop_after)}"
