"""The run config's schema: one dataclass per section (``teacher``, ``student``, ``data``, ``optim``,
``train``), each documenting its fields and validating itself in ``__post_init__``. Method options
(``method_args``) are validated by each method's own ``Options`` dataclass.

Path fields (their comments say "path, expanded") expand ``~`` at their start and ``$VAR`` / ``${VAR}``
(``parse.expand_path``): a variable that is not set is an error naming the field and the variable. Text
with neither (hub ids, ``stepdistill:<name>``) and ``hf:`` ids stay as written."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .parse import check_range, expand_path, fail, to_dict

PRECISIONS = ("fp32", "bf16", "fp16")  # the names configs and command lines use for weight dtypes


def torch_dtype(name: str | None):
    """The torch dtype of a precision name in ``PRECISIONS`` (None stays None)."""
    if name is None:
        return None
    import torch

    if name not in PRECISIONS:
        raise ConfigError(f"precision {name!r} is not one of {list(PRECISIONS)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class OracleConfig:
    """The exact Gaussian-mixture teacher (tests, benchmarks)."""

    # GaussianMixture.<layout>; random: dimension, modes, placement, weights, stds and the process (the keys
    # components, dim, radius, std, process, beta_schedule, shift) drawn from seed (stepdistill/models/oracle_layouts.py)
    layout: typing.Literal["ring", "grid", "scattered", "random"] = "ring"
    seed: int = 0  # the random layout's
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
            fail("teacher.oracle", "needs components >= 1 and dim >= 2")
        check_range("teacher.oracle.radius", self.radius, ge=0)
        check_range("teacher.oracle.std", self.std, gt=0)
        check_range("teacher.oracle.shift", self.shift, gt=0)
        check_range("teacher.oracle.seed", self.seed, ge=0)
        for key in ("network_steps", "hidden", "depth"):
            check_range(f"teacher.oracle.{key}", getattr(self, key), ge=1)


@dataclass
class TeacherConfig:
    path: str | None = None  # diffusers pipeline folder (path, expanded) or hub id
    oracle: OracleConfig | None = None
    dtype: typing.Literal["fp32", "bf16", "fp16"] = "fp32"  # precision the frozen teacher is held in
    null_label: int | None = None  # class index of the CFG null branch (class-conditional UNets)
    allow_remote_code: bool = False
    # a video teacher's [frames, height, width] in pixels (Wan, HunyuanVideo: 4k + 1 frames, sides multiples of
    # 16); default: its pipeline's __call__ defaults (Wan: 81 x 480 x 832, HunyuanVideo: 129 x 720 x 1280)
    video_size: list[int] | None = None
    # networks of any size (Flux, Qwen-Image): the latent height = width distilled at (even; default: the
    # pipeline's default_sample_size, 128 latents = 1024 px), which also fixes their resolution-dependent shift
    sample_size: int | None = None
    # a network whose guidance scale is an input (FLUX.1-dev, HunyuanVideo: guidance_embeds): the scale fed to the
    # teacher, the student and fake scores, and the one the student exports with (default: its pipeline's
    # guidance_scale, 3.5 for FluxPipeline, 6.0 for HunyuanVideoPipeline); not CFG
    guidance: float | None = None
    # cpu: under FSDP (an accelerate FSDP launch) the frozen teacher's shards live in CPU memory and are copied to the
    # device block by block (FSDP2's CPUOffloadPolicy); refused for a run that is not sharded
    offload: typing.Literal["none", "cpu"] = "none"

    def __post_init__(self):
        self.path = expand_path("teacher.path", self.path)
        check_range("teacher.sample_size", self.sample_size, ge=2)
        check_range("teacher.guidance", self.guidance, ge=0)
        if (self.path is None) == (self.oracle is None):
            fail("teacher", "give exactly one of teacher.path (a diffusers pipeline) or teacher.oracle")
        if self.video_size is not None and (len(self.video_size) != 3 or min(self.video_size) < 1):
            fail("teacher.video_size", f"must be [frames, height, width], each >= 1, got {self.video_size}")


@dataclass
class StudentConfig:
    num_steps: int = 1  # sampling steps of the student
    timesteps: list[float] | None = None  # explicit descending list (first = t_init); default: the process grid
    lora_rank: int = 0  # 0: full fine-tune of a teacher copy; > 0: LoRA (peft) on the copy
    lora_alpha: float | None = None  # default: lora_rank
    # modules the LoRA adapts (those the network has); default: the method's, models.student.ATTENTION_LORA_TARGETS
    # (to_q, to_k, to_v, to_out.0), for lcm LCM_LORA_TARGETS (the LCM-LoRA script's: attention, feed-forward,
    # resnet convolutions, samplers, time-embedding projections)
    lora_targets: list[str] | None = None
    # initialisation of the LoRA adapters (the student's and a LoRA fake score's): default, peft's (A kaiming-uniform,
    # B zero), as the official LCM-LoRA and SwiftBrush code; gaussian, A ~ N(0, 1 / rank) (B zero)
    lora_init: typing.Literal["default", "gaussian"] = "default"
    # a smaller student of the teacher's class: changes to its config (e.g. {block_out_channels: [16, 32, 32]},
    # {num_layers: 14}); weights start from the teacher's, cut to the new shapes (models.student.smaller_copy)
    architecture: dict[str, Any] | None = None
    # with architecture: per layer list (a ModuleList's name, e.g. transformer_blocks), the teacher layer each
    # student layer starts from (default: the first ones)
    layer_map: dict[str, list[int]] | None = None
    # a model folder (a run's student/, e.g. of method tsm) of the teacher's network class whose weights and
    # config start the student instead of the teacher's (a smaller student trained by teacher score matching);
    # path, expanded
    init: str | None = None

    def __post_init__(self):
        self.init = expand_path("student.init", self.init)
        if self.num_steps < 1:
            fail("student.num_steps", f"must be >= 1, got {self.num_steps}")
        if self.timesteps is not None:
            ts = self.timesteps
            if len(ts) == 0:
                fail("student.timesteps", "is empty")
            if any(b >= a for a, b in zip(ts, ts[1:])):
                fail("student.timesteps", f"must be strictly descending (first = t_init), got {ts}")
            self.num_steps = len(ts)
        if self.lora_rank < 0:
            fail("student.lora_rank", f"must be >= 0, got {self.lora_rank}")
        check_range("student.lora_alpha", self.lora_alpha, gt=0)
        if self.architecture is not None and self.lora_rank:
            fail("student.architecture", "a smaller student is trained in full (its weights are cut from the "
                                          "teacher's, not the teacher's own); set student.lora_rank=0")
        if self.layer_map is not None and self.architecture is None:
            fail("student.layer_map", "maps the layers of a smaller student: set student.architecture too")
        if self.init is not None:
            for key, value in (("architecture", self.architecture), ("layer_map", self.layer_map),
                               ("lora_rank", self.lora_rank or None)):
                if value is not None:
                    fail(f"student.{key}", f"the student starts from student.init ('{self.init}'), whose folder "
                                            f"gives its network; drop student.{key}")


@dataclass
class DataConfig:
    # captions: an inline list, .txt (one per line), .json (a list or a COCO captions_*.json), .jsonl / .csv /
    # .parquet (caption_column), a save_to_disk folder or hf:<hub id> (stepdistill/data/sources.py); a file or
    # folder is a path, expanded
    prompts: str | list[str] | None = None
    # real images with their own captions or labels: an image folder, webdataset shards (a .tar or brace
    # pattern), a COCO captions_*.json (image_root), a save_to_disk folder or hf:<hub id>; path, expanded
    images: str | None = None
    # COCO: the image folder (default: ../train2017 beside captions_train2017.json); path, expanded
    image_root: str | None = None
    caption_column: str | None = None  # default: the first of caption, text, prompt, txt
    image_column: str | None = None  # default: the first of image, jpg, png, jpeg, webp
    label_column: str | None = None  # default: label (class-conditional teachers, or label_prompt)
    # text teachers on class-labelled images (class folders, a label column): each image's caption, from its
    # label's name (a dataset's ClassLabel names or the folder name) or number, e.g. "a photo of the digit {label}"
    label_prompt: str | None = None
    split: str = "train"  # of a datasets dataset
    crop: str = "center"  # center | random (per item, seeded), as the diffusers training scripts
    streaming: bool = False  # read data.images as a stream (webdataset shards, parquet, a hub dataset): stepdistill/data/streaming.py
    shuffle_buffer: int = 1000  # streaming: items shuffled together (a window read, permuted, served)
    num_workers: int = 2  # DataLoader workers decoding images ahead (sets over loading.IN_MEMORY_ITEMS)
    cache: str | None = None  # a data cache folder written by stepdistill cache; path, expanded
    skip_bad_items: bool = False  # skip and count unreadable images / empty captions instead of failing

    def __post_init__(self):
        for key in ("prompts", "images", "image_root", "cache"):  # prompts: not an inline list
            setattr(self, key, expand_path(f"data.{key}", getattr(self, key)))
        if isinstance(self.prompts, list) and not self.prompts:
            fail("data.prompts", "is an empty list")
        if self.label_prompt is not None and "{label}" not in self.label_prompt:
            fail("data.label_prompt", f"must contain {{label}}, got {self.label_prompt!r}")
        if self.crop not in ("center", "random"):
            fail("data.crop", f"must be center or random, got {self.crop!r}")
        check_range("data.num_workers", self.num_workers, ge=0)
        check_range("data.shuffle_buffer", self.shuffle_buffer, gt=0)
        if self.streaming and self.cache is not None:
            fail("data.cache", "a data cache is read by index; data.streaming reads the source itself (use one)")
        if self.streaming and self.images is None:
            fail("data.streaming", "streams data.images; set data.images (webdataset shards, parquet or a dataset)")


@dataclass
class OptimConfig:
    lr: float | None = None  # default: the method's
    betas: list[float] | None = None  # default: the method's (0.9, 0.999) unless it says otherwise
    weight_decay: float | None = None  # default: train.weight_decay

    def __post_init__(self):
        check_range("optim.lr", self.lr, gt=0)
        check_range("optim.weight_decay", self.weight_decay, ge=0)
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            fail("optim.betas", f"must be two numbers in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # path, expanded
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
    # a LoRA student and a LoRA fake score (dmd, dmd2, sid, vsd) as named adapters on the teacher's own frozen
    # network instead of whole copies of it (stepdistill/models/shared_lora.py); false: a copy under each LoRA
    shared_lora_base: bool = True
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
    # several processes (stepdistill/training/parallel.py): ddp (whole weights, gradients all-reduced per block in the
    # backward pass) or fsdp (weights, gradients and optimiser state sharded; the teacher too); auto: fsdp
    # under an accelerate FSDP config (configs/accelerate/fsdp.yaml), else ddp
    parallel: typing.Literal["auto", "ddp", "fsdp"] = "auto"
    # context (sequence) parallelism: each sample's tokens split over this many processes, which draw the same
    # batch (stepdistill/diffusion/context_parallel.py; Flux, Qwen-Image and Wan); 1: off
    context_parallel: int = 1
    verify_rank_sync: bool = False  # after every step, check that all ranks hold identical trainable weights
    max_nonfinite_steps: int = 10  # this many steps in a row with a NaN/inf loss or gradient stop the run
    # at the end, also write the student (its EMA when kept) as a diffusers pipeline, <output_dir>/pipeline (the
    # distill command does; a Trainer used alone warns that it does not)
    export: bool = False

    def __post_init__(self):
        self.output_dir = expand_path("train.output_dir", self.output_dir)
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "log_every",
                    "validate_every", "num_validation", "max_nonfinite_steps", "context_parallel"):
            if getattr(self, key) < 1:
                fail(f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            fail("train.checkpoints_total_limit", "must be >= 1 or null")
        check_range("train.grad_clip", self.grad_clip, gt=0)  # null turns clipping off
        check_range("train.weight_decay", self.weight_decay, ge=0)
        check_range("train.lr_warmup_steps", self.lr_warmup_steps, ge=0)
        check_range("train.seed", self.seed, ge=0)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            fail("train.ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        if self.batch_size % self.gradient_accumulation_steps:
            fail("train.batch_size", f"{self.batch_size} does not divide by gradient_accumulation_steps "
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
