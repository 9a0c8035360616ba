"""What the video tests share (Wan, HunyuanVideo): an exported pipeline's latents beside the toolkit's
student samples for the same seed."""

import torch

VIDEO = (5, 16, 16)  # frames, height, width of the tiny video configs (configs/tiny-wan, configs/tiny-hunyuanvideo)
PROMPTS = ["a red cube", "two cats"]


def sample_both(folder, student_dir, teacher, kwargs, prompts=PROMPTS):
    """(pipeline, the exported pipeline's latents, ``Student.sample``'s) for the same initial noise (the
    first draw of a seeded generator) and the same re-noising stream (torch's global generator, which the
    pipeline's stochastic scheduler draws from)."""
    from diffusers import DiffusionPipeline

    from stepdistill.models.student import Student

    pipe = DiffusionPipeline.from_pretrained(folder)  # no stepdistill from here
    assert type(pipe).__name__ == type(teacher.pipeline).__name__
    size = dict(zip(("num_frames", "height", "width"), VIDEO))
    torch.manual_seed(123)
    got = pipe(prompt=prompts, output_type="latent", generator=torch.Generator().manual_seed(7), **{**size, **kwargs}).frames
    noise = torch.randn(len(prompts), *teacher.sample_shape, generator=torch.Generator().manual_seed(7))
    student = Student.load(student_dir)  # (building a network draws from the global generator: before the seed)
    cond = teacher.encode(prompts)[0]
    torch.manual_seed(123)
    return pipe, got, student.sample(noise, cond, generator=torch.default_generator)
