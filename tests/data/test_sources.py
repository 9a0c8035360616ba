"""Data sources at scale (stepdistill/data/sources.py, loading.py, cache.py) on fixtures built offline:
every source pairs each image with its own caption, large sets are drawn per batch with exact resume,
and the data cache replaces the text encoders and the VAE."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stepdistill.config import DataConfig, load_config
from stepdistill.data.items import read_items
from stepdistill.data.loading import Decoded, transform
from stepdistill.data.sources import read_captions
from stepdistill.errors import DataError, Interrupted
from stepdistill.testing import data_fixtures as fx

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "webdataset": fx.write_webdataset(root / "wds", 1000, 2),
        "webdataset-json": fx.write_webdataset(root / "wdsj", 40, 2, caption_as="json"),
        "saved": str(fx.write_saved_dataset(root / "saved", 60)),
        "saved-labels": str(fx.write_saved_dataset(root / "saved_labels", 30, labels=True)),
        "coco": str(fx.write_coco(root / "coco", 20, 2)),
        "folder": str(fx.write_image_folder(root / "folder", 12)),
        "parquet": str(fx.write_parquet_captions(root / "caps.parquet", 100)),
        "root": root,
    }


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet", "coco", "saved"])
def test_every_caption_format_reads_the_same_captions_in_order(tmp_path, data, fmt):
    n = 50
    want = [fx.caption_of(i) for i in range(n)]
    if fmt == "txt":
        spec = fx.write_caption_lines(tmp_path / "c.txt", n)
    elif fmt == "jsonl":
        spec = tmp_path / "c.jsonl"
        spec.write_text("".join(json.dumps({"caption": c, "other": 1}) + "\n" for c in want))
    elif fmt == "csv":
        import csv

        spec = tmp_path / "c.csv"
        with open(spec, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "text"])
            w.writerows([[i, c] for i, c in enumerate(want)])
    elif fmt == "parquet":
        spec = fx.write_parquet_captions(tmp_path / "c.parquet", n)
    elif fmt == "coco":
        spec = fx.write_coco(tmp_path / "coco", n, 1)
        want = [f"{c} view 0" for c in want]
    else:
        import datasets

        datasets.Dataset.from_dict({"prompt": want}).save_to_disk(str(tmp_path / "saved"))
        spec = tmp_path / "saved"
    caps = read_captions(str(spec), DataConfig())
    assert len(caps) == n and caps.take(range(n)) == want
    assert caps.fingerprint


def test_a_bad_caption_row_is_named_or_skipped_and_a_missing_column_is_named(tmp_path, caplog):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"caption": c}) + "\n" for c in ["one", "  ", "three", None]))
    with pytest.raises(DataError, match=r"c.jsonl: prompt 2 is empty or not text \('  '\); remove it or set "
                                        r"data.skip_bad_items=true"):
        read_captions(str(path), DataConfig())
    caps = read_captions(str(path), DataConfig(), skip_bad=True)
    assert caps.take(range(len(caps))) == ["one", "three"]
    assert "skipped 2 empty or non-text prompts of 4" in caplog.text
    with pytest.raises(DataError, match=r"no column 'title' \(data.caption_column\); the source has \['caption'\]"):
        read_captions(str(path), DataConfig(caption_column="title"))
    with pytest.raises(DataError, match=r"webdataset shard '.*nothing-000.tar' does not exist \(2 of 2 missing\)"):
        read_items(DataConfig(images=str(tmp_path / "nothing-{000..001}.tar")), True, None)


@pytest.mark.parametrize("source", ["webdataset", "webdataset-json", "saved", "coco", "folder"])
def test_every_image_source_pairs_each_image_with_its_own_caption(data, source):
    """Item i's pixels are the image its caption names (the fixture's item k: its caption starts
    with k; items keep the source's order; COCO: image k holds captions 2k and 2k + 1)."""
    items = read_items(DataConfig(images=data[source]), True, None)
    decoded = Decoded(items, 16, 3, "center", 0, False)
    g = torch.Generator().manual_seed(0)
    for i in torch.randint(0, len(items), (8,), generator=g).tolist():
        pixels = decoded[i][0]
        caption = items.captions[i]
        k = int(caption.split()[0])  # the fixture's item number leads its caption
        if source == "coco":
            assert caption == f"{fx.caption_of(i // 2)} view {i % 2}"
            k = i // 2
        else:
            assert caption == fx.caption_of(k) and (k == i or source == "folder")  # a folder lists 0, 1, 10, 11, ...
        torch.testing.assert_close(pixels, transform(fx.image_of(k), 16, 3, "center")[0], rtol=0, atol=1e-6)


def test_class_labels_come_from_the_label_column_and_are_range_checked(data):
    items = read_items(DataConfig(images=data["saved-labels"]), False, 10)
    assert items.labels.tolist() == [i % 10 for i in range(30)]
    with pytest.raises(DataError, match=r"item 6 has label 5, outside 0..4"):
        read_items(DataConfig(images=data["saved-labels"]), False, 5)


def test_class_labelled_images_get_their_labels_prompt_for_a_text_teacher(tmp_path, data):
    items = read_items(DataConfig(images=data["saved-labels"], label_prompt="a photo of the digit {label}"), True, None)
    assert [items.captions[i] for i in range(12)] == [f"a photo of the digit {i % 10}" for i in range(12)]
    for label in ("cat", "dog"):
        (tmp_path / "classes" / label).mkdir(parents=True)
        fx.image_of(0).save(tmp_path / "classes" / label / "0.png")
    items = read_items(DataConfig(images=str(tmp_path / "classes"), label_prompt="a {label}"), True, None)
    assert items.captions.take(range(2)) == ["a cat", "a dog"]
    with pytest.raises(DataError, match=r"no caption column among .* or give class-labelled items a data.label_prompt"):
        read_items(DataConfig(images=data["saved-labels"]), True, None)


def test_random_crops_are_fixed_per_item_and_record_their_corner():
    im = fx.image_of(3, 24).resize((40, 24))
    a = transform(im, 16, 3, "random", torch.Generator().manual_seed(5))
    b = transform(im, 16, 3, "random", torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and a[1] == (24, 40) and a[2] == b[2]
    tops_lefts = {transform(im, 16, 3, "random", torch.Generator().manual_seed(s))[2] for s in range(20)}
    assert len(tops_lefts) > 1 and all(t == 0 and 0 <= l <= 10 for t, l in tops_lefts)  # noqa: E741


def _trainer(tiny, out, *extra):
    from stepdistill.training import Trainer

    cfg = load_config("configs/tiny-sd/dmd2_4step.yaml", [
        f"teacher.path={tiny['sd']}", f"train.output_dir={out}", "train.report_to=none", "train.progress=false",
        "method_args.gan=true", "train.validate_every=1000", "train.checkpoint_every=2", *extra])
    return Trainer(cfg)


@pytest.mark.parametrize("source,prompts", [("webdataset", "parquet"), ("saved", None), ("coco", None)])
def test_dmd2_gan_real_rows_are_conditioned_on_their_own_captions(tmp_path, tiny_pipelines, data, source, prompts,
                                                                   record_gan_logits):
    """DMD2's classifier sees each real image with its own caption, whatever the source; generation
    prompts come from the prompt file (or, without one, from the drawn items' captions)."""
    extra = [f"data.images={data[source]}", f"data.prompts={data[prompts] if prompts else 'null'}", "data.num_workers=0"]
    trainer = _trainer(tiny_pipelines, tmp_path / "run", *extra)
    src = trainer.source
    drawn = []
    if src.real is not None:
        latents = src.real.latents
        src.real.latents = lambda key, idx, noise: (drawn.append(idx.clone()), latents(key, idx, noise))[1]
    with record_gan_logits() as calls:
        batch = src.batch(0, 0, 4)
        trainer.distiller.loss(batch, 0, "fake")
    (_, cond_fake), (x_real, cond_real) = calls
    items = read_items(trainer.cfg.data, True, None)
    if src.real is not None:
        idx = drawn[0].tolist()
    else:  # the in-memory path: find each row in the table of encoded items
        idx = [int(((src.x0_data - x_real[r]).flatten(1).abs().amax(1) == 0).nonzero()[0]) for r in range(4)]
    own = trainer.teacher.encode([items.captions[i] for i in idx])[0].kwargs["encoder_hidden_states"]
    torch.testing.assert_close(cond_real.kwargs["encoder_hidden_states"], own)
    if prompts is None:  # the batch's prompts are the drawn items' own captions
        torch.testing.assert_close(cond_fake.kwargs["encoder_hidden_states"], own)
    else:
        assert batch.prompts[0] in set(read_captions(data[prompts], DataConfig()).take(range(100)))
        assert not torch.allclose(cond_fake.kwargs["encoder_hidden_states"], own)
    before = {k: v.clone() for k, v in trainer.distiller.student.denoiser.model.state_dict().items()}
    trainer.fit()
    moved = sum((v - before[k]).abs().sum().item() for k, v in trainer.distiller.student.denoiser.model.state_dict().items())
    assert moved > 0 and (tmp_path / "run" / "student").is_dir()


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert out, f"no weights in {folder}"
    return out


def test_a_large_set_resumed_sees_the_batches_of_an_uninterrupted_run_with_or_without_workers(tmp_path, tiny_pipelines,
                                                                                              data):
    """Webdataset shards (1,000 pairs) on the per-batch path: 4 steps with 2 prefetching workers equal 2
    steps without workers, stopped, then resumed for 2 more: the same items, the same weights."""
    wds = [f"data.images={data['webdataset']}", f"data.prompts={data['parquet']}", "train.max_steps=4"]
    a = _trainer(tiny_pipelines, tmp_path / "a", *wds, "data.num_workers=2")
    a.fit()
    b = _trainer(tiny_pipelines, tmp_path / "b", *wds, "data.num_workers=0")
    with pytest.raises(Interrupted):
        b.fit(stop_after=2)
    b = _trainer(tiny_pipelines, tmp_path / "b", *wds, "data.num_workers=1")  # a resume-safe change
    b.fit()
    wa, wb = _weights(tmp_path / "a" / "student"), _weights(tmp_path / "b" / "student")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _cache_cmd(cfg_args, out, *more):
    return [sys.executable, "-m", "stepdistill", "cache", "--config", str(ROOT / "configs/tiny-sd/dmd2_4step.yaml"),
            "--out", str(out), *more, *cfg_args]


@pytest.mark.slow  # about 24 s
def test_the_data_cache_replaces_the_encoders_and_is_refused_for_another_teacher(tmp_path, tiny_pipelines, data):
    from stepdistill.data.cache import DataCache

    args = [f"teacher.path={tiny_pipelines['sd']}", f"data.images={data['webdataset-json']}",
            f"data.prompts={data['parquet']}", "data.num_workers=0"]
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(_cache_cmd(args, cache, "--shard-rows", "16"), check=True, env=env, cwd=ROOT, capture_output=True)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and len(list((cache / "prompts").glob("*.safetensors"))) == 7  # 100 / 16
    assert len(list((cache / "items").glob("*.safetensors"))) == 3  # 40 / 16

    trainer = _trainer(tiny_pipelines, tmp_path / "run", *args[1:], f"data.cache={cache}")
    src, teacher = trainer.source, trainer.teacher
    items = read_items(trainer.cfg.data, True, None)
    prompts = read_captions(data["parquet"], DataConfig())
    reference = DataCache(cache)

    def refuse(*a, **k):
        raise AssertionError("the text encoder or the VAE ran although the data cache holds every state")

    enc, enc_img = teacher.encode, teacher.encode_images
    teacher.encode, teacher.encode_images = refuse, refuse
    try:
        batch = src.batch(3, 0, 4)
    finally:
        teacher.encode, teacher.encode_images = enc, enc_img
    idx = src.item_rows(3, 0, 4, 0, 4)
    torch.testing.assert_close(batch.x0, reference.latents(idx))
    want = teacher.encode([items.captions[i] for i in idx.tolist()])[0].kwargs["encoder_hidden_states"]
    torch.testing.assert_close(batch.x0_cond.kwargs["encoder_hidden_states"], want, rtol=1e-5, atol=1e-5)
    want = teacher.encode(batch.prompts)[0].kwargs["encoder_hidden_states"]
    torch.testing.assert_close(batch.cond.kwargs["encoder_hidden_states"], want, rtol=1e-5, atol=1e-5)
    assert set(batch.prompts) <= set(prompts.take(range(len(prompts))))

    # a teacher with other VAE weights: its cache key differs, the cache is refused with one line
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_sd"
    shutil.copytree(tiny_pipelines["sd"], other)
    vae = next((other / "vae").glob("*.safetensors"))
    save_file({k: v + 0.01 for k, v in load_file(vae).items()}, vae)
    with pytest.raises(DataError, match=r"data.cache: '.*cache' was made for other data or another teacher "
                                        r"\(teacher: '[0-9a-f]+' -> '[0-9a-f]+'\)"):
        _trainer({"sd": other}, tmp_path / "run2", *args[1:], f"data.cache={cache}")


@pytest.mark.slow  # about 31 s
def test_caching_killed_midway_resumes_without_re_encoding_finished_shards(tmp_path, tiny_pipelines, data):
    args = [f"teacher.path={tiny_pipelines['sd']}", f"data.images={data['webdataset']}", "data.num_workers=0"]
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_cache_cmd(args, cache, "--shard-rows", "8"), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((cache / "items").glob("*.safetensors"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (cache / "items").glob("*.safetensors")}
    assert 3 <= len(finished) < 125 and not json.loads((cache / "manifest.json").read_text())["complete"]
    subprocess.run(_cache_cmd(args, cache), check=True, env=env, cwd=ROOT, capture_output=True)
    after = {p.name: p.stat().st_mtime_ns for p in (cache / "items").glob("*.safetensors")}
    assert len(after) == 125 and all(after[name] == t for name, t in finished.items())  # kept, not re-encoded
    assert json.loads((cache / "manifest.json").read_text())["complete"]
    assert not list(cache.rglob("*.tmp*"))


def test_a_streamed_source_resumed_sees_the_batches_of_an_uninterrupted_run(tmp_path, tiny_pipelines, data):
    """data.streaming over webdataset shards, a 64-item shuffle window: 6 steps straight equal 3 steps,
    stopped (mid-window), then resumed; the stream position is in the checkpoint."""
    wds = [f"data.images={data['webdataset']}", "data.streaming=true", "data.shuffle_buffer=64", "data.prompts=null",
           "train.max_steps=6", "train.checkpoint_every=3", "train.batch_size=6"]
    a = _trainer(tiny_pipelines, tmp_path / "a", *wds)
    seen = []
    fetch = a.source.stream.fetch
    a.source.stream.fetch = lambda key, n, g: (seen.append(key), fetch(key, n, g))[1]
    a.fit()
    b = _trainer(tiny_pipelines, tmp_path / "b", *wds)
    with pytest.raises(Interrupted):
        b.fit(stop_after=3)
    state = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint-3" / "training_state.json").read_text())
    assert state["streams"][0]["pos"] == 18 % 64 and state["streams"][0]["world"] == 1
    b = _trainer(tiny_pipelines, tmp_path / "b", *wds)
    b.fit()
    wa, wb = _weights(tmp_path / "a" / "student"), _weights(tmp_path / "b" / "student")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len({k for k in seen if k[0] >= 0}) == 6  # one stream read per step, whatever the updates


@pytest.mark.slow  # about 85 s: three 2-process launches
def test_two_processes_streaming_resume_exactly(tmp_path, tiny_pipelines, data):
    """2 processes (gloo), each streaming its own shard: 4 steps straight equal 2 steps, stopped, and
    resumed; the checkpoint holds both ranks' positions. (Another process count is refused before any
    work: a 2-process checkpoint on 1 process by the sharded-state check, the stream positions by count.)"""
    from helpers.runs import launch

    common = [f"teacher.path={tiny_pipelines['sd']}", f"data.images={data['webdataset']}", "data.streaming=true",
              "data.shuffle_buffer=32", "data.prompts=null", "method_args.gan=true", "train.max_steps=4",
              "train.checkpoint_every=2", "train.validate_every=1000", "train.batch_size=4"]
    cfg = "configs/tiny-sd/dmd2_4step.yaml"
    r = launch(cfg, common + [f"train.output_dir={tmp_path / 'a'}"], processes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(cfg, common + [f"train.output_dir={tmp_path / 'b'}", "--stop-after", "2"], processes=2)
    assert r.returncode != 0 and (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir(), r.stderr[-3000:]
    state = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint-2" / "training_state.json").read_text())
    assert [s["rank"] for s in state["streams"]] == [0, 1] and all(s["pos"] == 4 for s in state["streams"])
    r = launch(cfg, common + [f"train.output_dir={tmp_path / 'b'}"], processes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    wa, wb = _weights(tmp_path / "a" / "student"), _weights(tmp_path / "b" / "student")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
