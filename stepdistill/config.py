"""Typed, validated run configs: YAML -> dataclasses, ``key=value`` overrides, one clear error.

Every key is checked against the dataclass fields (an unknown key is an error naming its dotted path
and the closest known key), values are coerced to the field types, and each dataclass validates
itself in ``__post_init__`` (litgpt / torchtune style). Method-specific options live under
``method_args`` and are validated by the method's own ``Options`` dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


# ------------------------------------------------------------------------------------------------
# generic dict -> dataclass
# ------------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


class OverrideText(str):
    """The text of a command-line ``key=value`` override, read by the type of the field it sets: a
    string field takes the text as given (``train.mixed_precision=no`` stays ``"no"``, not YAML 1.1's
    False), any other field its YAML value."""

    @property
    def yaml_value(self) -> Any:
        return yaml.safe_load(str(self)) if str(self) != "" else None

    def value_for(self, tp, key: str) -> Any:
        """The value this text gives a field of type ``tp``: a text field takes the YAML string when the
        text is one (quotes removed) and the text as written when YAML would read it as something else
        (``no``, ``1e-3``, ``@x``); empty or null text is None; other fields take the YAML value."""
        text = str(self)
        try:
            parsed = self.yaml_value
        except yaml.YAMLError as exc:
            if _is_text_type(tp) and text.strip():
                return text
            raise ConfigError(f"{key}: {text!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if parsed is None:
            return None
        if isinstance(parsed, list) and _takes_text_list(tp):
            return yaml.load(text, Loader=yaml.BaseLoader)  # a list of texts: every item as written
        if _is_text_type(tp) and not isinstance(parsed, (list, dict)):
            return parsed if isinstance(parsed, str) else text
        return parsed


def _is_text_type(tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str:
        return True
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_is_text_type(a) for a in args if a is not type(None))
    return False


def _takes_text_list(tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return bool(args) and _is_text_type(args[0])
    if origin in (typing.Union, types.UnionType):
        return any(_takes_text_list(a) for a in args)
    return False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:  # untyped here (method_args): the method's Options read the override's text later
        return value
    if isinstance(value, OverrideText):
        value = value.value_for(tp, key)
        if value is None and type(None) in args:
            return None
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not any of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys by dotted name."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config key '{prefix + '.' if prefix else ''}{key}'{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(obj) -> Any:
    if isinstance(obj, OverrideText):  # an override no dataclass typed (inside method_args): its YAML value
        try:
            return obj.yaml_value
        except yaml.YAMLError:
            return str(obj)
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _fail(key: str, msg: str):
    raise ConfigError(f"{key}: {msg}")


def check_range(key: str, value, *, gt=None, ge=None, lt=None, le=None) -> None:
    """One line naming ``key`` when ``value`` (if not None) is outside the given bounds."""
    if value is None:
        return
    for ok, rule in ((gt is None or value > gt, f"> {gt}"), (ge is None or value >= ge, f">= {ge}"),
                     (lt is None or value < lt, f"< {lt}"), (le is None or value <= le, f"<= {le}")):
        if not ok:
            _fail(key, f"must be {rule}, got {value!r}")


PRECISIONS = ("fp32", "bf16", "fp16")  # the names configs and command lines use for weight dtypes


def torch_dtype(name: str | None):
    """The torch dtype of a precision name in ``PRECISIONS`` (None stays None)."""
    if name is None:
        return None
    import torch

    if name not in PRECISIONS:
        raise ConfigError(f"precision {name!r} is not one of {list(PRECISIONS)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ------------------------------------------------------------------------------------------------
# the run config
# ------------------------------------------------------------------------------------------------
@dataclass
class OracleConfig:
    """The exact Gaussian-mixture teacher (tests, benchmarks)."""

    layout: typing.Literal["ring", "grid", "scattered"] = "ring"  # GaussianMixture.<layout>
    components: int = 8
    dim: int = 2
    radius: float = 3.0  # ring, scattered: distance of the modes from the origin; grid: their spacing
    std: float = 0.15
    process: typing.Literal["vp", "flow"] = "vp"
    beta_schedule: str = "scaled_linear"  # VP only
    shift: float = 1.0  # flow only
    conditional: bool = False  # batches carry component labels (CFG-able)
    network_steps: int = 3000  # steps of the regression that makes the MLP teacher copy
    hidden: int = 256
    depth: int = 3

    def __post_init__(self):
        if self.components < 1 or self.dim < 2:
            _fail("teacher.oracle", "needs components >= 1 and dim >= 2")
        check_range("teacher.oracle.radius", self.radius, ge=0)
        check_range("teacher.oracle.std", self.std, gt=0)
        check_range("teacher.oracle.shift", self.shift, gt=0)
        for key in ("network_steps", "hidden", "depth"):
            check_range(f"teacher.oracle.{key}", getattr(self, key), ge=1)


@dataclass
class TeacherConfig:
    path: str | None = None  # diffusers pipeline folder or hub id
    oracle: OracleConfig | None = None
    dtype: typing.Literal["fp32", "bf16", "fp16"] = "fp32"  # precision the frozen teacher is held in
    null_label: int | None = None  # class index of the CFG null branch (class-conditional UNets)
    allow_remote_code: bool = False

    def __post_init__(self):
        if (self.path is None) == (self.oracle is None):
            _fail("teacher", "give exactly one of teacher.path (a diffusers pipeline) or teacher.oracle")


@dataclass
class StudentConfig:
    num_steps: int = 1  # sampling steps of the student
    timesteps: list[float] | None = None  # explicit descending list (first = t_init); default: the process grid
    lora_rank: int = 0  # 0: full fine-tune of a teacher copy; > 0: LoRA (peft) on the copy
    lora_alpha: float | None = None  # default: lora_rank
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # a smaller student of the teacher's class: changes to its config (e.g. {block_out_channels: [16, 32, 32]},
    # {num_layers: 14}); weights start from the teacher's, cut to the new shapes (generator.smaller_copy)
    architecture: dict[str, Any] | None = None
    # with architecture: per layer list (a ModuleList's name, e.g. transformer_blocks), the teacher layer each
    # student layer starts from (default: the first ones)
    layer_map: dict[str, list[int]] | None = None
    # a model folder (a run's student/, e.g. of method tsm) of the teacher's network class whose weights and
    # config start the student instead of the teacher's (a smaller student trained by teacher score matching)
    init: str | None = None

    def __post_init__(self):
        if self.num_steps < 1:
            _fail("student.num_steps", f"must be >= 1, got {self.num_steps}")
        if self.timesteps is not None:
            ts = self.timesteps
            if len(ts) == 0:
                _fail("student.timesteps", "is empty")
            if any(b >= a for a, b in zip(ts, ts[1:])):
                _fail("student.timesteps", f"must be strictly descending (first = t_init), got {ts}")
            self.num_steps = len(ts)
        if self.lora_rank < 0:
            _fail("student.lora_rank", f"must be >= 0, got {self.lora_rank}")
        check_range("student.lora_alpha", self.lora_alpha, gt=0)
        if self.architecture is not None and self.lora_rank:
            _fail("student.architecture", "a smaller student is trained in full (its weights are cut from the "
                                          "teacher's, not the teacher's own); set student.lora_rank=0")
        if self.layer_map is not None and self.architecture is None:
            _fail("student.layer_map", "maps the layers of a smaller student: set student.architecture too")
        if self.init is not None:
            for key, value in (("architecture", self.architecture), ("layer_map", self.layer_map),
                               ("lora_rank", self.lora_rank or None)):
                if value is not None:
                    _fail(f"student.{key}", f"the student starts from student.init ('{self.init}'), whose folder "
                                            f"gives its network; drop student.{key}")


@dataclass
class DataConfig:
    # captions: an inline list, .txt (one per line), .json (a list or a COCO captions_*.json), .jsonl / .csv /
    # .parquet (caption_column), a save_to_disk folder or hf:<hub id> (stepdistill/sources.py)
    prompts: str | list[str] | None = None
    # real images with their own captions or labels: an image folder, webdataset shards (a .tar or brace
    # pattern), a COCO captions_*.json (image_root), a save_to_disk folder or hf:<hub id>
    images: str | None = None
    image_root: str | None = None  # COCO: the image folder (default: ../train2017 beside captions_train2017.json)
    caption_column: str | None = None  # default: the first of caption, text, prompt, txt
    image_column: str | None = None  # default: the first of image, jpg, png, jpeg, webp
    label_column: str | None = None  # default: label (class-conditional teachers, or label_prompt)
    # text teachers on class-labelled images (class folders, a label column): each image's caption, from its
    # label's name (a dataset's ClassLabel names or the folder name) or number, e.g. "a photo of the digit {label}"
    label_prompt: str | None = None
    split: str = "train"  # of a datasets dataset
    crop: str = "center"  # center | random (per item, seeded), as the diffusers training scripts
    streaming: bool = False  # read data.images as a stream (webdataset shards, parquet, a hub dataset): stepdistill/streaming.py
    shuffle_buffer: int = 1000  # streaming: items shuffled together (a window read, permuted, served)
    num_workers: int = 2  # DataLoader workers decoding images ahead (sets over loading.IN_MEMORY_ITEMS)
    cache: str | None = None  # a data cache folder written by python -m stepdistill.data.cache
    skip_bad_items: bool = False  # skip and count unreadable images / empty captions instead of failing

    def __post_init__(self):
        if isinstance(self.prompts, list) and not self.prompts:
            _fail("data.prompts", "is an empty list")
        if self.label_prompt is not None and "{label}" not in self.label_prompt:
            _fail("data.label_prompt", f"must contain {{label}}, got {self.label_prompt!r}")
        if self.crop not in ("center", "random"):
            _fail("data.crop", f"must be center or random, got {self.crop!r}")
        check_range("data.num_workers", self.num_workers, ge=0)
        check_range("data.shuffle_buffer", self.shuffle_buffer, gt=0)
        if self.streaming and self.cache is not None:
            _fail("data.cache", "a data cache is read by index; data.streaming reads the source itself (use one)")
        if self.streaming and self.images is None:
            _fail("data.streaming", "streams data.images; set data.images (webdataset shards, parquet or a dataset)")


@dataclass
class OptimConfig:
    lr: float | None = None  # default: the method's
    betas: list[float] | None = None  # default: the method's (0.9, 0.999) unless it says otherwise
    weight_decay: float | None = None  # default: train.weight_decay

    def __post_init__(self):
        check_range("optim.lr", self.lr, gt=0)
        check_range("optim.weight_decay", self.weight_decay, ge=0)
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            _fail("optim.betas", f"must be two numbers in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 16  # global batch (all processes); must divide by the number of processes
    gradient_accumulation_steps: int = 1
    mixed_precision: typing.Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0  # AdamW weight decay of every trainable (optim.<name>.weight_decay overrides)
    # memory (docs/ARCHITECTURE.md, "Memory"): recompute activations in the backward pass; the trainable
    # copies' weights (and gradients) in bf16; AdamW's moments in 8 bits (torchao). With bf16 weights the
    # optimiser rounds its updates stochastically (torchao), so small updates are not lost to rounding.
    gradient_checkpointing: bool = False
    trainable_dtype: typing.Literal["fp32", "bf16"] = "fp32"
    optimizer: typing.Literal["adamw", "adamw8bit"] = "adamw"
    lr_schedule: typing.Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"  # diffusers names
    lr_warmup_steps: int = 0
    ema_decay: float | None = None  # EMA of the student (diffusers EMAModel); None: off
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    log_every: int = 10
    validate_every: int = 500
    num_validation: int = 16
    report_to: typing.Literal["tensorboard", "wandb", "none"] = "tensorboard"
    progress: bool = True
    # several processes (stepdistill/parallel.py): ddp (whole weights, gradients all-reduced per block in the
    # backward pass) or fsdp (weights, gradients and optimiser state sharded; the teacher too); auto: fsdp
    # under an accelerate FSDP config (configs/accelerate/fsdp.yaml), else ddp
    parallel: typing.Literal["auto", "ddp", "fsdp"] = "auto"
    verify_rank_sync: bool = False  # after every step, check that all ranks hold identical trainable weights
    max_nonfinite_steps: int = 10  # this many steps in a row with a NaN/inf loss or gradient stop the run
    export: bool = False  # at the end, also write the student (its EMA when kept) as a diffusers pipeline: <output_dir>/pipeline

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "log_every",
                    "validate_every", "num_validation", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                _fail(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            _fail("train.checkpoints_total_limit", "must be >= 1 or null")
        check_range("train.grad_clip", self.grad_clip, gt=0)  # null turns clipping off
        check_range("train.weight_decay", self.weight_decay, ge=0)
        check_range("train.lr_warmup_steps", self.lr_warmup_steps, ge=0)
        check_range("train.seed", self.seed, ge=0)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            _fail("train.ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        if self.batch_size % self.gradient_accumulation_steps:
            _fail("train.batch_size", f"{self.batch_size} does not divide by gradient_accumulation_steps "
                                      f"{self.gradient_accumulation_steps}")


@dataclass
class RunConfig:
    method: str  # a registered method name, or "package.module:ClassName" for a plug-in
    teacher: TeacherConfig
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: dict[str, OptimConfig] = field(default_factory=dict)
    method_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return to_dict(self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """(dotted key, value) of ``key=value``; the value keeps its text (:class:`OverrideText`) until the
    field's type is known."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has no key" if not key else f"override {text!r}: '{key}' is not a dotted key")
    return key.split("."), OverrideText(raw)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if isinstance(node.get(part), OverrideText):  # a mapping set by an earlier override
                node[part] = node[part].value_for(dict, text)
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a mapping")
            node = node[part]
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read a YAML file (or start empty), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' " + ("is a folder, not a file" if p.is_dir() else "does not exist"))
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{p}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    raw = apply_overrides(raw, list(overrides))
    for key in ("method", "teacher"):
        if key not in raw:
            raise ConfigError(f"missing config key '{key}'")
    return from_dict(RunConfig, raw)


def dump_config(cfg: RunConfig, method_args: dict | None = None) -> str:
    """The config as YAML; ``method_args`` (the method's resolved options) replaces the section as given."""
    data = cfg.to_dict()
    if method_args is not None:
        data["method_args"] = method_args
    return yaml.safe_dump(data, sort_keys=False)
