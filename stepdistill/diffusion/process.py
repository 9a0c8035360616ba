"""Noise processes x_t = alpha_t * x0 + sigma_t * eps, built from diffusers scheduler configs.

One object owns alpha_t, sigma_t, SNR, the conversions between prediction parameterisations and
the deterministic ODE step, so that no other module computes them (k-diffusion's rule).

Time conventions (docs/ARCHITECTURE.md):
- ``VPProcess``: diffusers integer timesteps 0..T-1 (T = ``num_train_timesteps``). Non-integer times
  interpolate log(alphas_cumprod) linearly, so integer times are exact. ``t = -1`` is the clean end
  (alpha = 1, sigma = 0), matching DDIM's ``set_alpha_to_one`` final step.
- ``FlowProcess``: continuous t in [0, 1], alpha = 1 - t, sigma = t (rectified flow / SD3 / Flux / Sana /
  Wan). The network sees ``t * num_train_timesteps`` as diffusers' FlowMatchEulerDiscreteScheduler does;
  the multistep solvers on flow sigmas (``use_flow_sigmas``: Sana's DPMSolverMultistepScheduler, Wan's
  UniPCMultistepScheduler) pass the same value truncated to an integer. A scheduler with
  ``use_dynamic_shifting`` (Flux, Qwen-Image) shifts by a resolution-dependent mu; at the one resolution
  a teacher is distilled at, that is a static shift (``dynamic_shift``).

Prediction types: ``epsilon``, ``sample`` (x0), ``v_prediction`` (v = alpha eps - sigma x0,
Salimans & Ho 2022) and ``flow`` (u = eps - x0, the rectified-flow velocity dx_t/dt).
"""

from __future__ import annotations

from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


def per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient of shape (B,) or () in ``like``'s dtype and device, shaped to broadcast
    against the (B, ...) tensor ``like``."""
    coef = coef.to(device=like.device, dtype=like.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


class NoiseProcess:
    """Shared behaviour; subclasses define ``alpha_sigma`` and the time range."""

    kind: str
    prediction_type: str
    num_train_timesteps: int
    t_max: float
    t_clean: float

    # -- schedule ---------------------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def alpha(self, t) -> torch.Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t) -> torch.Tensor:
        return self.alpha_sigma(t)[1]

    def snr(self, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return a**2 / s**2

    def log_snr(self, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return 2 * (torch.log(a) - torch.log(s))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the network was trained to see."""
        return t

    def _as_time(self, t, device=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        lo, hi = min(self.t_clean, self.t_max), max(self.t_clean, self.t_max)
        if torch.any(t < lo - 1e-6) or torch.any(t > hi + 1e-6):
            raise ValueError(f"time {t.tolist()} is outside the process range [{lo}, {hi}]")
        return t

    # -- forward process --------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return per_sample(a, x0) * x0 + per_sample(s, x0) * eps

    # -- conversions ------------------------------------------------------------------------------
    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t, pred_type: str | None = None):
        """(x0, eps) implied by a prediction of ``pred_type`` at (x_t, t)."""
        pred_type = pred_type or self.prediction_type
        a, s = self.alpha_sigma(t)
        a, s = per_sample(a, x_t), per_sample(s, x_t)
        if pred_type == "epsilon":
            return (x_t - s * pred) / a, pred
        if pred_type == "sample":
            return pred, (x_t - a * pred) / s
        if pred_type == "v_prediction":
            norm = a**2 + s**2
            return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
        if pred_type == "flow":
            x0 = (x_t - s * pred) / (a + s)
            return x0, pred + x0
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of {PREDICTION_TYPES}")

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t, pred_type: str) -> torch.Tensor:
        """Express (x0, eps) as a prediction of ``pred_type``."""
        if pred_type == "epsilon":
            return eps
        if pred_type == "sample":
            return x0
        if pred_type == "v_prediction":
            a, s = self.alpha_sigma(t)
            return per_sample(a, x0) * eps - per_sample(s, x0) * x0
        if pred_type == "flow":
            return eps - x0
        raise ValueError(f"unknown prediction type {pred_type!r}; expected one of {PREDICTION_TYPES}")

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, src: str, dst: str) -> torch.Tensor:
        if src == dst:
            return pred
        x0, eps = self.to_x0_eps(pred, x_t, t, src)
        return self.from_x0_eps(x0, eps, t, dst)

    # -- deterministic ODE step -------------------------------------------------------------------
    def ode_step(self, x_t: torch.Tensor, x0: torch.Tensor, t, s) -> torch.Tensor:
        """One deterministic DDIM step (Song et al. 2021, eq. 12 with eta=0) from t to s given the
        x0 prediction at (x_t, t). Under flow matching this is exactly the Euler step."""
        a_t, s_t = self.alpha_sigma(t)
        a_s, s_s = self.alpha_sigma(s)
        eps = (x_t - per_sample(a_t, x_t) * x0) / per_sample(s_t, x_t)
        return per_sample(a_s, x_t) * x0 + per_sample(s_s, x_t) * eps

    # -- timestep sampling ------------------------------------------------------------------------
    def sample_uniform(self, n: int, lo: float, hi: float, generator=None, device=None) -> torch.Tensor:
        """n times uniform in [lo, hi] (continuous)."""
        self._as_time([lo, hi])
        if lo > hi:
            raise ValueError(f"empty time range [{lo}, {hi}]")
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        return (lo + (hi - lo) * u).to(torch.float32)

    def sample_grid(self, n: int, grid, generator=None, device=None) -> torch.Tensor:
        """n times drawn uniformly from a fixed list of times."""
        grid = torch.as_tensor(grid, dtype=torch.float32)
        idx = torch.randint(len(grid), (n,), generator=generator)
        return grid[idx].to(device)

    def grid(self, n: int) -> torch.Tensor:
        """n sampling times from t_max, descending, in the scheduler's own spacing ("trailing" for
        VP: 999, 749, 499, 249 for n=4). The step after the last one goes to ``t_clean``."""
        raise NotImplementedError

    def sampling_times(self, n: int) -> torch.Tensor:
        """``grid(n)`` followed by ``t_clean``: the n+1 endpoints of an n-step sampler."""
        return torch.cat([self.grid(n), torch.tensor([self.t_clean], dtype=torch.float32)])

    scheduler_config: dict | None = None  # the diffusers scheduler config this process was built from

    def describe(self) -> dict:
        return {"kind": self.kind, "prediction_type": self.prediction_type, "scheduler": self.scheduler_config}


class VPProcess(NoiseProcess):
    """Discrete variance-preserving process from a diffusers scheduler's ``alphas_cumprod``."""

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"VP process: prediction_type {prediction_type!r} is not one of epsilon, sample, v_prediction")
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.num_train_timesteps = len(acp)
        # index 0 holds t = -1, the clean end (alpha = 1)
        self._log_acp = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(acp)])
        self.prediction_type = prediction_type
        self.t_max = float(self.num_train_timesteps - 1)
        self.t_clean = -1.0

    def alpha_sigma(self, t):
        t = self._as_time(t)
        pos = (t + 1).clamp(0, self.num_train_timesteps)
        lo = pos.floor().long().clamp(max=self.num_train_timesteps - 1)
        frac = pos - lo
        table = self._log_acp.to(t.device)
        log_acp = table[lo] * (1 - frac) + table[(lo + 1).clamp(max=self.num_train_timesteps)] * frac
        acp = torch.exp(log_acp)
        return acp.sqrt().float(), (1 - acp).clamp(min=0).sqrt().float()

    def grid(self, n: int) -> torch.Tensor:
        T = self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"number of steps must be in [1, {T}], got {n}")
        # diffusers "trailing" spacing (Lin et al. 2024, Table 2)
        return (torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)) - 1).float()

    def describe(self):
        return {**super().describe(), "num_train_timesteps": self.num_train_timesteps}


class FlowProcess(NoiseProcess):
    """Rectified-flow / flow-matching process: alpha = 1 - t, sigma = t, t in [0, 1]."""

    kind = "flow"

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000, prediction_type: str = "flow",
                 shift_terminal: float | None = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"flow process: unknown prediction_type {prediction_type!r}")
        if shift <= 0:
            raise ValueError(f"flow process: shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.prediction_type = prediction_type
        self.t_max = 1.0
        self.t_clean = 0.0
        self.shift_terminal = shift_terminal  # the last of a grid's times, stretched to it (Qwen-Image: 0.02)
        self.dynamic_shift: dict | None = None  # {"image_seq_len", "mu"} the shift was resolved from
        self.scheduler_config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": self.shift,
                                 "num_train_timesteps": self.num_train_timesteps}

    def alpha_sigma(self, t):
        t = self._as_time(t).float()
        return 1 - t, t

    def model_time(self, t):
        return t * self.num_train_timesteps

    def shift_time(self, t: torch.Tensor) -> torch.Tensor:
        """SD3's time shift, applied to sampling grids (not to the marginals)."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def grid(self, n: int) -> torch.Tensor:
        if n < 1:
            raise ValueError(f"number of steps must be >= 1, got {n}")
        t = self.shift_time(torch.linspace(1, 0, n + 1, dtype=torch.float64)[:n])
        if self.shift_terminal and n > 1:  # the scheduler's stretch_shift_to_terminal (for one step it is 0 / 0)
            one_minus = 1 - t
            t = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return t.float()

    def describe(self):
        out = {**super().describe(), "shift": self.shift, "num_train_timesteps": self.num_train_timesteps}
        return {**out, **self.dynamic_shift} if self.dynamic_shift else out


def dynamic_shift(config: dict, image_seq_len: int) -> tuple[float, float]:
    """(mu, static shift) of a ``use_dynamic_shifting`` scheduler config for images of ``image_seq_len``
    packed tokens: mu from the pipelines' own ``calculate_shift`` with the config's base / max shift and
    sequence lengths (the defaults FluxPipeline and QwenImagePipeline read them with), and the shift that
    ``time_shift(mu, 1, t)`` equals: exp(mu) for the exponential type, mu for the linear one."""
    import math

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # QwenImagePipeline's is a copy of it

    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    kind = config.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise ValueError(f"scheduler time_shift_type {kind!r} is not exponential or linear")
    return float(mu), (math.exp(mu) if kind == "exponential" else float(mu))


def process_from_scheduler_config(config: Any, image_seq_len: int | None = None) -> NoiseProcess:
    """Build the process of a diffusers scheduler from the scheduler itself or its config dict
    (``scheduler_config.json``, with ``_class_name``). VP schedules come from the scheduler class,
    so every beta schedule diffusers knows (linear, scaled_linear, squaredcos_cap_v2, zero-SNR
    rescaling) is computed by diffusers, not re-implemented here.

    A flow scheduler with ``use_dynamic_shifting`` needs ``image_seq_len`` (the packed tokens of the
    teacher's sample size): its shift there is made static (:func:`dynamic_shift`) and the process's
    scheduler config records it (``use_dynamic_shifting: false``, that ``shift``), so that a student
    reloads, and exports, with the same schedule."""
    import diffusers

    if hasattr(config, "config") and hasattr(config, "step"):  # a scheduler instance
        cls, config = type(config), dict(config.config)
    else:
        config = dict(config)
        cls_name = config.get("_class_name")
        if cls_name is None:
            raise ValueError("scheduler config has no '_class_name'; pass the scheduler or its scheduler_config.json")
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise ValueError(f"scheduler class {cls_name!r} is not in diffusers")
    if "FlowMatch" in cls.__name__:
        resolved = None
        if config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ValueError(
                    f"{cls.__name__} with use_dynamic_shifting=True: the shift depends on the image size; give the "
                    "image's sequence length (the teacher's sample size) or set a static 'shift' in the scheduler config"
                )
            mu, shift = dynamic_shift(config, int(image_seq_len))
            config = {**config, "use_dynamic_shifting": False, "shift": shift}
            resolved = {"image_seq_len": int(image_seq_len), "mu": mu}
        proc = FlowProcess(shift=config.get("shift", 1.0), num_train_timesteps=config.get("num_train_timesteps", 1000),
                           shift_terminal=config.get("shift_terminal"))
        proc.dynamic_shift = resolved
    elif config.get("use_flow_sigmas"):
        proc = _flow_sigmas_process(cls.__name__, config)
    else:
        scheduler = cls.from_config(config)
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"scheduler {cls.__name__} exposes no alphas_cumprod; it is not a discrete VP scheduler")
        proc = VPProcess(scheduler.alphas_cumprod, prediction_type=config.get("prediction_type", "epsilon"))
    proc.scheduler_config = {k: v for k, v in {**config, "_class_name": cls.__name__}.items()
                             if not k.startswith("_") or k == "_class_name"}
    return proc


def is_flow_scheduler(class_name: str, config) -> bool:
    """Whether a diffusers scheduler samples a flow-matching process: the FlowMatch* classes, and the
    multistep solvers run on flow sigmas (``use_flow_sigmas``: Sana's DPMSolver, Wan's UniPC)."""
    return "FlowMatch" in class_name or bool(dict(config).get("use_flow_sigmas"))


# what a multistep solver on flow sigmas computes x0 from (diffusers' ``convert_model_output``: x0 = x - t u,
# (x - t eps) / (1 - t), or the output itself); its v_prediction reads x0 = alpha x - sigma v, which is not
# this toolkit's v (alpha eps - sigma x0) once alpha^2 + sigma^2 != 1
FLOW_SIGMAS_PREDICTIONS = {"flow_prediction": "flow", "epsilon": "epsilon", "sample": "sample"}


def _flow_sigmas_process(name: str, config: dict) -> "FlowProcess":
    """The flow process of a multistep solver with ``use_flow_sigmas``: sigma_t = t, alpha_t = 1 - t, its
    sampling sigmas shifted by ``flow_shift`` as SD3's are by ``shift``. The network sees t *
    num_train_timesteps, continuous, as the FlowMatch schedulers pass it (and export uses them); the solver
    itself casts that product to an integer timestep, under one unit lower, beside its exact sigma."""
    if config.get("use_dynamic_shifting"):
        raise ValueError(f"{name} with use_dynamic_shifting=True: the shift depends on the image size; set a static "
                         f"'flow_shift' in the scheduler config to distill it")
    pred = config.get("prediction_type", "epsilon")
    if pred not in FLOW_SIGMAS_PREDICTIONS:
        raise ValueError(f"{name} on flow sigmas with prediction_type {pred!r}: its x0 reading has no counterpart here; "
                         f"supported: {sorted(FLOW_SIGMAS_PREDICTIONS)}")
    spacing = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config.get(k)]
    if spacing:
        raise ValueError(f"{name} on flow sigmas with {spacing[0]}=True: its sigmas are not the shifted linear flow "
                         f"times this toolkit samples; set it to false to distill it")
    return FlowProcess(shift=config.get("flow_shift", 1.0), num_train_timesteps=config.get("num_train_timesteps", 1000),
                       prediction_type=FLOW_SIGMAS_PREDICTIONS[pred], shift_terminal=config.get("shift_terminal"))


def truncated_snr_weight(process: NoiseProcess, t) -> torch.Tensor:
    """max(SNR_t, 1): the 'truncated SNR' weighting of Salimans & Ho (2022), sec. 4 / eq. 9,
    for an x0-space loss."""
    return torch.clamp(process.snr(t), min=1.0)


__all__ = [
    "PREDICTION_TYPES",
    "NoiseProcess",
    "VPProcess",
    "FlowProcess",
    "process_from_scheduler_config",
    "is_flow_scheduler",
    "dynamic_shift",
    "truncated_snr_weight",
    "per_sample",
]
