"""eval/overhead.py records the passes of a real training iteration and times them alone and in place."""

import importlib.util
from pathlib import Path

from stepdistill.testing.tiny_pipelines import TINY_FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def _overhead():
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "eval" / "overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dmd_iteration_passes_are_recorded_and_timed(tmp_path):
    overhead = _overhead()
    teacher = TINY_FAMILIES["sd"](tmp_path / "sd")
    r = overhead.measure("dmd", teacher, tmp_path / "run", iters=2)
    # DMD, one iteration: student phase = generator forward, teacher (cond and uncond in one batch),
    # fake score, student on a regression pair; fake phase = generator rollout, fake score with grad
    assert r["passes"] == 6, r
    # the passes timed in place are part of the iteration, so they cannot take longer than it
    assert 0 < r["in_place_ms"] < r["iteration_ms"], r
