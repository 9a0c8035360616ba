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
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows == json.loads((tmp_path / "s" / "results.json").read_text())
    assert [row["case"] for row in rows] == ["sd15-dmd2-1step", "flux-reduced-dmd2", "wan-reduced-dmd2"]
    for row in rows:
        assert row["batch"] == 4 and row["steps"] == 1
        assert row["iteration_s"] > 0 and 0 < row["network_share"] < 1  # the networks are most, not all, of a step
        assert row["tflops_per_iteration"] > 0  # counted forward and backward FLOPs of the tiny networks
        assert row["mfu"] == pytest.approx(row["tflops_per_iteration"] / row["iteration_s"])  # against 1 TFLOP/s
        assert row["max_memory_allocated_gb"] is None  # no CUDA here


@pytest.mark.slow  # about 40 s: two full-width networks built and loaded
def test_the_gpu_cases_are_full_width_and_reduced_depth(tmp_path, eval_script):
    """The Flux and Wan pipelines of the GPU cases: the public transformer config's width (FLUX.1-dev: 24 heads of
    128; Wan2.1-14B: 40 of 128, ffn 13824) with the reduced depth, loadable by the family's pipeline class."""
    smoke = eval_script("gpu_smoke")
    import diffusers

    for family, cls, width in (("flux", "FluxPipeline", {"num_attention_heads": 24, "attention_head_dim": 128}),
                               ("wan", "WanPipeline", {"num_attention_heads": 40, "ffn_dim": 13824})):
        path = smoke.reduced_pipeline(family, tmp_path / family)
        config = json.loads((path / "transformer" / "config.json").read_text())
        assert {k: config[k] for k in width} == width
        assert {k: config[k] for k in smoke.REDUCED[family]} == smoke.REDUCED[family]
        pipe = getattr(diffusers, cls).from_pretrained(path)
        assert sum(p.numel() for p in pipe.transformer.parameters()) > 3e8  # full-width blocks
