"""The memory options (gradient checkpointing, bf16 trainables, 8-bit AdamW) change memory, not what
is learned: each still trains, resumes exactly, and a checkpoint holds each weight once."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import load_config
from stepdistill.diffusion.denoiser import unwrap
from stepdistill.training import Trainer, list_checkpoints

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tiny_pipelines, out, *extra):
    return load_config(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml", [
        f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={out}", "train.report_to=none", "train.progress=false",
        "train.validate_every=100", "train.checkpoint_every=100", *extra])


def _weights(trainer):
    return {n: p.detach().float().clone() for n, p in unwrap(trainer.states["student"].module).named_parameters()}


def test_gradient_checkpointing_recomputes_the_same_gradients(tmp_path, tiny_pipelines):
    plain = Trainer(_cfg(tiny_pipelines, tmp_path / "a", "train.max_steps=2"))
    plain.fit()
    ckpt = Trainer(_cfg(tiny_pipelines, tmp_path / "b", "train.max_steps=2", "train.gradient_checkpointing=true"))
    assert unwrap(ckpt.states["student"].module).is_gradient_checkpointing
    assert unwrap(ckpt.states["fake"].module).is_gradient_checkpointing
    ckpt.fit()
    a, b = _weights(plain), _weights(ckpt)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], unwrap(ckpt.teacher.denoiser.model).state_dict()[k]) for k in a)  # it trained


BF16 = ["train.trainable_dtype=bf16", "method_args.lr=1e-3", "method_args.fake_lr=1e-3"]


def test_bf16_trainables_get_a_stochastic_rounding_optimiser(tmp_path, tiny_pipelines):
    from torchao.optim import _AdamW

    bf16 = Trainer(_cfg(tiny_pipelines, tmp_path / "sr", "train.max_steps=2", "train.ema_decay=0.9", *BF16))
    for name in ("student", "fake"):
        st = bf16.states[name]
        assert all(p.dtype == torch.bfloat16 for p in st.params), name
        assert isinstance(st.optimizer.optimizer, _AdamW) and st.optimizer.optimizer.bf16_stochastic_round, name
    ema = bf16.states["student"].ema  # kept in fp32: a bf16 average would not move at decay 0.9999
    assert ema is not None and all(v.dtype == torch.float32 for v in ema.state_dict()["shadow_params"])
    bf16.close()


@pytest.mark.slow  # torchao compiles its stochastic-rounding step on first use (about a minute on 2 CPU cores)
def test_bf16_trainables_use_stochastic_rounding(tmp_path, tiny_pipelines):
    bf16 = Trainer(_cfg(tiny_pipelines, tmp_path / "sr", "train.max_steps=2", *BF16))
    before = _weights(bf16)
    bf16.fit()
    assert any(not torch.equal(before[k], v) for k, v in _weights(bf16).items())  # 1e-3 updates are not rounded away


@pytest.mark.slow  # torchao compiles its 8-bit kernels on first use (about a minute on 2 CPU cores)
def test_8bit_adam_on_bf16_trainables_resumes_exactly(tmp_path, tiny_pipelines):
    from torchao.optim import AdamW8bit

    eight = BF16 + ["train.optimizer=adamw8bit"]
    full = Trainer(_cfg(tiny_pipelines, tmp_path / "full", "train.max_steps=4", *eight))
    assert isinstance(full.states["student"].optimizer.optimizer, AdamW8bit)
    full.fit()
    Trainer(_cfg(tiny_pipelines, tmp_path / "split", "train.max_steps=2", "train.checkpoint_every=2", *eight)).fit()
    resumed = Trainer(_cfg(tiny_pipelines, tmp_path / "split", "train.max_steps=4", "train.checkpoint_every=2", *eight))
    resumed.fit()
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_holds_each_weight_once(tmp_path, tiny_pipelines):
    out = tmp_path / "run"
    Trainer(_cfg(tiny_pipelines, out, "train.max_steps=2", "train.checkpoint_every=2", "method_args.fake_lora_rank=4")).fit()
    (ckpt,) = list_checkpoints(out)
    files = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*.safetensors")}
    assert not [f for f in files if f.startswith("model")]  # accelerate's copy is not written
    student = load_file(ckpt / "student" / "diffusion_pytorch_model.safetensors")
    fake = load_file(ckpt / "fake" / "trainable.safetensors")
    assert fake and all("lora" in k for k in fake)  # a LoRA fake score: its adapters, the base is the teacher's
    n_student = sum(v.numel() for v in student.values())
    assert sum(v.numel() for v in fake.values()) < 0.5 * n_student
