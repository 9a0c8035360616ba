"""What a checkpoint folder holds, and the checks made before one is resumed from
(``training/checkpointer.py`` writes and chooses them).

``<output_dir>/checkpoints/checkpoint-<N>/`` holds accelerate's state (optimisers, random states), a
folder per trainable with its weights (``save_trainable``), ``training_state.{json,safetensors}``
(loop counters, method state, learning-rate schedules, EMA; no pickle) and ``manifest.json`` (the
step, the resolved config, the process count, every file's size and sha256). A run of several
processes writes its trainables' weights, optimiser states and EMA with torch distributed checkpoint
instead, each rank its own shards, into ``sharded/`` (listed in the same manifest). Resume refuses a
checkpoint whose files do not match its manifest (``checkpoint_problem``) and config differences that
would change the run (``check_resumable``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models.student import Student
from ..storage import file_records, load_state, records_problem, valid_record

CKPT_PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
TRAINING_STATE = "training_state"  # loop counters, distiller state, schedules, EMA (JSON + safetensors)

# keys that may change between a run and its resume (logged); every other difference is refused
RESUME_SAFE = ("train.output_dir", "train.max_steps", "train.checkpoint_every", "train.checkpoints_total_limit",
               "train.log_every", "train.validate_every", "train.num_validation", "train.report_to", "train.progress",
               "train.verify_rank_sync", "train.max_nonfinite_steps", "train.export",
               "train.gradient_checkpointing",  # memory only: the same gradients
               "train.parallel",  # the same gradients, sharded otherwise (the sharded state reshards)
               "data.num_workers")  # how many workers decode images ahead: the same batches


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints that were completed (renamed into place with a manifest), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        suffix = p.name[len(CKPT_PREFIX):]
        if p.name.startswith(CKPT_PREFIX) and suffix.isdigit() and (p / MANIFEST).is_file():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def make_manifest(folder: Path, step: int, config: dict, num_processes: int) -> dict:
    paths = [f for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST]
    files = file_records(folder, paths)
    return {"step": step, "config": config, "num_processes": num_processes, "files": files}


PLAIN_WEIGHTS = "diffusion_pytorch_model.safetensors"  # a whole diffusers network (its config beside it)
TRAINED_WEIGHTS = "trainable.safetensors"  # only what trains (LoRA adapters, a bundle's parts)


def save_trainable(module, params: list, folder: Path) -> None:
    """One copy of a trainable's weights in a checkpoint: a plain diffusers network as a model folder
    (config and safetensors, loadable with ``from_pretrained``), anything else (a LoRA network, whose
    base is the teacher's; a bundle of network and head) as its trained parameters only."""
    from diffusers import ModelMixin
    from safetensors.torch import save_file, save_model

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(module, ModelMixin) and not getattr(module, "peft_config", None):
        module.save_config(folder)
        save_model(module, str(folder / PLAIN_WEIGHTS))
        return
    trained = {id(p) for p in params}
    state = {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if id(p) in trained}
    persistent = set(module.state_dict())
    state.update({n: b.detach().cpu().contiguous() for n, b in module.named_buffers() if n in persistent})  # statistics
    save_file(state, str(folder / TRAINED_WEIGHTS))


def has_trainable(folder: Path) -> bool:
    return (folder / PLAIN_WEIGHTS).is_file() or (folder / TRAINED_WEIGHTS).is_file()


def load_trainable(module, params: list, folder: Path) -> None:
    """The weights :func:`save_trainable` wrote, into ``module`` (every trained parameter covered)."""
    from safetensors.torch import load_file, load_model

    if (folder / PLAIN_WEIGHTS).is_file():
        load_model(module, str(folder / PLAIN_WEIGHTS), strict=True)
        return
    state = load_file(str(folder / TRAINED_WEIGHTS))
    names = {id(p): n for n, p in module.named_parameters()}
    missing = sorted(names[id(p)] for p in params if names[id(p)] not in state)
    result = module.load_state_dict(state, strict=False)
    if missing or result.unexpected_keys:
        raise ConfigError(f"resume: {folder} does not match this run's trainable (missing {missing[:3]}, unexpected "
                          f"{list(result.unexpected_keys)[:3]}); use a new train.output_dir")


SHARDED = "sharded"  # torch distributed checkpoint folder of a parallel run's trainables


def sharded_state(states: dict) -> dict:
    """What a parallel run's checkpoint holds per trainable, as torch distributed checkpoint state
    (sharded tensors stay sharded): the trained weights (LoRA: the adapters) and persistent buffers,
    the optimiser state keyed by parameter name, and the EMA's shadow weights."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = {}
    for name, st in states.items():
        module = st.module
        trained = {id(p) for p in st.params}
        keep = {n for n, p in module.named_parameters() if id(p) in trained}
        persistent = set(module.state_dict())
        keep |= {n for n, _ in module.named_buffers() if n in persistent}
        model, optim = get_state_dict(module, st.optimizer)
        out[name] = {"model": {k: v for k, v in model.items() if k in keep}, "optim": optim}
        if st.ema is not None:
            out[name]["ema"] = {str(i): t for i, t in enumerate(st.ema.shadow_params)}
    return out


def save_sharded(folder: Path, states: dict) -> None:
    """Every rank writes its shards of :func:`sharded_state` into ``folder`` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(states), checkpoint_id=str(folder))


def load_sharded(folder: Path, states: dict) -> None:
    """Load :func:`save_sharded`'s files into this run's trainables, resharded to this run's processes
    (collective); the EMA's shadow weights are loaded in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = sharded_state(states)
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as exc:  # noqa: BLE001  (DCP raises its own error types for missing or mismatched keys)
        raise ConfigError(f"resume: {folder} does not match this run's trainables ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); use a new train.output_dir") from None
    for name, st in states.items():
        set_state_dict(st.module, st.optimizer, model_state_dict=state[name]["model"],
                       optim_state_dict=state[name]["optim"], options=StateDictOptions(strict=False))


def checkpoint_student(folder: Path, ema: bool = True):
    """The student a checkpoint holds, as a :class:`~stepdistill.models.student.Student`: with ``ema`` and
    an EMA in the checkpoint (``train.ema_decay``), its averaged weights, the ones the finished run
    saves as ``student_ema/``; otherwise the trained weights. One process's checkpoints only (a
    parallel run keeps its EMA in the sharded state)."""
    student = Student.load(folder / "student")
    saved = (load_state(folder, TRAINING_STATE).get("ema") or {}).get("student") if ema else None
    if not saved:
        return student
    params, shadow = list(student.model.parameters()), saved.get("shadow_params")
    if shadow is None:
        raise ConfigError(f"{folder}: its EMA is in the sharded state of a parallel run; use the finished run's "
                          "student_ema/ or ema=False")
    if len(shadow) != len(params) or any(p.shape != s.shape for p, s in zip(params, shadow)):
        raise ConfigError(f"{folder}: its EMA ({len(shadow)} tensors) does not match the student's {len(params)} "
                          "weights (a LoRA or multi-part student)")
    with torch.no_grad():
        for p, avg in zip(params, shadow):
            p.copy_(avg.to(p.dtype))
    return student


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None: an unreadable or malformed manifest, a
    file missing, truncated or altered, or a file the manifest does not list (nothing is loaded
    unchecked)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable {MANIFEST} ({type(exc).__name__})"
    malformed = f"{MANIFEST} is malformed (it needs step, config, num_processes and a size and sha256 per file)"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or \
            not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("num_processes"), int) or \
            not isinstance(manifest.get("step"), int):
        return malformed
    files = manifest["files"]
    if not all(valid_record(rel, meta) for rel, meta in files.items()):
        return malformed
    listed = set(files)
    for f in sorted(folder.rglob("*")):
        rel = str(f.relative_to(folder))
        if f.is_file() and f.name != MANIFEST and rel not in listed:
            return f"{rel} is not in the manifest"
    return records_problem(folder, files)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))  # an empty mapping adds nothing
        else:
            out[key] = v
    return out


# keys an earlier version did not record, and the value its runs behaved as: a checkpoint without the key
# resumes with that value (train.shared_lora_base: earlier runs copied the network under each LoRA)
ABSENT_MEANS = {"train.shared_lora_base": False}


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(unsafe, safe) differences between a checkpoint's config and this run's, as 'key: old -> new'."""
    a, b = _flat(old), _flat(new)
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or (key not in a and key in ABSENT_MEANS and b.get(key) == ABSENT_MEANS[key]):
            continue
        if key.startswith("data_fingerprint.") and key not in a:  # recorded by a version that took none
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        last = key.rsplit(".", 1)[-1]
        is_lr = key.split(".")[0] in ("optim", "method_args") and (last == "lr" or last.endswith("_lr"))
        (safe if key in RESUME_SAFE or is_lr else unsafe).append(line)
    return unsafe, safe


def check_resumable(ckpt: Path, config: dict, num_processes: int) -> list[str]:
    """The safe config differences of resuming ``ckpt`` with ``config``; unsafe ones raise ConfigError
    naming each. Another process count is allowed for a sharded checkpoint, one process included (the
    state reshards, or is gathered, and the global batches do not depend on the process count; logged),
    and refused for a one-process checkpoint (whole weights in another layout)."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    unsafe, safe = config_changes(manifest["config"], config)
    if unsafe:
        raise ConfigError(f"resume: {ckpt} was written with a different config: {'; '.join(unsafe)}. Restore "
                          f"those values or use a new train.output_dir")
    written = manifest["num_processes"]
    sharded, now_sharded = (ckpt / SHARDED).is_dir(), num_processes > 1
    if sharded and now_sharded and written != num_processes:
        safe.append(f"processes: {written} -> {num_processes} (the sharded state reshards; the global batches are "
                    f"the same, only the order of the gradient sums changes)")
    elif sharded and not now_sharded:
        safe.append(f"processes: {written} -> 1 (the sharded state is gathered into whole weights; the global "
                    f"batches are the same, only the order of the gradient sums changes)")
    elif not sharded and written > 1:
        raise ConfigError(f"resume: {ckpt} was written by {written} processes by an earlier version (whole weights, "
                          f"per-rank data streams); this version cannot continue it with {num_processes}. Use a new "
                          f"train.output_dir")
    elif not sharded and now_sharded:
        raise ConfigError(f"resume: {ckpt} was written by 1 process (whole weights), this run has {num_processes}, "
                          f"which load sharded state. Resume it with one process (--num_processes 1) or use a new "
                          f"train.output_dir")
    return safe
