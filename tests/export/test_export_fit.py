"""What an export must carry over or refuse so that the stock pipeline samples as the student: the size
it was trained at, a head the stock schedulers read, one network per LoRA file, the scheduler class in the
card's LoRA recipe, and the embedded guidance of a network made of experts."""

import json

import pytest
import torch
from test_export import make_student_folder

from stepdistill.diffusion.denoiser import Denoiser
from stepdistill.diffusion.packed import guidance_embedded, is_packed, latent_channels
from stepdistill.diffusion.process import FlowProcess
from stepdistill.errors import ExportError
from stepdistill.export import export, sampling_kwargs
from stepdistill.export.card import model_card
from stepdistill.export.schedulers import scheduler_for
from stepdistill.models.nets import PhasedExperts, expert_at
from stepdistill.models.student import StudentSpec, copy_for_training
from stepdistill.models.teachers import load_teacher

VIDEO = (5, 16, 16)


@pytest.mark.parametrize("head", ["sample", "epsilon", "v_prediction"])
def test_a_flow_student_with_another_head_is_refused(head):
    """The stock flow schedulers read the output as the velocity: an x0, epsilon or v head would sample wrong."""
    spec = StudentSpec("progressive", "deterministic", [1.0, 0.5], None, FlowProcess(shift=3.0).describe(), head)
    with pytest.raises(ExportError, match=f"predicts '{head}' on a flow process.*read the network's output as the "
                                          f"velocity"):
        scheduler_for(spec, {"shift": 3.0}, head, "StableDiffusion3Pipeline")
    flow = StudentSpec("progressive", "deterministic", [1.0, 0.5], None, FlowProcess(shift=3.0).describe(), "flow")
    sched, kwargs = scheduler_for(flow, {"shift": 3.0}, "flow", "StableDiffusion3Pipeline")
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler" and kwargs["num_inference_steps"] == 2


@pytest.mark.parametrize("side", [4, 6])
def test_a_flux_student_exports_at_the_size_it_was_trained_at(tmp_path, tiny_pipelines, side):
    """The size comes from the student's recorded latent shape, also when the scheduler has a static shift
    (FLUX.1-schnell's layout: no resolution-dependent mu to read the size back from)."""
    teacher = load_teacher(tiny_pipelines["flux"], sample_size=side)
    make_student_folder(tmp_path / "student", teacher, "deterministic", [1.0])
    spec_file = tmp_path / "student" / "student_config.json"
    spec = json.loads(spec_file.read_text())
    assert spec["sample_shape"] == [16, side, side]
    spec["process"].pop("image_seq_len", None)  # as a static-shift scheduler leaves it
    spec_file.write_text(json.dumps(spec))
    kwargs = sampling_kwargs(export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines["flux"]))
    assert (kwargs["height"], kwargs["width"]) == (2 * side, 2 * side)  # the tiny VAE halves each side


def test_a_lora_export_of_a_two_expert_teacher_is_refused(tmp_path, tiny_pipelines):
    """A LoRA file loads into one network; the Wan2.2 pipeline would still run its unadapted second expert."""
    teacher = load_teacher(tiny_pipelines["wan22"], video_size=VIDEO)
    teacher.denoiser.model = expert_at(teacher.denoiser.model, 1.0, teacher.process)
    make_student_folder(tmp_path / "student", teacher, "renoise", [1.0])
    with pytest.raises(ExportError, match=r"^--lora: .* has two experts \(transformer and transformer_2\)"):
        export(tmp_path / "student", tmp_path / "pipe", teacher=tiny_pipelines["wan22"], lora=True)
    assert not (tmp_path / "pipe").exists()


@pytest.mark.parametrize("scheduler", ["FlowMatchEulerDiscreteScheduler", "LCMScheduler"])
def test_the_cards_lora_recipe_loads_the_exported_scheduler_class(scheduler):
    spec = StudentSpec("dmd2", "renoise", [1.0], None, FlowProcess().describe(), "flow")
    card = model_card("SanaPipeline", spec, {"num_inference_steps": 1}, "some/teacher", True, None,
                      scheduler=scheduler)
    assert f"from diffusers import {scheduler}" in card
    assert f"pipe.scheduler = {scheduler}.from_pretrained(\"<this folder>\", subfolder=\"scheduler\")" in card


def test_a_network_of_flux_experts_is_packed_and_takes_the_guidance(tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["flux"], sample_size=8)
    net = teacher.denoiser.model
    experts = PhasedExperts.from_experts([copy_for_training(net), copy_for_training(net)], [1.0, 0.5])
    assert is_packed(experts) and guidance_embedded(experts) and latent_channels(experts) == latent_channels(net)
    assert guidance_embedded(net)
    sd = load_teacher(tiny_pipelines["sd"]).denoiser.model
    assert not is_packed(PhasedExperts.from_experts([copy_for_training(sd)], [1.0]))
    with torch.no_grad():  # the experts' Denoiser reads the embedded guidance: a call needs no explicit one
        x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
        cond = teacher.encode(["a", "b"])[0]
        t = torch.tensor([1.0, 0.5])
        out = Denoiser(experts, teacher.process, embedded_guidance=teacher.denoiser.embedded_guidance)(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
