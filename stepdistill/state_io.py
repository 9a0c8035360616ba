"""Nested training state (dicts and lists of tensors and plain values) written without pickle.

Tensors go to one safetensors file, the structure and the plain values to a JSON file beside it, so
reading a checkpoint never unpickles anything (accelerate's own custom-object files would).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch

_TENSOR = "__tensor__"


def _split(obj: Any, tensors: dict, path: str, seen: set) -> Any:
    if torch.is_tensor(obj):
        key = path or "value"
        t = obj.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        tensors[key] = t.clone() if ptr in seen else t  # safetensors refuses tensors sharing memory
        seen.add(ptr)
        return {_TENSOR: key}
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"state key {bad[0]!r} at '{path}' is not a string")
        return {k: _split(v, tensors, f"{path}.{k}" if path else k, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, tensors, f"{path}[{i}]", seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state value at '{path}' has type {type(obj).__name__}, which is not saved without pickle")


def _join(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def temporary_name(path: str | Path) -> Path:
    """A name beside ``path`` that belongs to this process alone (``.<name>.tmp-<pid>-<random>``), so
    that writing or cleaning it up never touches a file someone else made."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, written to a temporary file and renamed into place (a reader never
    sees half a file, and a crash leaves the previous version)."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_state(state: dict, folder: str | Path, name: str) -> None:
    """Write ``<name>.json`` (+ ``<name>.safetensors`` when there are tensors) into ``folder``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, tensors, "", set())
    folder = Path(folder)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(tree))


def load_state(folder: str | Path, name: str) -> dict:
    """The state :func:`save_state` wrote, tensors on the CPU."""
    from safetensors.torch import load_file

    folder = Path(folder)
    tree = json.loads((folder / f"{name}.json").read_text())
    st = folder / f"{name}.safetensors"
    tensors = load_file(str(st)) if st.is_file() else {}
    return _join(tree, tensors)


def cache_key_problem(saved: dict | None, wanted: dict) -> str | None:
    """Why a cache made for the settings ``saved`` cannot serve ``wanted`` ('key: old -> new; ...'), or
    None when they are the same."""
    if saved is None:
        return "it records no settings (made by an older version)"
    diffs = [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
             if saved.get(k) != wanted.get(k)]
    return "; ".join(diffs) or None
