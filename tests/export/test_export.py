"""Export round trip: the exported folder loads with plain `DiffusionPipeline.from_pretrained` and
samples exactly what the toolkit's own student sampler samples for the same seed."""

import json
from pathlib import Path

import pytest
import torch

from stepdistill.diffusion.denoiser import Denoiser
from stepdistill.errors import ExportError
from stepdistill.export import export, sampling_kwargs
from stepdistill.models.student import Student, StudentSpec, copy_for_training
from stepdistill.models.teachers import load_teacher

ROOT = Path(__file__).resolve().parents[2]


def make_student_folder(folder: Path, teacher, sampler: str, timesteps, guidance=None, seed=0) -> Student:
    """A student as a run writes it: a perturbed copy of the teacher network and its schedule."""
    model = teacher.denoiser.model
    net = copy_for_training(model, w_conditioned=guidance is not None).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    proc = teacher.denoiser.process
    embedded = teacher.denoiser.embedded_guidance  # a guidance input (FLUX.1-dev): the student reads the teacher's
    spec = StudentSpec("test", sampler, [float(t) for t in timesteps], guidance if guidance is not None else embedded,
                       proc.describe(), teacher.denoiser.prediction_type, sample_shape=list(teacher.sample_shape))
    student = Student(Denoiser(net, proc, teacher.denoiser.prediction_type, embedded), spec)
    student.save(folder)
    return student


def _flow(ts, shift=3.0):
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


CASES = [  # family, sampler, timesteps, guidance (w input)
    ("sd", "renoise", [999, 749, 499, 249], None),  # DMD2-style few-step
    ("sd", "renoise", [625], None),  # one step at a t_init below T (SiD)
    ("sd", "deterministic", [999, 499], None),  # progressive
    ("sd", "deterministic", [999, 499], 3.0),  # guided, w as an input
    ("sdxl", "renoise", [999, 499], None),
    ("dit", "renoise", [999, 499], None),
    ("pixart", "deterministic", [999, 749, 499, 249], None),
    ("sd3", "deterministic", _flow([1.0, 0.5]), None),
    ("sd3", "renoise", _flow([1.0, 0.75, 0.5, 0.25]), None),
    ("pixel", "renoise", [999, 499], None),
    ("sd35", "renoise", _flow([1.0]), None),  # SiD-style one step, through the dual-attention blocks
    ("sd35", "renoise", _flow([1.0, 0.75, 0.5, 0.25]), None),
    ("sana", "renoise", _flow([1.0]), None),  # Sana's own DPMSolver (flow sigmas) -> a stock flow scheduler
    ("sana", "renoise", _flow([1.0, 0.75, 0.5, 0.25]), None),  # DMD2: FlowMatchLCMScheduler
    ("sana", "deterministic", _flow([1.0, 0.5]), None),  # progressive: FlowMatchEulerDiscreteScheduler
    ("sd", "signal", [-1], None),  # BOOT: one step, the network's timestep input folded away
    ("sd3", "signal", [0.0], None),
    ("sana", "signal", [0.0], None),
    ("dit", "signal", [-1], None),
    ("pixel", "signal", [-1], None),
    # packed-token families (an int: the teacher's own n-step grid, at its static shift for 8x8 latents)
    ("flux", "renoise", 1, None),  # one step (SiD); FLUX.1-dev's guidance input fed the teacher's 3.5
    ("flux", "renoise", 4, None),  # DMD2-style few-step, re-noised in the packed layout
    ("flux", "deterministic", 2, None),  # progressive
    ("qwenimage", "renoise", [0.9], None),
    ("qwenimage", "renoise", 4, None),  # the grid's last time is Qwen-Image's shift_terminal, 0.02
]
PACKED = {"flux", "qwenimage"}  # any size: their tiny teachers are distilled at 8x8 latents (teacher.sample_size)


def _teacher(tiny_pipelines, family):
    return load_teacher(tiny_pipelines[family], sample_size=8 if family in PACKED else None)


@pytest.mark.parametrize("family,sampler,timesteps,guidance", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2] if isinstance(c[2], int) else len(c[2])}step" + ("-w" if c[3] else "")
                              for c in CASES])
def test_exported_pipeline_samples_like_the_toolkit(tmp_path, tiny_pipelines, family, sampler, timesteps, guidance):
    from diffusers import DiffusionPipeline

    teacher = _teacher(tiny_pipelines, family)
    if isinstance(timesteps, int):
        timesteps = teacher.process.grid(timesteps).tolist()
    student = make_student_folder(tmp_path / "student", teacher, sampler, timesteps, guidance)
    out = export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines[family])
    kwargs = sampling_kwargs(out)
    assert kwargs["num_inference_steps"] == len(timesteps)
    pipe = DiffusionPipeline.from_pretrained(out)  # no stepdistill involved from here
    assert type(pipe).__name__ == type(teacher.pipeline).__name__
    n = 2
    shape = (n, *teacher.sample_shape)
    pipe_name = type(pipe).__name__
    call = dict(kwargs, generator=torch.Generator().manual_seed(7))
    if pipe_name == "DiTPipeline":  # no latent output: compare decoded images
        labels = [1, 2]
        call.update(class_labels=labels, output_type="np")
        cond = teacher.encode(labels)[0]
    elif pipe_name == "DDPMPipeline":
        call.update(batch_size=n, output_type="np")
        cond = None
    else:
        prompts = ["a red cube", "two cats"]
        size = teacher.sample_shape[-1] * pipe.vae_scale_factor
        call.update(prompt=prompts, output_type="latent", height=size, width=size)
        if pipe_name.startswith(("PixArt", "Sana")):
            call.update(use_resolution_binning=False)
        cond = teacher.encode(prompts)[0]
    torch.manual_seed(123)  # DiT / SD3 / Flux / Qwen-Image pipelines re-noise from the global generator
    got = pipe(**call).images
    got = torch.as_tensor(got)
    if family in PACKED:  # their latent output is the packed tokens: unpacked by the pipeline's own method
        got = pipe._unpack_latents(got, size, size, pipe.vae_scale_factor).reshape(shape)
    # the toolkit: same initial noise (first draw of the seeded generator), same re-noising stream
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(shape, generator=g)
    torch.manual_seed(123)
    renoise = torch.default_generator if pipe_name in ("DiTPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                                                       "QwenImagePipeline") else g
    ref = Student.load(tmp_path / "student").sample(noise, cond, generator=renoise)
    # BOOT's folded time embedding is computed once for a batch of one, not per row: last-bit differences,
    # which its x0 reading at t_max multiplies by sigma / alpha (14 for SD's schedule)
    tol = 1e-4 if sampler == "signal" else 1e-5
    if pipe_name in ("DDPMPipeline", "DiTPipeline"):  # images in [0, 1], channels last
        image = teacher.decode(ref) if pipe_name == "DiTPipeline" else ref
        torch.testing.assert_close(got.float(), (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), rtol=tol, atol=tol)
    else:
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    # a different student gives a different result (the comparison can fail)
    assert not torch.allclose(ref, teacher.denoiser(noise, torch.full((n,), float(timesteps[0])), cond), atol=1e-3)
    card = (out / "README.md").read_text()
    assert f"{len(timesteps)}-step" in card and "DiffusionPipeline.from_pretrained" in card
    assert student.spec.timesteps == json.loads((out / "stepdistill_sampling.json").read_text())["student"]["timesteps"]


def test_few_step_boot_student_and_boot_lora_are_refused(tmp_path, tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["sd"])
    make_student_folder(tmp_path / "student", teacher, "signal", [499, -1])
    with pytest.raises(ExportError, match="a 2-step BOOT student .* no stock diffusers scheduler"):
        export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines["sd"])
    make_student_folder(tmp_path / "one", teacher, "signal", [-1])
    with pytest.raises(ExportError, match="--lora: a BOOT student"):
        export(tmp_path / "one", tmp_path / "pipe", teacher=tiny_pipelines["sd"], lora=True)
    assert not (tmp_path / "pipe").exists()


def test_time_frozen_network_ignores_its_timestep(tiny_pipelines):
    from stepdistill.models.nets import time_frozen_copy

    teacher = load_teacher(tiny_pipelines["sdxl"])  # beside the timestep: SDXL's time-id embedding, kept
    den = teacher.denoiser
    frozen = Denoiser(time_frozen_copy(den.model, -1.0), den.process, den.prediction_type)
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode(["a red cube", "two cats"])[0]
    ref = den.raw(x, torch.full((2,), -1.0), cond)
    for t in (-1.0, 500.0, 999.0):
        torch.testing.assert_close(frozen.raw(x, torch.full((2,), t), cond), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(den.raw(x, torch.full((2,), 999.0), cond), ref, atol=1e-3)


def test_timesteps_no_scheduler_expresses_are_refused(tmp_path, tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["sd"])
    make_student_folder(tmp_path / "s1", teacher, "deterministic", [999, 600])
    with pytest.raises(ExportError, match=r"student timesteps \[999, 600\] are not DDIM's trailing 2-step grid"):
        export(tmp_path / "s1", tmp_path / "p1", teacher=tiny_pipelines["sd"])
    make_student_folder(tmp_path / "s2", teacher, "renoise", [999, 998, 10])
    with pytest.raises(ExportError, match=r"no LCMScheduler schedule equals the student's timesteps \[999, 998, 10\]"):
        export(tmp_path / "s2", tmp_path / "p2", teacher=tiny_pipelines["sd"])


def test_existing_destination_and_unfinished_run(tmp_path, tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["sd"])
    make_student_folder(tmp_path / "student", teacher, "renoise", [999])
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="export destination '.*pipe' already exists"):
        export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines["sd"])
    assert (tmp_path / "pipe" / "mine.txt").read_text() == "keep"
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "manifest.json").write_text("{}")
    (run / "config.yaml").write_text(f"method: dmd2\nteacher: {{path: {tiny_pipelines['sd']}}}\ntrain: {{max_steps: 10}}\n")
    with pytest.raises(ExportError, match=r"run '.*run' is unfinished: no student/ yet \(latest checkpoint: "
                                          r"checkpoint-2, train.max_steps=10\)"):
        export(run, tmp_path / "p3")
    with pytest.raises(ExportError, match="is neither a run folder"):
        export(tmp_path, tmp_path / "p4")


def test_lora_run_exports_fused_and_as_lora_file(tmp_path, tiny_pipelines):
    """A real LoRA training run: the fused export and teacher + load_lora_weights sample the same."""
    from diffusers import DiffusionPipeline

    from stepdistill.config import load_config
    from stepdistill.training import Trainer

    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml",
                      [f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={run}", "student.lora_rank=4",
                       "train.max_steps=2", "train.report_to=none", "train.progress=false", "method_args.lr=1e-2"])
    Trainer(cfg).fit()
    out = export(run, tmp_path / "pipe", lora=True)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    kwargs = sampling_kwargs(out)
    prompts = ["a red cube"]
    fused = DiffusionPipeline.from_pretrained(out)
    size = fused.unet.config.sample_size * fused.vae_scale_factor
    a = fused(prompt=prompts, output_type="latent", height=size, width=size,
              generator=torch.Generator().manual_seed(3), **kwargs).images
    base = DiffusionPipeline.from_pretrained(tiny_pipelines["sd"])
    base.scheduler = type(fused.scheduler).from_config(fused.scheduler.config)
    plain = base(prompt=prompts, output_type="latent", height=size, width=size,
                 generator=torch.Generator().manual_seed(3), **kwargs).images
    base.load_lora_weights(out / "lora")
    b = base(prompt=prompts, output_type="latent", height=size, width=size,
             generator=torch.Generator().manual_seed(3), **kwargs).images
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, a, atol=1e-4)  # the adapters changed the sampler's output


def test_train_export_writes_the_pipeline_at_the_end_and_checks_first(tmp_path, tiny_pipelines):
    """train.export=true: the run ends with <output_dir>/pipeline (the EMA student, since it is kept),
    equal to exporting the run afterwards; a student no scheduler can express fails before training."""
    from diffusers import DiffusionPipeline

    from stepdistill.config import ConfigError, load_config
    from stepdistill.distill import train

    run = tmp_path / "run"
    common = [f"teacher.path={tiny_pipelines['sd']}", "train.max_steps=2", "train.report_to=none", "train.progress=false",
              "train.export=true"]
    cfg = load_config(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml",
                      [*common, f"train.output_dir={run}", "train.ema_decay=0.5", "method_args.lr=1e-2"])
    train(cfg)
    pipe = DiffusionPipeline.from_pretrained(run / "pipeline")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    ema = Student.load(run / "student_ema")
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, ema.model.state_dict()[k])
    assert sampling_kwargs(run / "pipeline")["num_inference_steps"] == 4
    first = (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    train(cfg)  # re-running the finished command exports again, in place
    assert (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("pipeline")) == ["pipeline"]
    bad = load_config(ROOT / "configs" / "tiny-sd" / "phased_dmd_2step.yaml",
                      [*common, f"train.output_dir={tmp_path / 'experts'}", "method_args.experts=true"])
    with pytest.raises(ConfigError, match="train.export: the student is a PhasedExperts"):
        train(bad)
    assert not (tmp_path / "experts" / "checkpoints").exists()
    assert not (tmp_path / "experts" / ".lock").exists()  # the refused run let go of its folder


def test_model_card_carries_the_hub_metadata(tmp_path, tiny_pipelines):
    """base_model (the teacher), license (from the teacher's own card), pipeline_tag, the method."""
    import shutil

    import yaml

    teacher_dir = tmp_path / "teacher"
    shutil.copytree(tiny_pipelines["sd"], teacher_dir)
    (teacher_dir / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [x]\n---\n# a teacher\n")
    teacher = load_teacher(teacher_dir)
    make_student_folder(tmp_path / "student", teacher, "renoise", [999])
    out = export(tmp_path / "student", tmp_path / "pipe", teacher=str(teacher_dir))
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert meta["base_model"] == str(teacher_dir) and meta["license"] == "creativeml-openrail-m"
    assert meta["pipeline_tag"] == "text-to-image" and meta["library_name"] == "diffusers" and "test" in meta["tags"]


def test_lcm_lora_loads_into_the_teacher_and_samples_at_one_to_eight_steps(tmp_path, tiny_pipelines):
    """An LCM-LoRA run's adapters, loaded into the teacher's own pipeline with ``load_lora_weights`` and
    run by the exported stock ``LCMScheduler``, sample at 1, 2, 4 and 8 steps exactly as the toolkit's
    sampler at that step count (``Student.at_steps``) for the same seed."""
    from diffusers import DiffusionPipeline, LCMScheduler

    from stepdistill.config import load_config
    from stepdistill.training import Trainer

    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "tiny-sd" / "lcm_lora_4step.yaml",
                      [f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={run}", "train.max_steps=2",
                       "train.report_to=none", "train.progress=false", "method_args.lr=1e-2"])
    Trainer(cfg).fit()
    out = export(run, tmp_path / "pipe", lora=True)
    teacher = load_teacher(tiny_pipelines["sd"])
    pipe = DiffusionPipeline.from_pretrained(tiny_pipelines["sd"])  # the teacher itself
    plain = dict(pipe.unet.state_dict())
    pipe.load_lora_weights(out / "lora")
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    student = Student.load(run / "student")
    prompts = ["a red cube", "two cats"]
    cond = teacher.encode(prompts)[0]
    size = teacher.sample_shape[-1] * pipe.vae_scale_factor
    for n in (1, 2, 4, 8):
        got = pipe(prompt=prompts, num_inference_steps=n, guidance_scale=1.0, output_type="latent", height=size,
                   width=size, generator=torch.Generator().manual_seed(7)).images
        g = torch.Generator().manual_seed(7)
        noise = torch.randn(2, *teacher.sample_shape, generator=g)
        ref = student.at_steps(n).sample(noise, cond, generator=g)
        # the pipeline runs the adapters unfused (LCM-LoRA's resnet convolutions too), the student fused: rounding
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=5e-5)
        assert pipe.scheduler.timesteps.tolist() == student.at_steps(n).spec.timesteps
    # the adapters change the network (the comparison can fail)
    trained = Student.load(run / "student").model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in plain.items() if k in trained)


def test_w_conditioned_lcm_student_exports_for_any_step_count(tmp_path, tiny_pipelines):
    """A full LCM student (guidance-scale input) in the teacher's stock pipeline: the exported
    LCMScheduler with the student's boundary scalings, at 1 and 4 steps and the trained w."""
    from diffusers import DiffusionPipeline

    from stepdistill.models.student import lcm_timesteps

    teacher = load_teacher(tiny_pipelines["sd"])
    student = make_student_folder(tmp_path / "student", teacher, "renoise", lcm_timesteps(1000, 4, 50), guidance=3.0)
    student.spec.consistency = {"solver_steps": 50, "timestep_scaling": 10.0}
    student.spec.save(tmp_path / "student")
    out = export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines["sd"])
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.scheduler.config.timestep_scaling == 10.0
    prompts = ["a red cube", "two cats"]
    cond = teacher.encode(prompts)[0]
    size = teacher.sample_shape[-1] * pipe.vae_scale_factor
    loaded = Student.load(tmp_path / "student")
    for n in (1, 4):
        got = pipe(prompt=prompts, num_inference_steps=n, guidance_scale=3.0, output_type="latent", height=size,
                   width=size, generator=torch.Generator().manual_seed(7)).images
        g = torch.Generator().manual_seed(7)
        noise = torch.randn(2, *teacher.sample_shape, generator=g)
        torch.testing.assert_close(got.float(), loaded.at_steps(n).sample(noise, cond, generator=g).float(),
                                   rtol=1e-5, atol=1e-5)


def test_smaller_student_exports_as_its_own_config(tmp_path, tiny_pipelines):
    """A half-width student (student.architecture) is a smaller UNet of the teacher's class: the stock
    pipeline runs it and samples as the toolkit does."""
    from diffusers import DiffusionPipeline

    teacher = load_teacher(tiny_pipelines["sd"])
    net = copy_for_training(teacher.denoiser.model, architecture={"block_out_channels": [8, 16]}).eval()
    proc = teacher.denoiser.process
    spec = StudentSpec("test", "renoise", [999.0], None, proc.describe(), teacher.denoiser.prediction_type)
    Student(Denoiser(net, proc, teacher.denoiser.prediction_type), spec).save(tmp_path / "student")
    out = export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines["sd"])
    pipe = DiffusionPipeline.from_pretrained(out)
    assert list(pipe.unet.config.block_out_channels) == [8, 16]
    assert sum(p.numel() for p in pipe.unet.parameters()) < 0.4 * sum(p.numel() for p in teacher.denoiser.model.parameters())
    prompts = ["a red cube", "two cats"]
    size = teacher.sample_shape[-1] * pipe.vae_scale_factor
    got = pipe(prompt=prompts, num_inference_steps=1, guidance_scale=1.0, output_type="latent", height=size, width=size,
               generator=torch.Generator().manual_seed(7)).images
    noise = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(7))
    ref = Student.load(tmp_path / "student").sample(noise, teacher.encode(prompts)[0])
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,architecture,layer_map", [
    ("sd35", {"num_layers": 2}, {"transformer_blocks": [1, 3]}),  # one dual-attention block of the two
    # narrower: Sana's cross_attention_dim is its inner width (the caption projection's), not an input
    ("sana", {"num_attention_heads": 1, "num_cross_attention_heads": 1, "cross_attention_dim": 16, "num_layers": 1},
     None),
])
def test_smaller_sd35_and_sana_students_export(tmp_path, tiny_pipelines, family, architecture, layer_map):
    from diffusers import DiffusionPipeline

    teacher = load_teacher(tiny_pipelines[family])
    net = copy_for_training(teacher.denoiser.model, architecture=architecture, layer_map=layer_map).eval()
    proc = teacher.denoiser.process
    spec = StudentSpec("test", "renoise", _flow([1.0, 0.5]), None, proc.describe(), teacher.denoiser.prediction_type)
    Student(Denoiser(net, proc, teacher.denoiser.prediction_type), spec).save(tmp_path / "student")
    out = export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines[family])
    pipe = DiffusionPipeline.from_pretrained(out)
    assert {k: pipe.transformer.config[k] for k in architecture} == {k: v for k, v in architecture.items()}
    if family == "sd35":
        assert list(pipe.transformer.config.dual_attention_layers) == [0]
    prompts = ["a red cube", "two cats"]
    size = teacher.sample_shape[-1] * pipe.vae_scale_factor
    extra = {"use_resolution_binning": False} if family == "sana" else {}
    torch.manual_seed(5)
    got = pipe(prompt=prompts, output_type="latent", height=size, width=size, generator=torch.Generator().manual_seed(7),
               **sampling_kwargs(out), **extra).images
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, *teacher.sample_shape, generator=g)
    torch.manual_seed(5)
    ref = Student.load(tmp_path / "student").sample(noise, teacher.encode(prompts)[0],
                                                    generator=g if family == "sana" else torch.default_generator)
    torch.testing.assert_close(got.float(), ref, rtol=1e-5, atol=1e-5)
