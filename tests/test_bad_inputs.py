"""Bad inputs that reach the trainer: each gets one clear error naming what is wrong, raised before
anything is written, and a run folder that already exists is left exactly as it was."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stepdistill.config import ConfigError, load_config
from stepdistill.data import DataError, list_images, load_images, read_prompts
from stepdistill.teachers import TeacherLoadError
from stepdistill.training import Trainer, list_checkpoints
from stepdistill.training.checkpoints import MANIFEST

ORACLE = ["method=progressive", "teacher.oracle.components=4", "teacher.oracle.network_steps=50", "train.batch_size=8",
          "train.report_to=none", "train.progress=false", "train.num_validation=8", "train.validate_every=1000"]


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def existing(tmp_path):
    """A run folder holding a previous run's files, which no failed start may touch."""
    out = tmp_path / "existing"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("method: previous\n")
    (out / "notes.txt").write_text("keep me")
    return out


def _write(tmp_path: Path, name: str, content) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


def _images(tmp_path: Path, corrupt: bool = False) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(folder / f"ok_{i}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


# id, (tmp_path -> overrides), error class, message pattern
CASES = [
    ("prompt-file-empty-line", lambda t: [f"data.prompts={_write(t, 'p.txt', 'a cat' + chr(10) + '   ' + chr(10) + 'a dog')}"],
     DataError, r"p.txt: prompt 2 is empty or not text \('   '\); remove it or set data.skip_bad_items=true"),
    ("prompt-json-not-list", lambda t: [f"data.prompts={_write(t, 'p.json', json.dumps({'a': 1}))}"],
     DataError, r"prompt file '.*p.json' must hold a JSON list of strings"),
    ("prompt-json-invalid", lambda t: [f"data.prompts={_write(t, 'q.json', '[unterminated')}"],
     DataError, r"prompt file '.*q.json' is not valid JSON"),
    ("prompt-json-non-string", lambda t: [f"data.prompts={_write(t, 'r.json', json.dumps(['ok', 3]))}"],
     DataError, r"r.json: prompt 2 is empty or not text \(3\)"),
    ("prompt-file-all-empty", lambda t: [f"data.prompts={_write(t, 's.txt', chr(10) * 3)}", "data.skip_bad_items=true"],
     DataError, r"s.txt: no usable prompts"),
    ("image-folder-missing", lambda t: [f"data.images={t / 'nowhere'}"],
     DataError, r"data.images: image folder '.*nowhere' does not exist"),
    ("image-folder-without-images", lambda t: [f"data.images={(t / 'empty').mkdir() or t / 'empty'}"],
     DataError, r"data.images: image folder '.*empty' holds no images"),
    ("output-dir-is-a-file", lambda t: [f"train.output_dir={_write(t, 'out.txt', 'x')}"],
     ConfigError, r"train.output_dir: '.*out.txt' exists and is not a folder"),
    ("teacher-path-is-a-file", lambda t: ["teacher.oracle=null", f"teacher.path={_write(t, 'model.bin', b'x')}"],
     TeacherLoadError, r"teacher path '.*model.bin' is a file; give a diffusers pipeline folder or hub id"),
    ("teacher-folder-not-a-pipeline", lambda t: ["teacher.oracle=null", f"teacher.path={t}"],
     TeacherLoadError, r"is a folder but has no model_index.json"),
    ("ema-decay-out-of-range", lambda t: ["train.ema_decay=1.5"], ConfigError, r"train.ema_decay: must be in \(0, 1\)"),
    ("export-from-the-oracle", lambda t: ["train.export=true"],
     ConfigError, r"train.export: the Gaussian-mixture oracle \(teacher.oracle\) has no diffusers pipeline"),
    ("shipped-images-unknown", lambda t: ["data.images=stepdistill:mnist-test"],
     DataError, r"data.images 'stepdistill:mnist-test': nothing of that name is shipped"),
    ("checkpoint-limit-zero", lambda t: ["train.checkpoints_total_limit=0"], ConfigError,
     r"train.checkpoints_total_limit: must be >= 1 or null"),
    ("nonfinite-limit-zero", lambda t: ["train.max_nonfinite_steps=0"], ConfigError, r"train.max_nonfinite_steps: must be >= 1"),
    ("accumulation-does-not-divide", lambda t: ["train.gradient_accumulation_steps=3"], ConfigError,
     r"train.batch_size: 8 does not divide by gradient_accumulation_steps 3"),
]


@pytest.mark.parametrize("case,make,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_clear_error_nothing_touched(tmp_path, existing, case, make, exc, match):
    overrides = make(tmp_path)
    before = _snapshot(existing)
    out = [o for o in overrides if o.startswith("train.output_dir=")] or [f"train.output_dir={existing}"]
    with pytest.raises(exc, match=match) as info:
        Trainer(load_config(None, ORACLE + [o for o in overrides if not o.startswith("train.output_dir=")] + out))
    assert "\n" not in str(info.value)
    assert _snapshot(existing) == before


@pytest.mark.parametrize("text,match", [
    ("method: [unclosed", r"config file '.*c.yaml' is not valid YAML"),
    ("- just\n- a list\n", r"config file '.*c.yaml' must hold a mapping at the top level"),
])
def test_bad_config_file(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, "c.yaml", text))
    with pytest.raises(ConfigError, match=r"config file '.*absent.yaml' does not exist"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"override 'train.max_steps' is not key=value"):
        load_config(None, ["train.max_steps"])


def test_unreadable_image_fails_naming_it_or_is_skipped_and_counted(tmp_path, caplog):
    folder = _images(tmp_path, corrupt=True)
    files = list_images(folder)
    with pytest.raises(DataError, match=r"image '.*broken.png' cannot be read \(UnidentifiedImageError\); remove it or "
                                        r"set data.skip_bad_items=true"):
        load_images(files, 8, 3)
    images, kept = load_images(files, 8, 3, skip_bad=True)
    assert images.shape == (3, 3, 8, 8) and [p.name for p in kept] == ["ok_0.png", "ok_1.png", "ok_2.png"]
    assert images.min() >= -1 and images.max() <= 1
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert read_prompts(["a", "", "  ", "b"], skip_bad=True) == ["a", "b"]
    assert "skipped 2 empty or non-text prompts of 4" in caplog.text


def test_resume_with_other_process_count_is_refused(tmp_path):
    out = tmp_path / "run"
    Trainer(load_config(None, ORACLE + [f"train.output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2"])).fit()
    (ckpt,) = list_checkpoints(out)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["num_processes"] = 2  # as if written by a 2-process launch
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"checkpoint-2 was written by 2 processes, this run has 1; .*--num_processes 2"):
        Trainer(load_config(None, ORACLE + [f"train.output_dir={out}", "train.max_steps=4"])).fit()
    assert _snapshot(out) == before


def test_no_pickle_in_our_checkpoint_files(tmp_path):
    out = tmp_path / "run"
    Trainer(load_config(None, ORACLE + [f"train.output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2",
                                        "train.ema_decay=0.9"])).fit()
    (ckpt,) = list_checkpoints(out)
    names = sorted(p.name for p in ckpt.iterdir() if p.is_file())
    # accelerate's own files: weights as safetensors, optimizer/scheduler read back with weights_only=True,
    # RNG states; ours (loop, distiller, EMA) are JSON + safetensors; no custom_checkpoint_*.pkl
    assert not [n for n in names if n.startswith("custom_checkpoint")], names
    assert {"model.safetensors", "training_state.json", "training_state.safetensors", MANIFEST} <= set(names)
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.load(ckpt / name, weights_only=True)
