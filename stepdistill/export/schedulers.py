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


def flow_match_grid(n: int, shift: float, terminal: float | None = None, num_train_timesteps: int = 1000) -> list[float]:
    """The n sigmas a ``FlowMatchEulerDiscreteScheduler`` samples by itself (``set_timesteps(n)`` without
    sigmas): linear times from 1, shifted, and with ``terminal`` stretched to end there (float32 values)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift,
                                            shift_terminal=terminal if n > 1 else None)
    sched.set_timesteps(n)
    return sched.sigmas[:n].tolist()


def _flow_without_sigmas(spec: StudentSpec, shift: float, total: int, pipeline: str):
    """A pipeline whose ``__call__`` takes no sigmas (WanPipeline) runs its scheduler's own n-step grid, so
    the student's timesteps must be a grid a stock scheduler makes by itself: FlowMatchEulerDiscreteScheduler's
    with the teacher's shift, optionally stretched to end at the student's last time (``shift_terminal``);
    re-noising students sample it with ``stochastic_sampling`` (x0, then fresh noise at the next sigma)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    n, times = len(spec.timesteps), spec.timesteps
    for terminal in ([None] if n == 1 else [None, times[-1]]):
        grid = flow_match_grid(n, shift, terminal, total)
        if max(abs(a - b) for a, b in zip(grid, times)) <= 1e-6:
            cfg = {"num_train_timesteps": total, "shift": shift, "use_dynamic_shifting": False,
                   "shift_terminal": terminal, "stochastic_sampling": spec.sampler == "renoise" and n > 1}
            return FlowMatchEulerDiscreteScheduler.from_config(cfg), {"num_inference_steps": n}
    hint = flow_match_grid(n, shift, None if n == 1 else float(shift * (1 / n) / (1 + (shift - 1) / n)), total)
    raise ExportError(f"{pipeline} passes no sigmas to its scheduler, so it runs the scheduler's own {n}-step grid; "
                      f"student timesteps [{', '.join(f'{t:.6g}' for t in times)}] are none a stock scheduler makes (FlowMatchEulerDiscreteScheduler, "
                      f"shift {shift:g}, ending at t_{n - 1} or not); train with student.timesteps={hint}")


def scheduler_for(spec: StudentSpec, base_config: dict, pred_type: str, pipeline: str | None = None,
                  takes_sigmas: bool = True):
    """(scheduler, call kwargs) that make a diffusers pipeline (class name ``pipeline``) sample exactly as
    ``spec`` says; ``takes_sigmas``: whether its ``__call__`` takes a ``sigmas`` argument."""
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
        if pred_type != "flow":  # every stock flow scheduler reads the network's output as the velocity
            raise ExportError(f"the student predicts {pred_type!r} on a flow process, but the stock flow schedulers "
                              f"(FlowMatchEuler, FlowMatchLCM) read the network's output as the velocity "
                              f"(prediction 'flow'); train it to predict 'flow' to export it")
        shift = float(spec.process.get("shift", base.get("shift", 1.0)))
        if not takes_sigmas:
            return _flow_without_sigmas(spec, shift, int(spec.process.get("num_train_timesteps", 1000)), pipeline)
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
                     "diffusers pipeline switches between, except a 2-step student in a pipeline with a second expert "
                     "slot (WanPipeline's transformer_2); train with method_args.experts=false for one exportable "
                     "network",
}


def second_expert_slot(pipeline_class: type) -> bool:
    """Whether a pipeline class runs a second network below a boundary time (WanPipeline's ``transformer_2``
    at ``boundary_ratio``)."""
    import inspect

    return {"transformer_2", "boundary_ratio"} <= set(inspect.signature(pipeline_class.__init__).parameters)


def check_student_network(name: str, config: dict | None = None, two_slots: bool = False) -> None:
    """The student network (its class name, its ``config``) must be a diffusers class. The
    guidance-conditioned transformers of ``stepdistill.models.nets`` (guided distillation of DiT / PixArt /
    SD3) have no stock pipeline that feeds them the guidance scale, and Phased DMD's per-phase experts none
    that routes steps to experts, unless there are two and the pipeline has a second expert slot
    (``two_slots``)."""
    import diffusers

    if name == "PhasedExperts" and two_slots and len((config or {}).get("boundaries", ())) == 2:
        return
    if not hasattr(diffusers, name):
        why = NON_DIFFUSERS_STUDENTS.get(name, "a guidance-conditioned network that no stock diffusers pipeline feeds "
                                               "the guidance scale")
        raise ExportError(f"the student is a {name} of stepdistill: {why}. Sample it with stepdistill.models.student.Student")
