"""The machine failing under a command: a disk that fills up during a checkpoint, an export or a data
cache, a read-only folder, and SIGTERM in a phase without checkpoints. Each ends in one line and a
known exit status (1: the machine, 2: the input, 3: stopped), with the earlier state intact and the
same command able to go on once the machine is fixed.

A small disk is a tmpfs mounted by the test, which needs root (CAP_SYS_ADMIN); where mounting is not
allowed these tests are skipped, saying so."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepdistill.training import checkpoint_problem, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ["--config", str(ROOT / "configs" / "oracle" / "progressive_1step.yaml"), "teacher.oracle.components=4",
          "teacher.oracle.network_steps=50", "teacher.oracle.hidden=32", "train.batch_size=8", "train.report_to=none",
          "train.progress=false", "train.num_validation=8", "train.validate_every=1000", "method_args.start_steps=2",
          "train.checkpoint_every=2"]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "stepdistill", *args], capture_output=True, text=True, cwd=ROOT,
                          env=_env(), timeout=timeout)


def _errors(r) -> list[str]:
    """The command's error lines; a traceback anywhere fails (progress bars and log records may stand
    beside the one error line)."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs at tmp_path/disk, unmounted at the end."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}): the disk-full and read-only "
                    f"cases need root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` but ``leave`` bytes (rounded to pages); returns the filler to delete later."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 20))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        f.flush()
    while True:  # the last partial write may sit in the buffer: shrink until the disk has room again
        try:
            os.truncate(filler, max(0, filler.stat().st_size - leave))
            break
        except OSError:
            continue
    return filler


def _stamps(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(small_disk):
    run = small_disk / "run"
    r = _run("distill", *ORACLE, f"train.output_dir={run}", "train.max_steps=4", "--stop-after", "2")
    assert r.returncode == 3, r.stderr[-2000:]
    (good,) = list_checkpoints(run)
    kept = _stamps(good)
    filler = _fill(small_disk, leave=150_000)  # a checkpoint needs about 400 KB
    r = _run("distill", *ORACLE, f"train.output_dir={run}", "train.max_steps=4")
    assert r.returncode == 1, r.stderr[-2000:]
    (line,) = _errors(r)
    assert line.startswith("error: ") and "No space left on device" in line
    assert list_checkpoints(run) == [good] and checkpoint_problem(good) is None and _stamps(good) == kept
    filler.unlink()  # the machine is fixed: the same command goes on from checkpoint-2
    r = _run("distill", *ORACLE, f"train.output_dir={run}", "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [c.name for c in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"] and (run / "student").is_dir()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old", ".del"))]


@pytest.mark.slow  # the checkpoint case runs by default; the mechanism (storage.writing) is the same
def test_a_disk_that_fills_during_an_export_leaves_nothing_behind(small_disk, tmp_path, tiny_pipelines):
    run = tmp_path / "run"
    r = _run("distill", "--config", str(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml"),
             f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={run}", "train.max_steps=1",
             "train.report_to=none", "train.progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    filler = _fill(small_disk, leave=200_000)  # the tiny pipeline needs more than that
    r = _run("export", str(run), str(small_disk / "out"))
    assert r.returncode == 1, r.stderr[-2000:]
    (line,) = _errors(r)
    assert "No space left on device" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no half-written folder, no temporary
    filler.unlink()
    assert _run("export", str(run), str(small_disk / "out")).returncode == 0
    assert (small_disk / "out" / "model_index.json").is_file()


@pytest.mark.slow
def test_a_disk_that_fills_during_caching_keeps_the_finished_shards(small_disk, tmp_path, tiny_pipelines):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([f"a photo of a cat number {i}" for i in range(12)]))
    args = ["--config", str(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml"), f"teacher.path={tiny_pipelines['sd']}",
            f"data.prompts={prompts}", "--shard-rows", "2"]
    reference = tmp_path / "reference"
    assert _run("cache", *args, "--out", str(reference)).returncode == 0
    shard = (reference / "prompts" / "00000.safetensors").stat().st_size
    filler = _fill(small_disk, leave=3 * shard + 40_000)  # room for a few shards, not for six
    cache = small_disk / "cache"
    r = _run("cache", *args, "--out", str(cache))
    assert r.returncode == 1, r.stderr[-2000:]
    (line,) = _errors(r)
    assert "No space left on device" in line
    finished = _stamps(cache / "prompts")
    assert finished and not json.loads((cache / "manifest.json").read_text())["complete"]
    filler.unlink()
    assert _run("cache", *args, "--out", str(cache)).returncode == 0
    after = _stamps(cache / "prompts")
    assert len(after) == 6 and all(after[k] == v for k, v in finished.items())  # finished shards not encoded again


@pytest.mark.parametrize("command", ["distill", pytest.param("cache", marks=pytest.mark.slow),
                                     pytest.param("export", marks=pytest.mark.slow)])
def test_a_read_only_folder_is_one_line_and_nothing_is_written(small_disk, tmp_path, tiny_pipelines, command):
    if command == "export":
        run = tmp_path / "run"
        assert _run("distill", "--config", str(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml"),
                    f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={run}", "train.max_steps=1",
                    "train.report_to=none", "train.progress=false").returncode == 0
    (small_disk / "kept.txt").write_text("the user's")
    before = _stamps(small_disk)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    if command == "distill":
        r = _run("distill", *ORACLE, f"train.output_dir={small_disk / 'run'}", "train.max_steps=2")
        expected = (2, "train.output_dir")
    elif command == "cache":
        r = _run("cache", "--config", str(ROOT / "configs" / "tiny-sd" / "dmd2_4step.yaml"),
                 f"teacher.path={tiny_pipelines['sd']}", "--out", str(small_disk / "cache"))
        expected = (1, "Read-only file system")
    else:
        r = _run("export", str(tmp_path / "run"), str(small_disk / "out"))
        expected = (2, "not writable")
    assert r.returncode == expected[0], r.stderr[-2000:]
    (line,) = _errors(r)
    assert line.startswith("error: ") and expected[1] in line
    assert _stamps(small_disk) == before


@pytest.mark.parametrize("phase,args,wait_for", [
    ("the oracle network's fit", [*ORACLE, "teacher.oracle.network_steps=10000000", "train.max_steps=2"], None),
    ("the loop, after a checkpoint", [*ORACLE, "train.max_steps=100000"], "checkpoints/checkpoint-2"),
])
def test_sigterm_in_any_phase_ends_with_status_3(tmp_path, phase, args, wait_for):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "stepdistill", "distill", *args, f"train.output_dir={run}"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    marker = run / (wait_for or ".stepdistill.json")
    while not marker.exists():
        assert proc.poll() is None and time.time() - t0 < 300, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the phase
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-2000:]
    assert "stopped" in err and "re-run" in err.replace("re-running", "re-run")
