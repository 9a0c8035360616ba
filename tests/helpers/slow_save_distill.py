"""``train/distill.py`` with every checkpoint write slowed down (``SLOW_SAVE_SECONDS`` before and after
the training-state files), so that a test can kill a run in the middle of writing a checkpoint."""

import os
import runpy
import sys
import time
from pathlib import Path

import stepdistill.training.checkpointer as checkpointer

DELAY = float(os.environ.get("SLOW_SAVE_SECONDS", "1"))
_save = checkpointer.save_state


def _slow_save(state, folder, name):
    time.sleep(DELAY)
    _save(state, folder, name)
    time.sleep(DELAY)


checkpointer.save_state = _slow_save
script = Path(__file__).resolve().parents[2] / "train" / "distill.py"
sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name="__main__")
