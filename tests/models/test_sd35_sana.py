"""SD3.5 (QK-norm, dual-attention blocks) and Sana (Gemma 2, DC-AE, DPMSolver on flow sigmas): what
the toolkit relies on beyond the export round trip (tests/export/test_export.py) and the training runs
(tests/training/test_matrix.py, tests/distillers/test_sd35_sana_e2e.py)."""

import pytest
import torch

from stepdistill.diffusion.denoiser import Denoiser
from stepdistill.diffusion.process import FlowProcess, process_from_scheduler_config
from stepdistill.models.student import copy_for_training, fused_copy, save_lora_adapters, smaller_copy
from stepdistill.models.teachers import load_teacher


def _sd35_inputs(teacher, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *teacher.sample_shape, generator=g)
    return x, torch.tensor([0.9, 0.4]), teacher.encode(["a red cat", "a dog"])[0]


def test_sd35_teacher_has_the_sd35_layout(tiny_pipelines):
    model = load_teacher(tiny_pipelines["sd35"]).denoiser.model
    blocks = model.transformer_blocks
    assert list(model.config.dual_attention_layers) == [0, 1] and model.config.qk_norm == "rms_norm"
    assert [b.attn2 is not None for b in blocks] == [True, True, False, False]
    assert all(b.attn.norm_q is not None and b.attn.norm_added_k is not None for b in blocks)
    assert blocks[-1].context_pre_only and not blocks[0].context_pre_only


def test_sd35_lora_adapts_both_attentions_of_a_dual_block_and_loads_into_the_pipeline(tmp_path, tiny_pipelines):
    """The default student.lora_targets reach the image-only attention (attn2) of the dual blocks; every
    adapter gets a gradient; the saved adapters, loaded into the stock pipeline with load_lora_weights,
    give the fused student's output (what export --lora writes)."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    teacher = load_teacher(tiny_pipelines["sd35"])
    student = copy_for_training(teacher.denoiser.model, lora_rank=4)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in student.named_parameters() if ".lora_A" in n}
    for k in (0, 1):
        assert {f"transformer_blocks.{k}.attn2.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")} <= adapted
    assert "transformer_blocks.2.attn.to_q" in adapted and not any(".attn2." in n for n in adapted if "blocks.2" in n)
    x, t, cond = _sd35_inputs(teacher)
    den = Denoiser(student, teacher.process)
    with torch.no_grad():  # gaussian A, zero B: the LoRA starts as the teacher; move B so it changes the output
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    den(x, t, cond).square().mean().backward()
    trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trained if "attn2" in n)
    save_lora_adapters(student, tmp_path)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "pipe_lora",
                                               transformer_lora_layers=load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipelines["sd35"])
    plain = Denoiser(pipe.transformer, teacher.process)(x, t, cond)
    pipe.load_lora_weights(tmp_path / "pipe_lora")
    with torch.no_grad():
        loaded = Denoiser(pipe.transformer, teacher.process)(x, t, cond)
        fused = Denoiser(fused_copy(student).eval(), teacher.process)(x, t, cond)
    torch.testing.assert_close(loaded, fused, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, fused, atol=1e-4)


def test_sd35_gradient_checkpointing_recomputes_the_dual_blocks_with_the_same_gradients(tiny_pipelines):
    from stepdistill.training.build import enable_gradient_checkpointing

    teacher = load_teacher(tiny_pipelines["sd35"])
    x, t, cond = _sd35_inputs(teacher)
    grads, calls = [], []
    for checkpointing in (False, True):
        net = copy_for_training(teacher.denoiser.model)
        if checkpointing:
            enable_gradient_checkpointing(net)
        count = [0]
        net.transformer_blocks[0].attn2.register_forward_hook(lambda *a, c=count: c.__setitem__(0, c[0] + 1))
        Denoiser(net, teacher.process)(x, t, cond).square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
        calls.append(count[0])
    assert calls == [1, 2]  # the dual block's second attention ran again in the backward
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert grads[0]["transformer_blocks.1.attn2.to_q.weight"].abs().sum() > 0


def test_smaller_sd35_student_keeps_each_block_of_its_kind(tiny_pipelines):
    """student.architecture with fewer blocks: dual_attention_layers follows student.layer_map (a block is
    dual iff the teacher block it starts from is), with every weight from that block; a contradicting
    explicit value is refused with the reason."""
    teacher = load_teacher(tiny_pipelines["sd35"]).denoiser.model
    src = teacher.state_dict()
    cases = [(None, [0, 1]), ([1, 3], [0]), ([2, 3], []), ([2, 0], [1])]
    for picks, dual in cases:
        net, fresh = smaller_copy(teacher, {"num_layers": 2}, None if picks is None else {"transformer_blocks": picks})
        assert list(net.config.dual_attention_layers) == dual, picks
        assert [b.attn2 is not None for b in net.transformer_blocks] == [j in dual for j in range(2)]
        assert not any(".attn2." in n for n in fresh)
        for j, k in enumerate(picks or [0, 1]):
            for name, value in net.transformer_blocks[j].attn2.state_dict().items() if j in dual else ():
                assert torch.equal(value, src[f"transformer_blocks.{k}.attn2.{name}"])
    with pytest.raises(ValueError, match=r"student.architecture.dual_attention_layers \[0, 1\]: student "
                                         r"transformer_blocks j starts from teacher layer \[1, 3\]\[j\] and the "
                                         r"teacher's dual_attention_layers are \[0, 1\], so the student's are \[0\]"):
        smaller_copy(teacher, {"num_layers": 2, "dual_attention_layers": [0, 1]}, {"transformer_blocks": [1, 3]})
    net, _ = smaller_copy(teacher, {"num_layers": 2, "dual_attention_layers": [0]}, {"transformer_blocks": [1, 3]})
    assert list(net.config.dual_attention_layers) == [0]


def test_sd3_smaller_student_is_unchanged(tiny_pipelines):
    """SD3 without dual blocks: the derived dual_attention_layers is the teacher's empty list."""
    teacher = load_teacher(tiny_pipelines["sd3"]).denoiser.model
    net, fresh = smaller_copy(teacher, {"num_layers": 1}, None)
    assert list(net.config.dual_attention_layers) == [] and fresh == []
    for name, value in net.state_dict().items():
        ref = teacher.state_dict()[name]
        assert torch.equal(value, ref[tuple(slice(0, n) for n in value.shape)])


def test_sana_scheduler_is_read_as_the_flow_process_it_samples(tiny_pipelines):
    """Sana's DPMSolverMultistepScheduler on flow sigmas: the process's sigma is the scheduler's sigma, the
    x0 it reads from a flow output the scheduler's own, and the network time sigma * 1000, which the solver
    casts to an integer timestep (999.67 -> 999) where the process keeps it continuous."""
    from diffusers import DiffusionPipeline

    sched = DiffusionPipeline.from_pretrained(tiny_pipelines["sana"]).scheduler
    proc = process_from_scheduler_config(sched)
    assert isinstance(proc, FlowProcess) and proc.shift == sched.config.flow_shift == 3.0
    assert proc.prediction_type == "flow" and proc.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
    assert process_from_scheduler_config(dict(sched.config, _class_name="DPMSolverMultistepScheduler")).describe() == \
        proc.describe()
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i, timestep in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        assert 0 <= float(proc.model_time(sigma.reshape(1))) - int(timestep) < 1
        sched._step_index = i
        torch.testing.assert_close(proc.to_x0_eps(u, x, sigma.reshape(1))[0], sched.convert_model_output(u, sample=x))
    for bad, why in (({"prediction_type": "v_prediction"}, "on flow sigmas with prediction_type 'v_prediction'"),
                     ({"use_dynamic_shifting": True}, "use_dynamic_shifting=True: the shift depends on the image size")):
        with pytest.raises(ValueError, match=why):
            process_from_scheduler_config({**sched.config, "_class_name": "DPMSolverMultistepScheduler", **bad})


def test_sana_encodes_as_its_pipeline_call_does_by_default(tiny_pipelines):
    """The complex human instruction of SanaPipeline.__call__'s defaults before each prompt, none before
    the empty negative prompt; 300 tokens with their mask, the mask reaching the network."""
    import inspect

    teacher = load_teacher(tiny_pipelines["sana"])
    pipe = teacher.pipeline
    prompts = ["a red cat", "a photo of a dog"]
    cond, uncond = teacher.encode(prompts)
    chi = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    assert chi  # on by default
    pe, mask, npe, nmask = pipe.encode_prompt(prompts, True, negative_prompt="", device="cpu", complex_human_instruction=chi)
    assert torch.equal(cond.kwargs["encoder_hidden_states"], pe) and torch.equal(cond.kwargs["encoder_attention_mask"], mask)
    assert torch.equal(uncond.kwargs["encoder_hidden_states"], npe) and torch.equal(uncond.kwargs["encoder_attention_mask"], nmask)
    assert pe.shape == (2, 300, 32) and int(nmask.sum()) == 2  # "" is "<bos>" alone
    plain = pipe.encode_prompt(prompts, False, device="cpu")[0]
    assert not torch.allclose(plain, pe, atol=1e-3)  # the instruction changes the states
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.8, 0.3])
    masked = teacher.denoiser(x, t, cond)
    cond.kwargs["encoder_attention_mask"] = torch.ones_like(mask)
    assert not torch.allclose(teacher.denoiser(x, t, cond), masked, atol=1e-5)


def test_sana_dc_ae_encodes_deterministically(tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["sana"])
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    a = teacher.encode_images(img, generator=torch.Generator().manual_seed(0))
    b = teacher.encode_images(img, noise=torch.randn(2, 4, 8, 8))
    assert torch.equal(a, b) and a.shape == (2, 4, 8, 8)
    torch.testing.assert_close(a, teacher.vae.encode(img).latent * teacher.vae.config.scaling_factor)
    assert teacher.decode(a).shape == img.shape


def test_smaller_sana_student_and_guided_sana_start_as_the_teacher(tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["sana"])
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor([0.9, 0.2]), teacher.encode(["a cat", "a dog"])[0]
    guided = copy_for_training(teacher.denoiser.model, w_conditioned=True)
    assert type(guided).__name__ == "GuidedSanaTransformer2DModel"
    with torch.no_grad():
        torch.testing.assert_close(Denoiser(guided, teacher.process)(x, t, cond, guidance=4.0),
                                   teacher.denoiser(x, t, cond), rtol=1e-5, atol=1e-5)
    small = copy_for_training(teacher.denoiser.model, architecture={"num_layers": 1})
    assert len(small.transformer_blocks) == 1 and Denoiser(small, teacher.process)(x, t, cond).shape == x.shape
