#!/usr/bin/env python
"""Distil a teacher into a few-step student: ``stepdistill distill`` (stepdistill/distill.py).

    accelerate launch train/distill.py --config configs/<teacher>/<method>_<N>step.yaml [key=value ...]
    python train/distill.py --config ... --dry-run        # print the resolved config and exit
"""

import sys

from stepdistill.cli import distill

if __name__ == "__main__":
    sys.exit(distill())
