"""One rule for every command that writes a folder: it writes only into a folder it created or one
carrying its own marker for the same settings, and refuses anything else in one line before any
work, leaving every byte and mtime of what the user had as it was."""

import json
from pathlib import Path

import pytest
from PIL import Image

from stepdistill.cli import main
from stepdistill.testing.tiny_eval_models import make_tiny_coco, make_tiny_inception, make_tiny_open_clip

ROOT = Path(__file__).resolve().parents[1]
TINY_SD = ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml"


def _users_folder(path: Path) -> dict:
    """A folder as a user might have it: results, captions and an image of their own."""
    (path / "images").mkdir(parents=True)
    (path / "results.json").write_text('{"fid": 12.3}')
    (path / "captions.json").write_text('["my caption"]')
    Image.new("RGB", (8, 8), "red").save(path / "images" / "00000.png")
    return _stamps(path)


def _stamps(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return {"coco": make_tiny_coco(root / "coco", num_images=4), "inception": make_tiny_inception(root / "inc.pt"),
            "clip": make_tiny_open_clip(root / "clip")}


def _argv(command, out, tiny_pipelines, coco, tmp_path):
    sd = tiny_pipelines["sd"]
    if command == "distill":
        return ["distill", "--config", str(TINY_SD), f"teacher.path={sd}", f"train.output_dir={out}"]
    if command == "cache":
        return ["cache", "--config", str(TINY_SD), f"teacher.path={sd}", "--out", str(out)]
    if command == "msd":
        captions = tmp_path / "captions.json"
        captions.write_text(json.dumps(["a red cube", "a blue cube", "two cats", "three cats"]))
        return ["msd", "--config", str(TINY_SD), "--students", "2", "--out", str(out), f"teacher.path={sd}",
                f"data.prompts={captions}"]
    return ["coco30k", "--pipeline", str(sd), "--out", str(out), "--coco-annotations",
            str(coco["coco"] / "annotations" / "captions_val2014.json"), "--coco-images", str(coco["coco"] / "val2014"),
            "--num-captions", "3", "--eval-size", "32", "--inception-weights", str(coco["inception"]), "--clip-model",
            str(coco["clip"]), "--num-inference-steps", "1"]


@pytest.mark.parametrize("command", ["distill", "cache", "msd", "coco30k"])
def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(tmp_path, capsys, tiny_pipelines, coco, command):
    out = tmp_path / "mine"
    before = _users_folder(out)
    assert main(_argv(command, out, tiny_pipelines, coco, tmp_path)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(out) in err[0] and ("did not write" in err[0] or "not a data cache" in err[0]), err
    assert _stamps(out) == before


def test_the_benchmark_refuses_the_users_folder_too(tmp_path, capsys, eval_script):
    out = tmp_path / "mine"
    before = _users_folder(out)
    assert eval_script("benchmark").main(["--suite", "oracle", "--out", str(out)]) == 2
    assert "did not write" in capsys.readouterr().err and _stamps(out) == before


@pytest.mark.parametrize("first,second", [("coco30k", "msd"), ("msd", "distill"), ("distill", "coco30k")])
def test_a_folder_another_command_wrote_is_refused(tmp_path, capsys, tiny_pipelines, coco, first, second):
    from stepdistill.storage import claim_folder

    out = tmp_path / "theirs"
    claim_folder(out, first, {"some": "settings"})
    (out / "work.txt").write_text("made by the first command")
    before = _stamps(out)
    assert main(_argv(second, out, tiny_pipelines, coco, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"holds the output of {first}, not of stepdistill {second}" in err
    assert _stamps(out) == before
