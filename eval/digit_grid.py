"""One digit of each class per trained MNIST mini-SD student, beside the teacher's 50-step samples:
the benchmark's comparison picture for runs made by separate benchmark invocations.

    python eval/digit_grid.py --out docs/mnist_comparison_g1_ema.png \\
        "SiD, EMA=runs/benchmark/mnist-g1-sid-ema/sid_1step_g1" "DMD2, EMA=runs/benchmark/..."

Each run shows its ``student_ema/`` where it has one, else ``student/``; the teacher row is unguided
(``--guidance`` sets its CFG scale). Every row uses the same noise and prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR", help="a row label and a finished run folder")
    parser.add_argument("--out", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--guidance", type=float, default=1.0, help="the teacher row's CFG scale")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:  # every argument checked before anything is loaded
        label, sep, folder = item.partition("=")
        run = Path(folder)
        if not sep or not label:
            parser.error(f"'{item}': expected LABEL=RUN_DIR")
        if not (run / "student").is_dir():
            parser.error(f"'{item}': {run} has no student/ folder (not a finished run)")
        runs[label] = run
    if args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new file")

    import benchmark

    from stepdistill.models.student import Student
    from stepdistill.models.teachers import load_teacher

    teacher = load_teacher(benchmark.MNIST_TEACHER)
    pictures = {label: Student.load_run(run) for label, run in runs.items()}
    cfg = f", CFG {args.guidance:g}" if args.guidance != 1.0 else ""
    pictures[f"teacher DDIM 50{cfg}"] = (teacher, args.guidance)
    benchmark._digit_grid(pictures, teacher, args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
