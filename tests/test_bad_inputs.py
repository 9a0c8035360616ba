"""Bad inputs that reach the trainer: each gets one clear error naming what is wrong, raised before
anything is written, and a run folder that already exists is left exactly as it was."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stepdistill.config import ConfigError, load_config
from stepdistill.data.files import list_images, load_images, read_prompts
from stepdistill.errors import DataError, InputError
from stepdistill.models.teachers import TeacherLoadError
from stepdistill.storage import load_state
from stepdistill.training import Trainer, list_checkpoints, validate_inputs
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


def _users_folder(tmp_path: Path) -> Path:
    (tmp_path / "mine").mkdir()
    return _write(tmp_path / "mine", "notes.txt", "the user's").parent


def _images(tmp_path: Path, corrupt: bool = False) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(folder / f"ok_{i}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


LATIN1 = "a caf\u00e9 sign".encode("latin-1")  # not UTF-8

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
    # numbers out of range (each reached torch, or ran silently, before)
    ("grad-clip-negative", lambda t: ["train.grad_clip=-1"], ConfigError, r"train.grad_clip: must be > 0, got -1.0"),
    ("grad-clip-zero", lambda t: ["train.grad_clip=0"], ConfigError, r"train.grad_clip: must be > 0, got 0.0"),
    ("lr-nan", lambda t: ["method_args.lr=nan"], ConfigError, r"method_args.lr: must be a finite number, got nan"),
    ("lr-negative", lambda t: ["method_args.lr=-1e-4"], ConfigError, r"method_args.lr: must be > 0, got -0.0001"),
    ("optim-lr-inf", lambda t: ["optim.student.lr=inf"], ConfigError, r"optim.student.lr: must be a finite number, got inf"),
    ("guidance-nan", lambda t: ["method_args.guidance_scale=.nan"], ConfigError,
     r"method_args.guidance_scale: must be a finite number"),
    ("guidance-negative", lambda t: ["method_args.guidance_scale=-2"], ConfigError,
     r"method_args.guidance_scale: must be >= 0, got -2.0"),
    ("warmup-negative", lambda t: ["train.lr_warmup_steps=-5"], ConfigError, r"train.lr_warmup_steps: must be >= 0, got -5"),
    ("seed-negative", lambda t: ["train.seed=-1"], ConfigError, r"train.seed: must be >= 0, got -1"),
    ("weight-decay-negative", lambda t: ["train.weight_decay=-0.1"], ConfigError, r"train.weight_decay: must be >= 0"),
    ("betas-out-of-range", lambda t: ["optim.student.betas=[0.9, 1.5]"], ConfigError,
     r"optim.betas: must be two numbers in \[0, 1\), got \[0.9, 1.5\]"),
    ("lora-alpha-zero", lambda t: ["student.lora_alpha=0"], ConfigError, r"student.lora_alpha: must be > 0, got 0.0"),
    ("oracle-std-zero", lambda t: ["teacher.oracle.std=0"], ConfigError, r"teacher.oracle.std: must be > 0, got 0.0"),
    ("pool-size-zero", lambda t: ["method_args.pool_size=0"], ConfigError, r"method_args.pool_size: must be >= 1, got 0"),
    ("dropout-above-one", lambda t: ["method=sid", "method_args.prompt_dropout=1.5"], ConfigError,
     r"method_args.prompt_dropout: must be <= 1, got 1.5"),
    ("fake-lora-alpha-negative", lambda t: ["method=dmd2", "method_args.fake_lora_alpha=-1"], ConfigError,
     r"method_args.fake_lora_alpha: must be > 0"),
    ("gan-weight-negative", lambda t: ["method=dmd2", "method_args.gan_gen_weight=-1"], ConfigError,
     r"method_args.gan_gen_weight: must be >= 0"),
    # student.timesteps outside the process range: one check, one message, for every method
    ("timesteps-above-range", lambda t: ["student.timesteps=[1000]"], ConfigError,
     r"student.timesteps: 1000 is outside the teacher's range \[0, 999\] \(diffusers timesteps of its scheduler\)"),
    ("timesteps-below-range-dmd2", lambda t: ["method=dmd2", "student.timesteps=[-5]"], ConfigError,
     r"student.timesteps: -5 is outside the teacher's range \[0, 999\]"),
    ("timesteps-above-range-sid", lambda t: ["method=sid", "student.timesteps=[1500]"], ConfigError,
     r"student.timesteps: 1500 is outside"),
    ("timesteps-flow-zero", lambda t: ["method=dmd2", "teacher.oracle.process=flow", "student.timesteps=[0.0]"],
     ConfigError, r"student.timesteps: 0 is outside the teacher's range \[0, 1\] \(flow times t, 0 excluded\)"),
    # files and folders
    ("prompt-file-not-utf8", lambda t: [f"data.prompts={_write(t, 'latin.txt', LATIN1)}"],
     DataError, r"prompt file '.*latin.txt' is not UTF-8 text"),
    ("prompt-file-is-a-folder", lambda t: [f"data.prompts={t}"], DataError, r"prompt file '.*' is a folder, not a file"),
    ("images-is-a-file", lambda t: [f"data.images={_write(t, 'one.png', b'x')}"], DataError,
     r"image folder '.*one.png' is a file, not a folder"),
    ("output-dir-under-a-file", lambda t: [f"train.output_dir={_write(t, 'blocker', 'x')}/run"], ConfigError,
     r"train.output_dir: cannot create '.*blocker/run' \(NotADirectoryError"),
    ("output-dir-a-system-folder", lambda t: ["train.output_dir=/proc/self"], InputError,
     r"train.output_dir: '/proc/self' holds files stepdistill distill did not write"),
    ("output-dir-a-users-folder", lambda t: [f"train.output_dir={_users_folder(t)}"],
     InputError, r"train.output_dir: '.*mine' holds files stepdistill distill did not write \(notes.txt\)"),
    ("caption-missing-for-one-image", lambda t: [f"data.images={_captioned(t, missing=1)}"], DataError,
     r"image '.*1.png' has no caption \('1.txt' is missing\) while other images have one"),
    ("plugin-not-a-distiller", lambda t: ["method=json:JSONDecoder"], ConfigError,
     r"method: plug-in 'json:JSONDecoder' is not a subclass of stepdistill.distillers.Distiller"),
    ("override-bad-key", lambda t: ["train..seed=1"], ConfigError, r"override 'train..seed=1': 'train..seed' is not a dotted key"),
    ("override-bad-yaml", lambda t: ["train.seed=[1"], ConfigError, r"train.seed: '\[1' is not valid YAML"),
    ("override-empty-text", lambda t: ["train.output_dir="], ConfigError, r"train.output_dir: expected a string, got None"),
    # data sources (stepdistill/data/sources.py)
    ("webdataset-shard-missing", lambda t: [f"data.images={t}/shards-{{000..002}}.tar"], DataError,
     r"data.images: webdataset shard '.*shards-000.tar' does not exist \(3 of 3 missing\)"),
    ("caption-column-missing", lambda t: [f"data.prompts={_parquet(t)}", "data.caption_column=title"], DataError,
     r"no column 'title' \(data.caption_column\); the source has \['caption', 'id'\]"),
    ("coco-not-coco", lambda t: [f"data.images={_write(t, 'c.json', json.dumps({'images': []}))}"], DataError,
     r"a COCO caption file holds an 'annotations' list"),
    ("image-root-without-coco", lambda t: [f"data.images={_captioned(t)}", f"data.image_root={t}"], DataError,
     r"data.image_root: names the image folder of a COCO caption file"),
    ("streaming-an-image-folder", lambda t: [f"data.images={_captioned(t)}", "data.streaming=true"], DataError,
     r"data.streaming: '.*captioned' is read by index, not streamed"),
    ("streaming-with-a-cache", lambda t: [f"data.images={t}/a.tar", "data.streaming=true", f"data.cache={t}"],
     ConfigError, r"data.cache: a data cache is read by index"),
    ("caption-file-as-images", lambda t: [f"data.images={_write(t, 'c.txt', 'a cat')}"], DataError,
     r"data.images: '.*c.txt' is a caption file, not images"),
    # a student started from a saved network (student.init), and teacher score matching (method tsm)
    ("student-init-missing", lambda t: [f"student.init={t / 'nowhere'}"], ConfigError,
     r"student.init: '.*nowhere' is not a model folder \(it has no config.json\)"),
    ("student-init-other-class", lambda t: [f"student.init={_model_folder(t, 'UNet2DModel')}"], ConfigError,
     r"student.init: '.*unet' holds a UNet2DModel; the teacher's network is a MLPDenoiser"),
    ("student-init-and-architecture", lambda t: [f"student.init={t}", "student.architecture={hidden: 8}"], ConfigError,
     r"student.architecture: the student starts from student.init \('.*'\), whose folder gives its network; "
     r"drop student.architecture"),
    ("tsm-of-the-teacher-itself", lambda t: ["method=tsm"], ConfigError,
     r"method tsm trains a student that differs from the teacher: set student.architecture"),
    ("disback-nodes-at-the-path-end", lambda t: ["method=disback", "method_args.degradation_steps=3", "method_args.path_nodes=3"],
     ConfigError, r"method_args.path_nodes \(3\) must be below method_args.degradation_steps \(3\)"),
    ("disback-no-backtracking-left", lambda t: ["method=disback", "method_args.degradation_steps=20", "train.max_steps=20"],
     ConfigError, r"method_args.degradation_steps \(20\) leaves no iterations of train.max_steps \(20\)"),
    # DisBack started from a trained DMD2 run's fake score (method_args.fake_init)
    ("disback-fake-init-missing", lambda t: [*DISBACK, f"method_args.fake_init={t / 'nowhere'}"], ConfigError,
     r"method_args.fake_init: '.*nowhere' does not exist"),
    ("disback-fake-init-not-a-fake-score", lambda t: [*DISBACK, f"method_args.fake_init={_users_folder(t)}"], ConfigError,
     r"method_args.fake_init: '.*mine' is neither a fake-score folder \(a model folder with config.json\) nor a run "
     r"folder with fake_score/"),
    ("disback-fake-init-no-weights", lambda t: [*DISBACK, f"method_args.fake_init={_model_folder(t, 'MLPDenoiser')}"],
     ConfigError, r"method_args.fake_init: '.*unet' holds no diffusion_pytorch_model.safetensors"),
    ("disback-fake-init-other-class", lambda t: [*DISBACK, f"method_args.fake_init={_weights(_model_folder(t, 'UNet2DModel'))}"],
     ConfigError, r"method_args.fake_init: '.*unet' holds a UNet2DModel; the teacher's network is a MLPDenoiser"),
    ("disback-fake-init-lora", lambda t: [*DISBACK, f"method_args.fake_init={_weights(_model_folder(t, 'MLPDenoiser'))}",
                                          "method_args.fake_lora_rank=4"], ConfigError,
     r"method_args.fake_lora_rank: the fake score takes the whole network saved in method_args.fake_init"),
]


DISBACK = ["method=disback", "method_args.degradation_steps=2", "method_args.path_nodes=1"]


def _weights(folder: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def _model_folder(tmp_path: Path, class_name: str) -> Path:
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


def _parquet(tmp_path: Path) -> Path:
    from stepdistill.testing.data_fixtures import write_parquet_captions

    return write_parquet_captions(tmp_path / "caps.parquet", 5)


def _captioned(tmp_path: Path, missing: int | None = None) -> Path:
    folder = tmp_path / "captioned"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
        if i != missing:
            (folder / f"{i}.txt").write_text(f"a square number {i}")
    return folder


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
    with pytest.raises(ConfigError, match=r"checkpoint-2 was written by 2 processes by an earlier version .*cannot "
                                          r"continue it with 1"):
        Trainer(load_config(None, ORACLE + [f"train.output_dir={out}", "train.max_steps=4"])).fit()
    assert _snapshot(out) == before


def test_no_pickle_in_our_checkpoint_files(tmp_path):
    out = tmp_path / "run"
    Trainer(load_config(None, ORACLE + [f"train.output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2",
                                        "train.ema_decay=0.9"])).fit()
    (ckpt,) = list_checkpoints(out)
    names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    # accelerate's own files: optimizer/scheduler read back with weights_only=True, RNG states; ours: the
    # weights as safetensors, loop, distiller and EMA as JSON + safetensors; no custom_checkpoint_*.pkl
    assert not [n for n in names if n.startswith("custom_checkpoint")], names
    assert {"student/diffusion_pytorch_model.safetensors", "training_state.json", "training_state.safetensors", MANIFEST} <= set(names)
    assert [n for n in names if n.endswith(".pkl")] == ["random_states_0.pkl"]
    torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert set(load_state(ckpt, "training_state")["schedules"]) == {"student"}  # schedules are our own state


EDITS = [
    (lambda m: [m], "is malformed"),  # a list instead of a mapping
    (lambda m: {k: v for k, v in m.items() if k != "config"}, "is malformed"),  # a key removed
    (lambda m: None, "is malformed"),  # null
    (lambda m: {**m, "files": {k: {"size": "big"} for k in m["files"]}}, "is malformed"),
    (lambda m: {**m, "files": {k: v for k, v in list(m["files"].items())[1:]}}, "is not in the manifest"),  # unlisted file
]


def test_a_hand_edited_manifest_makes_its_checkpoint_unverified_not_a_crash(tmp_path, caplog):
    """A manifest that is not what this project writes (a list, missing keys, null, bad entries, a file it
    does not list) is skipped with a warning naming why; the previous checkpoint is resumed. One run,
    each edit on a copy of its folder."""
    import shutil

    trained = tmp_path / "trained"
    Trainer(load_config(None, ORACLE + [f"train.output_dir={trained}", "train.max_steps=4", "train.checkpoint_every=2",
                                        "train.checkpoints_total_limit=null"])).fit()
    for i, (edit, problem) in enumerate(EDITS):
        out = tmp_path / f"run{i}"
        shutil.copytree(trained, out)
        ckpt = out / "checkpoints" / "checkpoint-4"
        manifest = json.loads((ckpt / MANIFEST).read_text())
        (ckpt / MANIFEST).write_text(json.dumps(edit(manifest)))
        caplog.clear()
        trainer = Trainer(load_config(None, ORACLE + [f"train.output_dir={out}", "train.max_steps=6"]))
        with caplog.at_level("WARNING", logger="stepdistill"):
            assert trainer.resume() == 2, problem
        trainer.close()
        assert f"skipping checkpoint {ckpt}" in caplog.text and problem in caplog.text, (i, caplog.text)


def test_command_line_values_take_the_fields_type(tmp_path):
    """`key=value` is read by the field's declared type: text fields keep the text (YAML 1.1 would read
    `no` as false), numbers and lists their YAML value."""
    cfg = load_config(None, ORACLE + ["train.mixed_precision=no", "train.report_to=none", "method_args.lr=3e-4",
                                      "data.prompts=[yes, no]", "method=progressive"])
    assert cfg.train.mixed_precision == "no" and cfg.data.prompts == ["yes", "no"]
    assert validate_inputs(cfg) and cfg.method == "progressive"
    from stepdistill.config import from_dict
    from stepdistill.distillers.sid import SiD

    opt = from_dict(SiD.Options, load_config(None, ORACLE + ["method=sid", "method_args.guidance_mode=none",
                                                             "method_args.alpha=1"]).method_args, "method_args")
    assert opt.guidance_mode == "none" and opt.alpha == 1.0


def test_a_changed_prompt_file_between_run_and_resume_is_refused(tmp_path):
    prompts = _write(tmp_path, "p.txt", "a cat\na dog\n")
    out = tmp_path / "run"
    cfg = ORACLE + [f"train.output_dir={out}", "train.checkpoint_every=2", f"data.prompts={prompts}"]
    Trainer(load_config(None, cfg + ["train.max_steps=2"])).fit()
    prompts.write_text("a cat\na horse\n")
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"different config: data_fingerprint.prompts: '[0-9a-f]+' -> '[0-9a-f]+'"):
        Trainer(load_config(None, cfg + ["train.max_steps=4"])).fit()
    assert _snapshot(out) == before


def test_config_file_that_is_not_utf8_or_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*bad.yaml' is not UTF-8 text"):
        load_config(_write(tmp_path, "bad.yaml", LATIN1))
    with pytest.raises(ConfigError, match=r"config file '.*' is a folder, not a file"):
        load_config(tmp_path)


def test_unreadable_images_of_every_kind_are_skipped_when_asked(tmp_path):
    folder = _images(tmp_path)
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes((folder / "ok_0.png").read_bytes()[:40])
    images, kept = load_images(list_images(folder), 8, 3, skip_bad=True)
    assert [p.name for p in kept] == ["ok_0.png", "ok_1.png", "ok_2.png"]
    with pytest.raises(DataError, match=r"image '.*empty.png' cannot be read"):
        load_images(list_images(folder), 8, 3)


def _run(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


def test_command_line_tools_give_one_line_errors(tmp_path):
    """Bad options of the distill, export and fid commands: exit status 2 and one line naming them."""
    r = _run("train/distill.py", "--config", "configs/oracle/progressive_1step.yaml", "--stop-after", "0")
    assert r.returncode == 2 and "--stop-after must be >= 1, got 0" in r.stderr
    r = _run("-m", "stepdistill", "fid", "calc", str(tmp_path), "--ref", str(tmp_path / "r.npz"), "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size must be positive, got 0" in r.stderr
    import numpy as np

    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan]), sigma=np.eye(2), meta=np.array("{}"))
    from stepdistill.evaluation.fid import EvalError, load_stats

    with pytest.raises(EvalError, match=r"nan.npz: the statistics hold non-finite values"):
        load_stats(tmp_path / "nan.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(2), meta=np.array("{}"))
    with pytest.raises(EvalError, match=r"shape.npz: mu has shape \(3,\) and sigma \(2, 2\)"):
        load_stats(tmp_path / "shape.npz")
    r = _run("-m", "stepdistill", "fid", "calc", str(tmp_path), "--ref", str(tmp_path / "r.npz"), "--eval-size", "-5")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: --eval-size must be >= 0 (0: crop only), got -5"


@pytest.mark.parametrize("sigma,message", [
    ([[1.0, 0.5], [0.0, 1.0]], "it is not symmetric"),
    ([[1.0, 0.0], [0.0, -1.0]], "it has a negative eigenvalue"),
    ([[1.0, 2.0], [2.0, 1.0]], "it has a negative eigenvalue"),  # symmetric, eigenvalues 3 and -1
])
def test_fid_statistics_whose_sigma_is_no_covariance_are_refused(tmp_path, sigma, message):
    """Such statistics would give a negative FID; they are refused in one line naming the file."""
    import numpy as np

    from stepdistill.evaluation.fid import EvalError, load_stats

    np.savez(tmp_path / "ref.npz", mu=np.zeros(2), sigma=np.array(sigma), meta=np.array("{}"))
    with pytest.raises(EvalError, match=rf"ref.npz: sigma is not a covariance \({message}"):
        load_stats(tmp_path / "ref.npz")
    np.savez(tmp_path / "ok.npz", mu=np.zeros(2), sigma=np.cov(np.random.default_rng(0).normal(size=(50, 2)).T),
             meta=np.array("{}"))
    load_stats(tmp_path / "ok.npz")  # a real covariance passes


def test_export_of_damaged_run_files_is_one_line(tmp_path):
    from stepdistill.errors import ExportError
    from stepdistill.export import export

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "config.yaml").write_bytes(b"teacher: [unclosed")
    with pytest.raises(ExportError, match=r"'.*config.yaml' cannot be read \(ScannerError|ParserError"):
        export(run, tmp_path / "out")
    (run / "config.yaml").write_text("teacher: {path: somewhere}\n")
    (run / "student" / "student_config.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"'.*student_config.json' cannot be read \(JSONDecodeError"):
        export(run, tmp_path / "out")
    (run / "student" / "student_config.json").write_text(json.dumps({"method": "x", "sampler": "nope", "timesteps": [1]}))
    with pytest.raises(ExportError, match=r"student_config.json' is not a student config \(sampler 'nope'"):
        export(run, tmp_path / "out")
    blocker = _write(tmp_path, "blocker", "x")
    with pytest.raises(ExportError, match=r"export destination '.*blocker/out': its folder cannot be created"):
        export(run, blocker / "out")
    assert not (tmp_path / "out").exists()


def test_coco30k_refuses_bad_numbers_before_loading_anything(tmp_path):
    import argparse

    from stepdistill.evaluation import coco30k as coco

    parser = argparse.ArgumentParser()
    coco.add_arguments(parser)
    captions = _write(tmp_path, "c.txt", "a cat\na dog\n")
    for flag, value, message in [("--batch-size", "0", "--batch-size must be positive, got 0"),
                                 ("--num-inference-steps", "-1", "--num-inference-steps must be positive, got -1"),
                                 ("--eval-size", "-3", "--eval-size must be >= 0"),
                                 ("--guidance-scale", "nan", "--guidance-scale must be a finite number >= 0")]:
        args = parser.parse_args(["--pipeline", str(tmp_path), "--out", str(tmp_path / "o"), "--captions", str(captions),
                                  flag, value])
        with pytest.raises(coco.EvalError, match=message):
            coco.prepare(args)
