"""eval/gpu_smoke.py --dry-run: the GPU script's own path, on the tiny SD pipeline, on this machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_smoke_dry_run_measures_what_it_reports(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "gpu_smoke.py"), "--dry-run", "--out", str(tmp_path / "s"),
                        "--peak-tflops", "1.0"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert row == json.loads((tmp_path / "s" / "results.json").read_text())[0]
    assert row["case"] == "sd15-dmd2-1step" and row["batch"] == 4 and row["steps"] == 1
    assert row["iteration_s"] > 0 and 0 < row["network_share"] < 1  # the networks are most, not all, of a step
    assert row["tflops_per_iteration"] > 0  # counted forward and backward FLOPs of the tiny networks
    assert row["mfu"] == pytest.approx(row["tflops_per_iteration"] / row["iteration_s"])  # against the given 1 TFLOP/s
    assert row["max_memory_allocated_gb"] is None  # no CUDA here
