"""The stock diffusers scheduler that samples exactly as a student was trained (``scheduler_for``),
and the check that a student's network has a stock pipeline slot (``check_student_network``)."""

from __future__ import annotations

import dataclasses

from ..errors import ExportError
from ..models.student import StudentSpec

UNCONDITIONAL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")  # pipelines without a text or class input

def _int_times(spec: StudentSpec) -> list[int]:
    ts = [int(round(t)) for t in spec.timesteps]
    if any(abs(a - b) > 1e-6 for a, b in zip(ts, spec.timesteps)):
        raise ExportError(f"student timesteps {spec.timesteps} are not integers; a discrete diffusers scheduler "
                          f"cannot run them")
    return ts


def _vp_common(base: dict, pred: str) -> dict:
    return {**base, "prediction_type": pred, "clip_sample": False, "thresholding": False, "set_alpha_to_one": True}


def _lcm_for(base: dict, pred: str, times: list[int]):
    """An LCMScheduler whose default schedule for len(times) steps is exactly ``times``."""
    from diffusers import LCMScheduler

    n, total = len(times), int(base.get("num_train_timesteps", 1000))
    cfg = {**_vp_common(base, pred), "timestep_scaling": 1.0e7, "timestep_spacing": "leading", "steps_offset": 0}
    probe = LCMScheduler.from_config(cfg)
    for k in range(n, total + 1):
        try:
            probe.set_timesteps(n, original_inference_steps=k)
        except ValueError:
            continue
        if probe.timesteps.tolist() == times:
            return LCMScheduler.from_config({**cfg, "original_inference_steps": k})
    raise ExportError(f"no LCMScheduler schedule equals the student's timesteps {times}; re-noising students "
                      f"export with LCM-style spacings such as [999, 749, 499, 249]")


def scheduler_for(spec: StudentSpec, base_config: dict, pred_type: str):
    """(scheduler, call kwargs) that make a diffusers pipeline sample exactly as ``spec`` says."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

    base = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    n = len(spec.timesteps)
    kind = spec.process.get("kind")
    if spec.sampler == "signal":
        if n != 1:
            raise ExportError(f"a {n}-step BOOT student (sampler 'signal') reads the initial noise at every step; no "
                              f"stock diffusers scheduler does that. Sample it with stepdistill.models.student.Student")
        # one step at t_max, where the (time-frozen) network's output is read as the x0 prediction
        t_max = 1.0 if kind == "flow" else float(int(base.get("num_train_timesteps", 1000)) - 1)
        spec = dataclasses.replace(spec, sampler="deterministic", timesteps=[t_max])
    if kind == "flow":
        shift = float(spec.process.get("shift", base.get("shift", 1.0)))
        # the pipeline shifts the sigmas it is given, so it gets the unshifted ones
        sigmas = [t / (shift - (shift - 1) * t) for t in spec.timesteps]
        cfg = {"num_train_timesteps": int(spec.process.get("num_train_timesteps", 1000)), "shift": shift,
               "use_dynamic_shifting": False}
        cls = FlowMatchLCMScheduler if (spec.sampler == "renoise" and n > 1) else FlowMatchEulerDiscreteScheduler
        return cls.from_config(cfg), {"num_inference_steps": n, "sigmas": sigmas}
    if kind != "vp":
        raise ExportError(f"student process kind {kind!r} has no diffusers scheduler mapping")
    times = _int_times(spec)
    total = int(base.get("num_train_timesteps", 1000))
    if spec.consistency is not None:  # LCM: the stock LCMScheduler of its solver grid and boundary scalings
        from diffusers import LCMScheduler

        sched = LCMScheduler.from_config({**_vp_common(base, pred_type), "steps_offset": 0,
                                          "original_inference_steps": int(spec.consistency["solver_steps"]),
                                          "timestep_scaling": float(spec.consistency["timestep_scaling"])})
    elif n == 1:  # one step: x0 at t_init, whatever the sampler
        cfg = {**_vp_common(base, pred_type), "timestep_spacing": "trailing"}
        if times[0] != total - 1:
            # trailing spacing starts at num_train_timesteps - 1, so the schedule is cut after t_init: the same
            # betas (hence alphas_cumprod) up to t_init, and DDIM's one step lands on x0 (set_alpha_to_one)
            full = DDIMScheduler.from_config(cfg)
            if cfg.get("rescale_betas_zero_snr"):
                raise ExportError(f"one-step students at t_init={times[0]} < {total - 1} on a zero-terminal-SNR "
                                  f"schedule have no stock scheduler mapping")
            cfg.update(num_train_timesteps=times[0] + 1, trained_betas=full.betas[: times[0] + 1].tolist())
        sched = DDIMScheduler.from_config(cfg)
    elif spec.sampler == "renoise":
        sched = _lcm_for(base, pred_type, times)
    else:
        sched = DDIMScheduler.from_config({**_vp_common(base, pred_type), "timestep_spacing": "trailing", "steps_offset": 0})
        sched.set_timesteps(n)
        if sched.timesteps.tolist() != times or total % n:
            raise ExportError(f"student timesteps {times} are not DDIM's trailing {n}-step grid "
                              f"{sched.timesteps.tolist()} with steps of {total}/{n}; deterministic students export "
                              f"with that grid")
    probe = type(sched).from_config(sched.config)
    probe.set_timesteps(n)
    assert probe.timesteps.tolist() == times, (probe.timesteps.tolist(), times)
    return sched, {"num_inference_steps": n}


NON_DIFFUSERS_STUDENTS = {
    "PhasedExperts": "one expert network per step (Phased DMD with method_args.experts=true), which no stock "
                     "diffusers pipeline switches between; train with method_args.experts=false for one exportable "
                     "network",
}


def check_student_network(name: str) -> None:
    """The student network (its class name) must be a diffusers class. The guidance-conditioned
    transformers of ``stepdistill.models.nets`` (guided distillation of DiT / PixArt / SD3) have no stock
    pipeline that feeds them the guidance scale, and Phased DMD's per-phase experts none that routes
    steps to experts."""
    import diffusers

    if not hasattr(diffusers, name):
        why = NON_DIFFUSERS_STUDENTS.get(name, "a guidance-conditioned network that no stock diffusers pipeline feeds "
                                               "the guidance scale")
        raise ExportError(f"the student is a {name} of stepdistill: {why}. Sample it with stepdistill.models.student.Student")
