"""Score-based students (DMD2, SiD, VSD, DMD, Phased DMD) against the exact 8-mode mixture.

An untrained student (the teacher copy at t_init) puts every sample near the mixture mean: its
energy distance is ~2.0, over 200x the noise floor, and most modes hold no mass; each assertion
below would fail for it. Bounds are the measured values with margin (README, results table)."""

import pytest
import torch

from stepdistill.models.oracle import ORACLE_LAYOUTS
from stepdistill.testing.oracle_runs import fixed_point_distance, run_oracle


def _eval(student, gmm, n=1000, seed=11):
    steps = len(student.spec.timesteps)
    x = student.sample(torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)),
                       generator=torch.Generator().manual_seed(seed + 1) if steps > 1 else None)
    return gmm.evaluate(x)


@pytest.mark.parametrize("config,bound", [
    # measured 1.78x on this evaluation seed (1.14x on the benchmark's) since the schedules follow the loop
    # step; 5-18x before, when the fake score's schedule annealed twice as fast as the student's (README)
    pytest.param("dmd2_1step.yaml", 4.0, marks=pytest.mark.slow),  # about 85 s
    pytest.param("sid_1step.yaml", 4.0, marks=pytest.mark.slow),
    # 2.6x here, 1.39x on the benchmark's seed with five fake-score updates per student update (1.79x with one)
    pytest.param("vsd_1step.yaml", 4.0, marks=pytest.mark.slow),
    pytest.param("dmd_1step.yaml", 6.0, marks=pytest.mark.slow),
    # measured 2.4x here, 1.03x on the benchmark's seed (one expert per phase, constant schedule)
    pytest.param("phased_dmd_4step.yaml", 5.0, marks=pytest.mark.slow),
])
def test_score_student_learns_the_mixture(tmp_path, oracle_cache, config, bound):
    student, teacher, gmm, _ = run_oracle(config, tmp_path / "run", [], oracle_cache)
    ev = _eval(student, gmm)
    print(config, ev["energy"], ev["floor"], ev["energy"] / ev["floor"], ev["min_mode_mass"])
    assert ev["energy"] < bound * ev["floor"], ev
    assert ev["min_mode_mass"] > 0.04, ev  # every one of the 8 modes holds mass (1/8 = 0.125 exact)


@pytest.mark.slow
def test_vsd_student_fills_every_mode_of_the_grid(tmp_path, oracle_cache):
    """VSD on the 3x3 grid, a layout its config was not tuned on. With one fake-score update per student
    update the student left modes under-filled (3.7x the noise floor and a smallest mode of 0.064 against 1/9
    on this seed; 3.0-3.8x on the benchmark's); the shipped five updates: 1.47x, 0.098."""
    student, teacher, gmm, _ = run_oracle("vsd_1step.yaml", tmp_path / "run", ORACLE_LAYOUTS["grid"], oracle_cache)
    ev = _eval(student, gmm)
    print("vsd grid", ev["energy"] / ev["floor"], ev["min_mode_mass"])
    assert ev["energy"] < 2.5 * ev["floor"], ev
    assert ev["min_mode_mass"] > 0.07, ev


@pytest.mark.slow
@pytest.mark.parametrize("process", ["flow"])
@pytest.mark.parametrize("config", ["dmd2_1step.yaml", "sid_1step.yaml"])
def test_score_student_flow(tmp_path, oracle_cache, config, process):
    student, teacher, gmm, _ = run_oracle(config, tmp_path / "run", [f"teacher.oracle.process={process}"], oracle_cache)
    ev = _eval(student, gmm)
    print(config, process, ev["energy"] / ev["floor"], ev["min_mode_mass"])
    assert ev["energy"] < 4.0 * ev["floor"] and ev["min_mode_mass"] > 0.06, ev


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_sid_alpha_sweep(tmp_path, oracle_cache, alpha):
    student, teacher, gmm, _ = run_oracle("sid_1step.yaml", tmp_path / "run", [f"method_args.alpha={alpha}"],
                                          oracle_cache)
    ev = _eval(student, gmm)
    print("sid alpha", alpha, ev["energy"], ev["floor"], ev["min_mode_mass"])
    assert ev["energy"] < 6.0 * ev["floor"] and ev["min_mode_mass"] > 0.05, ev


@pytest.mark.slow
@pytest.mark.parametrize("config,extra,method,bound,share", [
    # measured (2000 iterations, VP, w = 2): DMD2 3.5x the floor and 0.11 of the CFG ODE samples'
    # distance, SiD-LSG 4.2x and 0.019 (README); the teacher's CFG ODE samples themselves are 34x / 230x
    ("dmd2_1step.yaml", ["method_args.guidance_scale=2.0"], "dmd", 8.0, 0.3),
    ("sid_1step.yaml", ["method_args.guidance_mode=lsg", "method_args.guidance_scale=2.0"], "sid", 8.0, 0.1),
])
def test_conditional_mixture_with_teacher_cfg(tmp_path, oracle_cache, config, extra, method, bound, share):
    """With CFG in the real score the student's target is not the teacher's CFG samples but the
    distribution its objective settles at (stepdistill.testing.fixed_points): the student must land
    there, and much nearer to it than the teacher's many-step CFG samples are."""
    student, teacher, gmm, trainer = run_oracle(config, tmp_path / "run", ["teacher.oracle.conditional=true", *extra],
                                                oracle_cache)
    opt = trainer.distiller.options  # the solver uses the run's own time range (and SiD's alpha)
    solver = {"t_min": opt.t_min, "t_max": opt.t_max, **({"alpha": opt.alpha} if method == "sid" else {})}
    d = fixed_point_distance(student, teacher, gmm, 2.0, method, **solver)
    print(config, d, d["energy"] / d["floor"], d["energy"] / d["cfg_ode_to_fixed_point"])
    assert d["energy"] < bound * d["floor"], d
    assert d["energy"] < share * d["cfg_ode_to_fixed_point"], d


@pytest.mark.slow
@pytest.mark.parametrize("process,bound", [("vp", 4.0), ("flow", 4.0)])
def test_half_width_dmd2_student_learns_the_mixture(tmp_path, oracle_cache, process, bound):
    """A smaller student (half the teacher network's width, its weights cut from the teacher's) on MSD's
    path: teacher score matching first (configs/oracle/tsm_16step.yaml), then DMD2 from that network
    (student.init) against the full-width teacher and fake score."""
    over = [f"teacher.oracle.process={process}"]
    run_oracle("tsm_16step.yaml", tmp_path / "tsm", over, oracle_cache)
    student, teacher, gmm, trainer = run_oracle("dmd2_1step.yaml", tmp_path / "run",
                                                [*over, f"student.init={tmp_path / 'tsm' / 'student'}"], oracle_cache)
    assert student.model.config.hidden == 64 and trainer.distiller.fake.model.config.hidden == 128
    ev = _eval(student, gmm)
    print("half width", process, ev["energy"] / ev["floor"], ev["min_mode_mass"])
    # measured on this seed: VP 2.1x (0.92x on the benchmark's, 1.21x over four seeds), flow 2.0x (1.2x, 1.3x),
    # every mode at >= 0.09; cut from the teacher and distilled directly, VP measured 4.1x (2.9x over four seeds)
    assert ev["energy"] < bound * ev["floor"], ev
    assert ev["min_mode_mass"] > 0.04, ev


@pytest.mark.slow
def test_disback_student_learns_the_mixture(tmp_path, oracle_cache):
    """DisBack (degradation path recorded by the fake score, then backtracking to the teacher)."""
    student, teacher, gmm, trainer = run_oracle("disback_1step.yaml", tmp_path / "run", [], oracle_cache)
    assert len(trainer.distiller.nodes) == 3
    ev = _eval(student, gmm)
    print("disback", ev["energy"] / ev["floor"], ev["min_mode_mass"])
    # measured 2.5x here (1.24x on the benchmark's seed, 1.53x over four seeds; every mode at >= 0.10);
    # 10.4x before the path's end stopped being a target and the teacher got 60% of stage 2
    assert ev["energy"] < 4.0 * ev["floor"], ev
    assert ev["min_mode_mass"] > 0.04, ev
