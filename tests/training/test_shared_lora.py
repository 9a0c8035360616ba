"""A LoRA student and a LoRA fake score as two adapters of the teacher's own network
(``train.shared_lora_base``, stepdistill/models/shared_lora.py): the same training as whole copies,
one network in memory, each trainable its own adapter."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import load_config
from stepdistill.diffusion.denoiser import unwrap
from stepdistill.errors import Interrupted
from stepdistill.models.shared_lora import FAKE_SCORE, STUDENT, AdapterView, add_adapter_view, adapter_name
from stepdistill.training import Trainer

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _unet(tiny_pipelines):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(Path(tiny_pipelines["sd"]) / "unet").eval().requires_grad_(False)


def _inputs(unet):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, unet.config.in_channels, 16, 16, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 5, unet.config.cross_attention_dim, generator=g))


def _nudged(view):
    with torch.no_grad():  # B starts at zero: a view would compute the teacher
        for p in view.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return view


def test_each_call_computes_its_own_network_and_trains_only_its_adapter(tiny_pipelines):
    unet = _unet(tiny_pipelines)
    x, t, c = _inputs(unet)
    teacher = unet(x, t, c).sample
    student = _nudged(add_adapter_view(unet, STUDENT, rank=4, alpha=None, targets=TARGETS))
    fake = _nudged(add_adapter_view(unet, FAKE_SCORE, rank=4, alpha=None, targets=TARGETS))
    assert {id(p) for p in student.parameters()}.isdisjoint(id(p) for p in fake.parameters())
    assert unwrap(student) is unwrap(fake) is unet
    for p in fake.parameters():  # the loop's choice for a student update
        p.requires_grad_(False)
    out_s = student(x, t, c).sample
    out_f = fake(x, t, c).sample
    assert torch.equal(unet(x, t, c).sample, teacher)  # the network itself is still the teacher
    assert not torch.allclose(out_s, teacher) and not torch.allclose(out_f, teacher) and not torch.allclose(out_s, out_f)
    (out_s.square().mean() + out_f.square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in fake.parameters())  # used, frozen: no gradient
    assert all(p.grad is None for p in unet.parameters() if all(p is not q for q in student.parameters()))
    assert all(p.requires_grad for p in student.parameters()) and not any(p.requires_grad for p in fake.parameters())
    # the student alone, merged: what the student computes
    from stepdistill.models.student import fused_copy

    fused = fused_copy(student)
    assert not getattr(fused, "peft_config", None) and fused is not unet
    assert torch.allclose(fused(x, t, c).sample, out_s.detach(), atol=1e-5)
    assert torch.equal(unet(x, t, c).sample, teacher)


def test_gradient_checkpointing_recomputes_under_the_calls_adapter(tiny_pipelines):
    """The backward recomputes each block after the call has switched the base back to the teacher."""
    unet = _unet(tiny_pipelines)
    x, t, c = _inputs(unet)
    student = _nudged(add_adapter_view(unet, STUDENT, rank=4, alpha=None, targets=TARGETS))
    _nudged(add_adapter_view(unet, FAKE_SCORE, rank=4, alpha=None, targets=TARGETS))

    def grads():
        for p in student.parameters():
            p.grad = None
        student(x, t, c).sample.square().mean().backward()
        return [p.grad.clone() for p in student.parameters()]

    plain = grads()
    unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing
    recomputed = grads()
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(plain, recomputed))


def _cfg(tiny_pipelines, config, out, *extra):
    return load_config(ROOT / "configs" / config, [
        f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={out}", "train.report_to=none", "train.progress=false",
        "train.validate_every=100", "train.checkpoint_every=100", "train.max_steps=2", "student.lora_rank=4",
        "method_args.fake_lora_rank=4", *extra])


def _adapters(model) -> dict:
    """A network's LoRA weights by peft's adapter-free names (a view's or a copy's alike)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unwrap(model), adapter_name=adapter_name(model)).items()}


def _trained(trainer) -> dict:
    d = trainer.distiller
    out = {"student": _adapters(d.student.model), "fake": _adapters(d.fake.model)}
    if getattr(d, "head", None) is not None:  # DMD2's GAN head, trained with the fake score
        out["head"] = {k: v.detach().clone() for k, v in d.head.state_dict().items()}
    return out


def _base_bytes(trainer) -> int:
    """The memory of every network weight the run holds that is not a LoRA weight (each storage once)."""
    nets = [trainer.teacher.denoiser.model] + [st.module for st in trainer.states.values()]
    nets = [unwrap(m["net"] if isinstance(m, torch.nn.ModuleDict) else m) for m in nets]  # (DMD2's bundle: its network)
    seen = {p.data_ptr(): p.numel() * p.element_size() for m in nets for n, p in m.named_parameters() if "lora_" not in n}
    return sum(seen.values())


@pytest.mark.parametrize("config,extra", [
    ("tiny-sd/dmd2_4step.yaml", ["train.ema_decay=0.9", "method_args.gan=true", "data.images="]),
    ("tiny-sd/sid_1step.yaml", []),
    # the MNIST recipe (GAN head, EMA) on its shipped teacher: about 30 s
    pytest.param("mnist-sd/dmd2_1step.yaml", ["teacher.path=stepdistill:mnist-sd", "data.images=", "train.batch_size=4"],
                 marks=pytest.mark.slow)],
    ids=["dmd2-gan-ema", "sid", "mnist-dmd2-gan-ema"])
def test_shared_base_trains_as_three_copies(tmp_path, tiny_pipelines, config, extra):
    if "data.images=" in extra:  # the MNIST recipe's GAN head on the fake score's features, on captioned images
        from stepdistill.testing.data_fixtures import write_image_folder

        extra = [e + str(write_image_folder(tmp_path / "im", 8)) if e == "data.images=" else e for e in extra]
    shared = Trainer(_cfg(tiny_pipelines, config, tmp_path / "shared", *extra))
    copies = Trainer(_cfg(tiny_pipelines, config, tmp_path / "copies", "train.shared_lora_base=false", *extra))
    teacher = unwrap(shared.teacher.denoiser.model)
    assert isinstance(shared.distiller.student.model, AdapterView) and isinstance(shared.distiller.fake.model, AdapterView)
    assert not isinstance(copies.distiller.student.model, AdapterView)
    assert unwrap(shared.distiller.student.model) is teacher is unwrap(shared.distiller.fake.model)
    one = sum(p.numel() * p.element_size() for n, p in teacher.named_parameters() if "lora_" not in n)
    assert _base_bytes(shared) == one and _base_bytes(copies) == 3 * one  # one network, not three
    before = _trained(shared)
    assert before.keys() == _trained(copies).keys()
    for name in before:  # the same initial adapters (the same random draws, in the same order)
        assert all(torch.equal(v, _trained(copies)[name][k]) for k, v in before[name].items())
    base = {k: v.clone() for k, v in teacher.state_dict().items() if "lora" not in k}
    shared.fit()
    copies.fit()
    a, b = _trained(shared), _trained(copies)
    for name in a:
        assert a[name].keys() == b[name].keys() and a[name]
        assert all(torch.allclose(v, b[name][k], atol=1e-6, rtol=0) for k, v in a[name].items()), name
        assert any(not torch.equal(v, before[name][k]) for k, v in a[name].items()), name  # it trained
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in base.items())  # the teacher's weights never move
    # the written student: a plain network with the student's adapter alone merged, and its adapters
    for f in ("diffusion_pytorch_model.safetensors", "lora/adapter_model.safetensors"):
        sa, sb = load_file(tmp_path / "shared" / "student" / f), load_file(tmp_path / "copies" / "student" / f)
        assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa), f
    if (tmp_path / "copies" / "student_ema").is_dir():
        sa = load_file(tmp_path / "shared" / "student_ema" / "diffusion_pytorch_model.safetensors")
        sb = load_file(tmp_path / "copies" / "student_ema" / "diffusion_pytorch_model.safetensors")
        assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_shared_base_resumes_exactly(tmp_path, tiny_pipelines):
    """Checkpoints hold each view's adapter under its own name; a resumed run ends where a straight one does."""
    cfg = ["train.checkpoint_every=1", "train.max_steps=3"]
    straight = Trainer(_cfg(tiny_pipelines, "tiny-sd/dmd2_4step.yaml", tmp_path / "a", *cfg))
    straight.fit()
    first = Trainer(_cfg(tiny_pipelines, "tiny-sd/dmd2_4step.yaml", tmp_path / "b", *cfg))
    with pytest.raises(Interrupted):
        first.fit(stop_after=1)
    saved = load_file(tmp_path / "b" / "checkpoints" / "checkpoint-1" / "fake" / "trainable.safetensors")
    lora = [k for k in saved if "lora" in k]
    assert lora and all(f".{FAKE_SCORE}." in k for k in lora)  # the fake score's adapter alone
    resumed = Trainer(_cfg(tiny_pipelines, "tiny-sd/dmd2_4step.yaml", tmp_path / "b", *cfg))
    resumed.fit()
    a, b = _trained(straight), _trained(resumed)
    assert all(torch.equal(v, b[n][k]) for n in a for k, v in a[n].items())


def test_shared_base_is_not_used_where_it_does_not_apply(tmp_path, tiny_pipelines):
    full = Trainer(_cfg(tiny_pipelines, "tiny-sd/dmd2_4step.yaml", tmp_path / "full", "student.lora_rank=0"))
    assert not isinstance(full.distiller.student.model, AdapterView)  # a full student is a copy ...
    assert isinstance(full.distiller.fake.model, AdapterView)  # ... and the LoRA fake score still shares the teacher's
    full.close()
    full_fake = Trainer(_cfg(tiny_pipelines, "tiny-sd/dmd2_4step.yaml", tmp_path / "ff", "method_args.fake_lora_rank=0",
                             "train.gradient_checkpointing=true"))
    fake = unwrap(full_fake.distiller.fake.model)
    assert isinstance(full_fake.distiller.student.model, AdapterView)  # the LoRA student shares ...
    assert not getattr(fake, "peft_config", None) and fake is not unwrap(full_fake.teacher.denoiser.model)  # a plain copy
    assert fake.is_gradient_checkpointing and all(p.requires_grad for p in fake.parameters())
    full_fake.close()
    bf16 = Trainer(_cfg(tiny_pipelines, "tiny-sd/dmd2_4step.yaml", tmp_path / "bf16", "train.trainable_dtype=bf16"))
    assert not isinstance(bf16.distiller.fake.model, AdapterView)  # adapters would compute on a base of another dtype
    bf16.close()


def test_a_checkpoint_from_before_the_option_resumes_as_copies_only():
    from stepdistill.training.checkpoints import config_changes

    old = {"train": {"max_steps": 4}}  # written before train.shared_lora_base existed: its LoRA networks were copies
    assert config_changes(old, {"train": {"max_steps": 4, "shared_lora_base": False}}) == ([], [])
    unsafe, _ = config_changes(old, {"train": {"max_steps": 4, "shared_lora_base": True}})
    assert unsafe == ["train.shared_lora_base: None -> True"]


def test_a_run_checkpointed_by_several_processes_keeps_its_copies_on_one(tmp_path):
    """Several processes copy the network under each LoRA; resumed on one process, such a run keeps copies so
    that its checkpoint's names are the networks' (the whole resume: test_parallel's Flux / Wan FSDP test,
    slow)."""
    from stepdistill.distillers.score import written_by_several_processes

    run = tmp_path / "run"
    assert not written_by_several_processes(run) and not written_by_several_processes(None)
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # one process's checkpoint: no sharded/
    assert not written_by_several_processes(run)
    (run / "checkpoints" / "checkpoint-4" / "sharded").mkdir(parents=True)
    assert written_by_several_processes(run)
