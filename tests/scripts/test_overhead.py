"""eval/overhead.py records the passes of a real training iteration and times them alone and in place."""


def test_dmd_iteration_passes_are_recorded_and_timed(tmp_path, tiny_pipelines, eval_script):
    overhead = eval_script("overhead")
    r = overhead.measure("dmd", tiny_pipelines["sd"], tmp_path / "run", iters=2)
    # DMD, one iteration: student phase = generator forward, teacher (cond and uncond in one batch),
    # fake score, student on a regression pair; fake phase = generator rollout, fake score with grad
    assert r["passes"] == 6, r
    # the passes timed in place are part of the iteration, so they cannot take longer than it
    assert 0 < r["in_place_ms"] < r["iteration_ms"], r
