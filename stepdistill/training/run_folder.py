"""Who holds a run folder and what it holds.

- :class:`RunLock`: an exclusive lock on ``train.output_dir`` for the run's lifetime (``fcntl.flock``
  on the folder itself; ``.lock`` inside names the holder's pid, host and start time while it runs).
  The kernel drops the lock when its holder dies, so a lock left by a killed run is stale by
  construction and the next run takes it; a second live run is refused with one line naming the
  holder. Released, the folder is as it was (the ``.lock`` note is removed).
- ``run.json``: the resolved config of the run the folder holds and fingerprints of its data. A run
  started in a folder that holds another run (even one whose checkpoints were deleted) is refused with
  the differences named.
- Caches in the folder (the oracle's fitted network, DMD's regression pairs) carry the settings they
  were made for (``storage.load_or_make``); a cache made for others is rebuilt, with a warning
  naming the difference, never reused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
from pathlib import Path

from ..data.files import list_images
from ..data.sources import expand_shards, folder_fingerprint, kind_of
from ..errors import ConfigError
from ..storage import write_json
from .checkpoints import config_changes

RUN_RECORD = "run.json"
LOCK_FILE = ".lock"


class RunLock:
    """``with RunLock(folder): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.note = self.folder / LOCK_FILE
        self._fd = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = self.note.read_text().strip()
            except OSError:
                holder = ""
            raise ConfigError(f"train.output_dir: '{self.folder}' is in use by another run ({holder or 'holder unknown'}); "
                              f"wait for it to finish or use another train.output_dir") from None
        self._note_text = (f"pid {os.getpid()} on {socket.gethostname()}, since "
                       f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        try:
            self.note.write_text(self._note_text + "\n")  # a killed holder's note is simply overwritten
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            try:
                if self.note.read_text().strip() == self._note_text:
                    self.note.unlink()
            except OSError:
                pass
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def holder(self) -> str | None:
        """Who holds the folder now (the ``.lock`` note), or None when no live process does."""
        import fcntl

        try:
            fd = os.open(self.folder, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return self.note.read_text().strip() or "holder unknown"
            except OSError:
                return "holder unknown"
        finally:
            os.close(fd)  # closing drops a lock taken just to probe
        return None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a run folder written before folder markers (``storage.claim_folder``)
    existed: it has a ``run.json``, a ``config.yaml`` of a run config, or a completed checkpoint."""
    import yaml

    folder = Path(folder)
    if (folder / RUN_RECORD).is_file() or any((folder / "checkpoints").glob("checkpoint-*/manifest.json")):
        return True
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and {"method", "teacher", "train"} <= set(config)


def check_run_record(folder: Path, config: dict, plain_config: dict) -> None:
    """Refuse to start a run in a folder whose ``run.json`` records a run with another config (only the
    step budget, cadences and learning rates may differ, as on resume). A folder from before run.json
    existed is compared through its ``config.yaml`` (``plain_config``: this run's config as written there)."""
    import yaml

    path = Path(folder) / RUN_RECORD
    legacy = Path(folder) / "config.yaml"
    if path.is_file():
        try:
            old = json.loads(path.read_text())["config"]
            assert isinstance(old, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise ConfigError(f"train.output_dir: '{path}' is unreadable, so what the folder holds cannot be checked; "
                              f"use another train.output_dir") from None
    elif legacy.is_file():
        try:
            old = yaml.safe_load(legacy.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return  # not a config this project wrote
        if not (isinstance(old, dict) and {"method", "teacher", "train"} <= set(old)):
            return
        config = plain_config
    else:
        return
    unsafe, _ = config_changes(old, config)
    if unsafe:
        raise ConfigError(f"train.output_dir: '{folder}' holds another run ({'; '.join(unsafe)}); nothing was changed. "
                          f"Use another train.output_dir, or delete that folder to replace it")


def write_run_record(folder: Path, config: dict) -> None:
    write_json(Path(folder) / RUN_RECORD, {"config": config})


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _file_print(path: Path) -> str:
    """A file's content hash, or its size and modification time when it is over 64 MB."""
    st = path.stat()
    if st.st_size > 64 << 20:
        return f"{st.st_size}:{st.st_mtime_ns}"
    return _sha256_bytes(path.read_bytes())


def _listing_print(files) -> str:
    return _sha256_bytes(json.dumps(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)).encode())


def data_fingerprint(data_cfg) -> dict:
    """Fingerprints of the run's data: a caption or annotation file's content (size and modification
    time over 64 MB), an image folder's listing (relative path, size and modification time of every
    file, captions included), the shards' or a saved dataset's files, a hub dataset's id and split. A
    change between a run and its resume is an unsafe config difference."""
    out = {}
    for key in ("prompts", "images"):
        spec = getattr(data_cfg, key)
        if spec is None:
            continue
        kind = kind_of(spec, f"data.{key}")
        if kind == "list":
            out[key] = _sha256_bytes(json.dumps(list(spec)).encode())
        elif kind == "hub":
            out[key] = _sha256_bytes(f"{spec}:{data_cfg.split}".encode())
        elif kind == "shards":
            out[key] = _listing_print([Path(f) for f in expand_shards(spec, f"data.{key}")])
        elif kind == "saved":
            out[key] = _listing_print(sorted(p for p in Path(spec).rglob("*") if p.is_file()))
        elif kind == "folder" and key == "images":
            out[key] = folder_fingerprint(list_images(spec))
        elif Path(spec).is_file():
            out[key] = _file_print(Path(spec))
    return out
