"""eval/coco30k.py end to end on a tiny COCO-format fixture: 2 accelerate processes, resume without
regenerating, metrics equal to independent computations, and each bad input as one clear line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stepdistill.cli import main
from stepdistill.evaluation import coco30k as coco
from stepdistill.evaluation import fid as F
from stepdistill.evaluation.clip_score import CLIPScorer
from stepdistill.testing.tiny_eval_models import make_tiny_coco, make_tiny_inception, make_tiny_open_clip

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "eval" / "coco30k.py"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco30k")
    return {"coco": make_tiny_coco(root / "coco", num_images=7), "inception": make_tiny_inception(root / "inc.pt"),
            "clip": make_tiny_open_clip(root / "clip")}


def _args(fx, pipeline, out, **over):
    a = {"--pipeline": str(pipeline), "--out": str(out),
         "--coco-annotations": str(fx["coco"] / "annotations" / "captions_val2014.json"),
         "--coco-images": str(fx["coco"] / "val2014"), "--num-captions": "5", "--eval-size": "32",
         "--inception-weights": str(fx["inception"]), "--clip-model": str(fx["clip"]),
         "--num-inference-steps": "2", "--batch-size": "2"}
    a.update(over)
    return [x for k, v in a.items() if v is not None for x in (k, v)]


def coco30k(argv) -> int:
    return main(["coco30k", *argv])


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_processes_then_resume_without_regenerating(fixture, tiny_pipelines, tmp_path):
    out = tmp_path / "out"
    cmd = LAUNCH + ["--multi_gpu", "--num_processes", "2", str(SCRIPT)] + _args(fixture, tiny_pipelines["sd"], out)
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "process 0: generated 3 images (0 already there)" in r.stdout  # captions 0, 2, 4
    assert "process 1: generated 2 images (0 already there)" in r.stdout  # captions 1, 3
    images = sorted((out / "images").iterdir())
    assert [p.name for p in images] == [f"{i:05d}.png" for i in range(5)]
    res = json.loads((out / "results.json").read_text())
    captions = json.loads((out / "captions.json").read_text())
    assert len({c["image_id"] for c in captions}) == 5  # five distinct val2014 images, one caption each

    # the metrics equal independent computations over the same files
    ext = F.load_inception(fixture["inception"])
    gen = F.image_features(images, ext, eval_size=32, verbose=False)
    ref = F.image_features([fixture["coco"] / "val2014" / c["file_name"] for c in captions], ext, eval_size=32, verbose=False)
    expected = F.frechet_distance(*F.statistics(gen), *F.statistics(ref))
    assert res["fid"] > 0 and abs(res["fid"] - expected) <= 1e-6 * expected
    clip = CLIPScorer(str(fixture["clip"]), None).score_files(images, [c["caption"] for c in captions], verbose=False)
    assert abs(res["clip_score"] - clip.mean()) < 1e-6
    assert res["num_images"] == 5 and res["generation"]["num_processes"] == 2
    assert res["fid_protocol"]["eval_size"] == 32 and res["fid_protocol"]["reference_num_images"] == 5
    assert res["clip_protocol"]["clip_prefix"] == "A photo depicts "

    # resume: one image lost; a single-process re-run regenerates only it, bit for bit
    stamps = {p.name: p.stat().st_mtime_ns for p in images}
    ref_stamp = (out / "ref_stats.npz").stat().st_mtime_ns
    lost = (out / "images" / "00003.png").read_bytes()
    (out / "images" / "00003.png").unlink()
    r = subprocess.run([sys.executable, str(SCRIPT)] + _args(fixture, tiny_pipelines["sd"], out), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "process 0: generated 1 images (4 already there)" in r.stdout
    assert (out / "images" / "00003.png").read_bytes() == lost  # seeds are per caption, not per process
    assert {p.name: p.stat().st_mtime_ns for p in images if p.name != "00003.png"} == \
        {k: v for k, v in stamps.items() if k != "00003.png"}
    assert (out / "ref_stats.npz").stat().st_mtime_ns == ref_stamp  # reference statistics reused
    res2 = json.loads((out / "results.json").read_text())
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-9) and res2["clip_score"] == pytest.approx(res["clip_score"])

    # the same folder with other settings, or a reference made at another eval size, is refused
    # before anything is touched
    assert coco30k(_args(fixture, tiny_pipelines["sd"], out, **{"--seed": "7"})) == 2
    assert coco30k(_args(fixture, tiny_pipelines["sd"], tmp_path / "new", **{"--eval-size": "64",
                                                                                 "--ref-stats": str(out / "ref_stats.npz")})) == 2
    assert not (tmp_path / "new").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}.keys() == stamps.keys()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_inputs_fail_early_with_one_line(fixture, tiny_pipelines, tmp_path, monkeypatch, capsys):
    sd = tiny_pipelines["sd"]
    cases = [
        ({"--coco-annotations": str(tmp_path / "missing.json")}, r"--coco-annotations .*missing.json: no such file"),
        ({"--coco-images": str(tmp_path / "nowhere")}, r"--coco-images .*nowhere: no such folder"),
        ({"--coco-images": None}, r"reference statistics .*ref_stats.npz do not exist; pass --coco-images"),
        ({"--inception-weights": str(tmp_path / "inc.pt")}, r"--inception-weights .*inc.pt: no such file"),
        ({"--inception-weights": None}, r"Inception weights not found .* pass --inception-weights PATH"),
        ({"--clip-model": str(tmp_path)}, r"--clip-model .*: no open_clip_config.json"),
        ({"--num-captions": "50"}, r"--num-captions 50 exceeds the 7 captioned images"),
        ({"--pipeline": str(tmp_path / "nopipe")}, r"--pipeline .*nopipe: no such folder"),
        ({"--pipeline": str(fixture["coco"])}, r"--pipeline .*: no model_index.json"),
    ]
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    for over, pattern in cases:
        out = tmp_path / "out"
        assert coco30k(_args(fixture, sd, out, **over)) == 2, over

        assert re.search(pattern, _one_line_error(capsys)), over
        assert not out.exists(), over  # nothing written
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps({"not": "a list"}))
    assert coco30k(_args(fixture, sd, tmp_path / "o2", **{"--coco-annotations": None, "--captions": str(bad)})) == 2
    assert "--captions" in _one_line_error(capsys) and not (tmp_path / "o2").exists()
    one = tmp_path / "one.txt"
    one.write_text("a cat\n")
    assert coco30k(_args(fixture, sd, tmp_path / "o2", **{"--coco-annotations": None, "--captions": str(one)})) == 2
    assert "FID needs at least 2 images" in _one_line_error(capsys)
    # a class-conditional pipeline has no prompt
    assert coco30k(_args(fixture, tiny_pipelines["dit"], tmp_path / "o3")) == 2
    assert "takes no text prompt" in _one_line_error(capsys)
    assert not (tmp_path / "o3" / "images").exists()


def test_caption_draw_is_seeded_and_plain_caption_files_work(fixture, tmp_path):
    ann = fixture["coco"] / "annotations" / "captions_val2014.json"
    a = coco.draw_coco_captions(ann, 4, seed=1)
    assert a == coco.draw_coco_captions(ann, 4, seed=1)
    assert a != coco.draw_coco_captions(ann, 4, seed=2)
    data = json.loads(ann.read_text())
    for row in a:  # every drawn caption is one of that image's captions
        assert row["caption"] in {" ".join(x["caption"].split()) for x in data["annotations"] if x["image_id"] == row["image_id"]}
    txt = tmp_path / "c.txt"
    txt.write_text("a red cat\n  a   blue bus \n")
    assert coco.read_caption_file(txt, 10) == [{"caption": "a red cat"}, {"caption": "a blue bus"}]
    assert coco.read_caption_file(txt, 1) == [{"caption": "a red cat"}]


@pytest.mark.parametrize("bad,where", [("", "line 2"), ("   ", "line 2"), (None, "item 2"), (7, "item 2"),
                                       ({"caption": None}, "item 2")])
def test_empty_or_null_captions_follow_the_training_rule(tmp_path, bad, where):
    """An empty, blank, null or non-text caption is one error naming it, or left out with --skip-bad-captions
    (as data.skip_bad_items does in training), in caption files and in COCO annotations alike."""
    if where.startswith("line"):
        path = tmp_path / "c.txt"
        path.write_text(f"a red cat\n{bad}\na blue bus\n")
    else:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(["a red cat", bad, "a blue bus"]))
    with pytest.raises(coco.EvalError, match=rf"--captions .*c\.(txt|json): {where}: the caption is empty or not text"):
        coco.read_caption_file(path, 10)
    assert [r["caption"] for r in coco.read_caption_file(path, 10, skip_bad=True)] == ["a red cat", "a blue bus"]
    ann = tmp_path / "captions.json"
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)]
    anns = [{"id": 10 + i, "image_id": i, "caption": c} for i, c in enumerate(["a cat", bad if not isinstance(bad, dict)
                                                                             else None, "a bus"])]
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    with pytest.raises(coco.EvalError, match="annotation 11: the caption is empty or not text"):
        coco.draw_coco_captions(ann, 2, seed=0)
    drawn = coco.draw_coco_captions(ann, 2, seed=0, skip_bad=True)  # image 1 has no usable caption left
    assert sorted(r["image_id"] for r in drawn) == [0, 2]
