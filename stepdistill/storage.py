"""Writing files so that a reader never sees half of one and nothing of the user's is overwritten.

- Nested state (dicts and lists of tensors and plain values) without pickle (:func:`save_state`):
  tensors in one safetensors file, the structure and plain values in JSON beside it.
- Atomic writes: a file or folder is written under a name of this process's own
  (:func:`temporary_name`) and renamed into place; :func:`swap_in` replaces a whole folder.
- Keyed caches (:func:`load_or_make`): something made once for some settings (the oracle's fitted
  network, DMD's regression pairs) is stored with those settings and made again when they change.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .errors import InputError

logger = logging.getLogger("stepdistill")
_TENSOR = "__tensor__"
KEY_FILE = "stepdistill_key.json"  # inside a keyed cache folder: the settings it was made for
FOLDER_MARKER = ".stepdistill.json"  # inside a folder a command writes into: which command, for which settings
T = TypeVar("T")


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


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temporary_name(path: str | Path) -> Path:
    """A name beside ``path`` that belongs to this process alone (``.<name>.tmp-<host>-<pid>-<random>``),
    so that writing or cleaning it up never touches a file someone else made."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_dead_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of ``path`` (:func:`temporary_name`) that processes of this machine left
    when they died (killed mid-write); those of live processes and of other machines stay. Returns
    what was removed."""
    path = Path(path)
    prefix = f".{path.name}.tmp-{_host()}-"
    removed = []
    for leftover in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_records(folder: Path, paths: list[Path]) -> dict:
    """{path relative to ``folder``: {"size", "sha256"}} of ``paths``, hashed several at once (hashlib
    releases the GIL: multi-GB files hash in the time of the largest one, on enough cores)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(paths)))) as pool:
        hashes = list(pool.map(file_sha256, paths))
    return {str(Path(p).relative_to(folder)): {"size": Path(p).stat().st_size, "sha256": h} for p, h in zip(paths, hashes)}


def valid_record(rel, meta) -> bool:
    """Whether (``rel``, ``meta``) is a well-formed entry of :func:`file_records`, inside its folder."""
    return isinstance(rel, str) and isinstance(meta, dict) and isinstance(meta.get("size"), int) and \
        isinstance(meta.get("sha256"), str) and ".." not in Path(rel).parts and not Path(rel).is_absolute()


def file_problem(folder: Path, rel: str, meta: dict) -> str | None:
    """Why ``folder/rel`` is not the file a manifest's :func:`file_records` describe (missing, another
    size, another checksum), or None."""
    f = Path(folder) / rel
    if not f.is_file():
        return f"{rel} is missing"
    if f.stat().st_size != meta["size"]:
        return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta['size']}"
    if file_sha256(f) != meta["sha256"]:
        return f"{rel} does not match its checksum"
    return None


def records_problem(folder: Path, records: dict) -> str | None:
    """The first of ``records`` (a manifest's :func:`file_records`, in their order) whose file is not
    as recorded, checked several at once, or None."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(records.items())
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(items)))) as pool:
        problems = list(pool.map(lambda item: file_problem(folder, *item), items))
    return next((p for p in problems if p), None)


def claim_folder(folder: str | Path, command: str, settings: dict | None = None, option: str = "--out",
                 legacy: Callable[[Path], bool] | None = None, mark: bool = True) -> Path:
    """The one rule for every command that writes into a folder: it writes only into a folder it
    created, or one carrying its own marker (``FOLDER_MARKER``) for the same settings. A new or empty
    folder is created and marked; anything else is one InputError naming ``option``, the folder and
    why, before any work, so nothing the user had is overwritten, deleted or mixed into the results.

    ``legacy(folder)`` tells a folder this command wrote before markers existed (it is claimed then);
    ``settings`` None: any settings (the command compares them itself); ``mark`` False: only check and
    create the folder, the caller marks it (:func:`mark_folder`) once its own checks have passed.
    Several processes may claim one folder at once: the marker and its temporaries are their own."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option}: '{folder}' exists and is not a folder")
    marker = folder / FOLDER_MARKER
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            saved = None
        if not isinstance(saved, dict) or saved.get("command") != command:
            what = saved.get("command") if isinstance(saved, dict) else None
            raise InputError(f"{option}: '{folder}' holds the output of {what or 'an unknown command'!s}, not of "
                             f"stepdistill {command}; give another folder")
        if settings is not None:
            problem = key_problem(saved.get("settings"), settings)
            if problem:
                raise InputError(f"{option}: '{folder}' holds the output of stepdistill {command} with other settings "
                                 f"({problem}); give another folder or the same settings")
        return folder
    ours = (FOLDER_MARKER, f".{FOLDER_MARKER}.tmp-")  # another process of this command marking it now
    present = sorted(p.name for p in folder.iterdir() if not p.name.startswith(ours)) if folder.is_dir() else []
    if present and not (legacy is not None and legacy(folder)):
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise InputError(f"{option}: '{folder}' holds files stepdistill {command} did not write ({shown}); give a "
                         f"new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    if mark:
        mark_folder(folder, command, settings)
    return folder


def mark_folder(folder: str | Path, command: str, settings: dict | None = None) -> None:
    """Write ``folder``'s marker: it holds the output of ``command`` with ``settings``."""
    write_json(Path(folder) / FOLDER_MARKER,
               {"command": command, **({"settings": settings} if settings is not None else {})})


@contextlib.contextmanager
def writing(path: str | Path, what: str):
    """Around code that writes ``what`` under ``path``: a failure on a full or read-only disk becomes an
    OSError saying so and naming ``path``. Libraries that write files (torch.save, safetensors) wrap
    the system's error in their own, often without its text ("unexpected pos 9472 vs 9364"); the disk
    itself is asked instead."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        problem = disk_problem(path)
        if problem is None:
            raise
        code, text = problem
        raise OSError(code, f"{text} while writing {what}", str(path)) from exc


def disk_problem(path: str | Path) -> tuple[int, str] | None:
    """(errno, text) when the filesystem holding ``path`` is read-only or has under 1 MiB left, else None."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS, "Read-only file system"
    if st.f_bavail * st.f_frsize < 1 << 20:
        return errno.ENOSPC, "No space left on device"
    return None


def key_problem(saved: dict | None, wanted: dict) -> str | None:
    """Why something made for the settings ``saved`` cannot serve ``wanted`` ('key: old -> new; ...'),
    or None when they are the same."""
    if not isinstance(saved, dict):
        return "it records no settings"
    diffs = [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
             if saved.get(k) != wanted.get(k)]
    return "; ".join(diffs) or None


def swap_in(new: Path, final: Path) -> None:
    """Put the complete folder ``new`` in place of ``final`` (which may exist). ``final`` moves aside to
    ``<final>.old`` first and is deleted only once ``new`` is in place; a process killed between the two
    renames leaves ``<final>.old``, which :func:`recover_swap` puts back."""
    new, final = Path(new), Path(final)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(final: Path) -> None:
    """Finish what an interrupted :func:`swap_in` left: ``<final>.old`` comes back when ``final`` never
    arrived, and is removed otherwise."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if old.is_dir() and not final.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)


def load_or_make(folder: Path, key: dict, make: Callable[[], T], save: Callable[[T, Path], None],
                 load: Callable[[Path], T], what: str, write: bool = True) -> T:
    """What ``folder`` holds when it was made for the settings ``key``; otherwise ``make()``'s result,
    saved (with ``write``) into a temporary folder with the key and swapped in whole. A folder made for
    other settings, or one that cannot be loaded, is made again with a warning naming why."""
    folder = Path(folder)
    remove_dead_temporaries(folder)  # what a writer killed mid-save left
    problem = "it is missing"
    if folder.is_dir():
        try:
            saved = json.loads((folder / KEY_FILE).read_text())
        except (OSError, ValueError):
            saved = None
        problem = key_problem(saved, key)
        if problem is None:
            try:
                return load(folder)
            except Exception as exc:  # noqa: BLE001  (any damage to what was stored means: make it again)
                problem = f"it cannot be read ({type(exc).__name__})"
        logger.warning("%s at %s was made under other settings or is damaged (%s): making it again", what, folder,
                       problem)
    obj = make()
    if write:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(folder)
        try:
            tmp.mkdir()
            save(obj, tmp)
            write_json(tmp / KEY_FILE, key)
            swap_in(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return obj
