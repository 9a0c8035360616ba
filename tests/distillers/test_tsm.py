"""Teacher score matching (method tsm) and students started from a saved network (student.init): a
smaller student is first trained to imitate the teacher, then distilled from there."""

import shutil

import torch
from safetensors.torch import load_file

from stepdistill.config import load_config
from stepdistill.models.nets import MLPDenoiser
from stepdistill.models.student import copy_for_training
from stepdistill.storage import claim_folder
from stepdistill.testing.oracle_runs import CONFIGS, run_oracle
from stepdistill.training import Trainer


def _imitation_error(model, teacher, gmm, n=2048, seed=3):
    """Mean squared difference between a network's prediction and the exact teacher's (in the network's
    parameterisation, v) at noised mixture samples over the whole time range."""
    proc = teacher.process
    g = torch.Generator().manual_seed(seed)
    x0, _ = gmm.sample(n, g)
    t = (proc.t_max * torch.rand(n, generator=g)).clamp(min=0.0)
    x_t = proc.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    with torch.no_grad():
        target = teacher.denoiser(x_t, t, None, output="v_prediction")
        return float((model(x_t, proc.model_time(t)) - target).pow(2).mean())


def test_tsm_student_imitates_the_teacher_and_starts_a_distillation(tmp_path, oracle_cache):
    tsm, teacher, gmm, _ = run_oracle("tsm_16step.yaml", tmp_path / "tsm", ["train.max_steps=300"], oracle_cache)
    assert tsm.model.config.hidden == 64
    fitted = MLPDenoiser.from_pretrained(tmp_path / "tsm" / "oracle_network")  # the network students are cut from
    cut = copy_for_training(fitted, architecture={"hidden": 64}).eval()  # the untrained start
    before, after = _imitation_error(cut, teacher, gmm), _imitation_error(tsm.model, teacher, gmm)
    print("imitation error: cut", before, "after TSM", after)
    assert after < 0.2 * before, (before, after)

    # a DMD2 run started from it: its student is that network (not a cut of the teacher's), trained from there
    init = tmp_path / "tsm" / "student"
    out = tmp_path / "dmd2"
    claim_folder(out, "distill")  # the run's folder, with the same fitted network copied in
    shutil.copytree(tmp_path / "tsm" / "oracle_network", out / "oracle_network")
    cfg = load_config(CONFIGS / "dmd2_1step.yaml", [f"train.output_dir={out}", "train.report_to=none", "train.progress=false",
                                                    "train.max_steps=2", f"student.init={init}"])
    trainer = Trainer(cfg)
    saved = load_file(init / "diffusion_pytorch_model.safetensors")
    start = trainer.distiller.student.model.state_dict()
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    assert trainer.distiller.fake.model.config.hidden == 128  # the fake score is still the teacher's copy
    trainer.fit()
    final = load_file(out / "student" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(saved[k], final[k]) for k in saved)
