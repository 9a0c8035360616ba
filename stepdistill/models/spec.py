"""A student's saved schedule (``student_config.json``): how it samples (method, sampler, timesteps,
guidance, the process it was trained under, its prediction type), checked field by field on load."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..diffusion.process import PREDICTION_TYPES, is_flow_scheduler
from ..errors import InputError

SAMPLERS = ("deterministic", "renoise", "signal")
SPEC_FILE = "student_config.json"


@dataclass
class StudentSpec:
    method: str
    sampler: str
    timesteps: list[float]
    guidance_scale: float | None = None  # the w fed to a w-conditioned student (diffusers convention)
    process: dict = field(default_factory=dict)  # kind, scheduler config (rebuilds the process)
    prediction_type: str | None = None  # what the network outputs (may differ from the scheduler's)
    # a consistency student's sampling: {"solver_steps": N, "timestep_scaling": s or None} (LCM's skipping-step
    # grid and boundary scalings; ``None`` scaling: c_skip = 0, c_out = 1, the flow case)
    consistency: dict | None = None
    # the latent shape sampled at, (C, H, W) or a video's (C, F, H, W): what a pipeline of any size (Flux,
    # Qwen-Image, Wan) is told to sample at on export (absent in folders written before it was recorded)
    sample_shape: list[int] | None = None

    def __post_init__(self):
        """Every field checked, so that a hand-edited or damaged file fails here, naming the field,
        instead of exporting a broken scheduler or sampling wrongly."""
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method {self.method!r} is not a method name")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {SAMPLERS}")
        if not isinstance(self.timesteps, list) or not self.timesteps or not all(map(_finite, self.timesteps)):
            raise ValueError(f"timesteps must be a non-empty list of finite numbers, got {self.timesteps!r}")
        if any(b >= a for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"student timesteps must be strictly descending, got {self.timesteps}")
        if self.guidance_scale is not None and not _finite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number or null, got {self.guidance_scale!r}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        _check_process(self.process)
        if self.sample_shape is not None and (not isinstance(self.sample_shape, list) or not 1 <= len(self.sample_shape) <= 4
                                              or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                         for v in self.sample_shape)):
            raise ValueError(f"sample_shape must be a list of 1 to 4 positive integers or null, got {self.sample_shape!r}")
        if self.consistency is not None:
            steps, scaling = (self.consistency.get(k) if isinstance(self.consistency, dict) else None
                              for k in ("solver_steps", "timestep_scaling"))
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1 or \
                    (scaling is not None and not _finite(scaling)):
                raise ValueError(f"consistency must hold solver_steps (an integer >= 1) and timestep_scaling (a "
                                 f"number or null), got {self.consistency!r}")

    @property
    def t_init(self) -> float:
        return self.timesteps[0]

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def parse(cls, data, where: str | Path) -> "StudentSpec":
        """The spec a ``student_config.json`` holds (``data``, its parsed JSON), checked whole; a malformed
        file or a bad field is one InputError naming ``where`` and the field."""
        try:
            if not isinstance(data, dict):
                raise TypeError(f"it holds a {type(data).__name__}, not a mapping")
            spec = cls(**data)
            _check_process(spec.process, need_scheduler=True)
            return spec
        except (TypeError, ValueError) as exc:
            raise InputError(f"'{where}' is not a student config ({exc})") from None

    @classmethod
    def load(cls, folder: str | Path) -> "StudentSpec":
        path = Path(folder) / SPEC_FILE
        if not path.is_file():
            raise FileNotFoundError(f"'{folder}' has no {SPEC_FILE}: not a stepdistill student folder")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"'{path}' cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        return cls.parse(data, path)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_process(process, need_scheduler: bool = False) -> None:
    """A student's process: its kind (vp or flow), agreeing with its diffusers scheduler class (which a
    saved student needs, to rebuild the process)."""
    if not isinstance(process, dict) or process.get("kind") not in ("vp", "flow"):
        kind = process.get("kind") if isinstance(process, dict) else process
        raise ValueError(f"process.kind must be 'vp' or 'flow', got {kind!r}")
    scheduler = process.get("scheduler")
    name = scheduler.get("_class_name") if isinstance(scheduler, dict) else None
    if scheduler is None and not need_scheduler:  # a process built in memory from a schedule alone
        return
    if not isinstance(name, str):
        raise ValueError("process.scheduler must be a diffusers scheduler config with its _class_name")
    if is_flow_scheduler(name, scheduler) != (process["kind"] == "flow"):
        raise ValueError(f"process.kind {process['kind']!r} does not match its scheduler {name}")
    pred = process.get("prediction_type")
    if pred is not None and pred not in PREDICTION_TYPES:
        raise ValueError(f"process.prediction_type {pred!r} is not one of {PREDICTION_TYPES}")
