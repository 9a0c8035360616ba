"""Progressive, guided and BOOT students against the exact Gaussian-mixture teacher.

Each assertion would fail for the untrained student (the copy of the teacher network), whose
1-step output is the 1-step DDIM baseline."""

import pytest

from stepdistill.testing.oracle_runs import cfg_distance, run_oracle, trajectory_error


@pytest.mark.parametrize("process,steps", [pytest.param("vp", 1, marks=pytest.mark.slow), pytest.param("flow", 2, marks=pytest.mark.slow)])
def test_progressive_reproduces_teacher_map(tmp_path, oracle_cache, process, steps):
    student, teacher, gmm, _ = run_oracle("progressive_1step.yaml", tmp_path / "run", [
        f"teacher.oracle.process={process}", f"student.num_steps={steps}"], oracle_cache)
    err = trajectory_error(student, teacher)
    print(process, steps, err)
    assert err["student"] < 0.1 * err["ddim_baseline"], err
    ev = gmm.evaluate(student.sample(__import__("torch").randn(1000, 2)))
    assert ev["min_mode_mass"] > 0.08, ev


@pytest.mark.parametrize("process,steps", [pytest.param("vp", 1, marks=pytest.mark.slow), pytest.param("flow", 2, marks=pytest.mark.slow)])
def test_guided_matches_cfg_distribution_at_two_w(tmp_path, oracle_cache, process, steps):
    student, teacher, gmm, _ = run_oracle("guided_1step.yaml", tmp_path / "run", [
        f"teacher.oracle.process={process}", f"student.num_steps={steps}"], oracle_cache)
    for w in (1.5, 3.0):
        d = cfg_distance(student, teacher, gmm, w)
        print(process, steps, w, d)
        assert d["energy"] < 3 * d["floor"], (w, d)  # measured 1.8-2.4x (README)


@pytest.mark.parametrize("process", [pytest.param("vp", marks=pytest.mark.slow), pytest.param("flow", marks=pytest.mark.slow)])
def test_boot_one_step_within_floor(tmp_path, oracle_cache, process):
    import torch

    student, teacher, gmm, _ = run_oracle("boot_1step.yaml", tmp_path / "run", [f"teacher.oracle.process={process}"],
                                          oracle_cache)
    x = student.sample(torch.randn(1000, 2, generator=torch.Generator().manual_seed(11)))
    ev = gmm.evaluate(x)
    print(process, ev["energy"], ev["floor"], ev["min_mode_mass"])
    assert ev["energy"] < 2.5 * ev["floor"], ev  # measured 2.0-2.1x (README)
    assert ev["min_mode_mass"] > 0.08, ev


@pytest.mark.parametrize("process", [pytest.param("vp", marks=pytest.mark.slow), pytest.param("flow", marks=pytest.mark.slow)])
def test_consistency_student_at_one_and_four_steps(tmp_path, oracle_cache, process):
    """One LCM run, sampled at 1 and 4 steps (``Student.at_steps``). Its 1-step map approaches the
    teacher's ODE map, and at both step counts it is within 2x the floor and well below the untrained
    consistency student (the teacher network with the same boundary scalings and schedule)."""
    import torch

    student, teacher, gmm, trainer = run_oracle("lcm_4step.yaml", tmp_path / "run", [f"teacher.oracle.process={process}"],
                                                oracle_cache)
    err = trajectory_error(student.at_steps(1), teacher)
    print(process, err)
    assert err["student"] < 0.25 * err["ddim_baseline"], err
    init = trainer.distiller.ctx.init
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(11))
    for n in (1, 4):
        s = student.at_steps(n)
        ev = gmm.evaluate(s.sample(noise, generator=torch.Generator().manual_seed(3)))
        ev0 = gmm.evaluate(s.sample(noise, generator=torch.Generator().manual_seed(3), denoiser=init))
        print(process, n, ev["energy"] / ev["floor"], ev0["energy"] / ev["floor"], ev["min_mode_mass"])
        assert ev["energy"] < 2 * ev["floor"], (n, ev)  # measured: see docs/RESULTS.md
        assert ev["min_mode_mass"] > 0.08, (n, ev)
        assert ev["energy"] < 0.75 * ev0["energy"], (n, ev, ev0)
