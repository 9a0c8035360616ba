"""Runs that survive: atomic, verified checkpoints; preemption by signal; kill -9 at random points;
non-finite losses; resume refusal that names the difference; training state without pickle."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.runs import HELPERS, ROOT, state_files
from safetensors.torch import load_file

from stepdistill.config import ConfigError, load_config
from stepdistill.errors import NonFiniteError
from stepdistill.storage import load_state, save_state
from stepdistill.training import Trainer, checkpoint_problem, config_changes, list_checkpoints

sys.path.insert(0, str(HELPERS))

ORACLE = ["teacher.oracle.components=4", "teacher.oracle.network_steps=50", "train.batch_size=8", "train.report_to=none",
          "train.progress=false", "train.num_validation=8", "train.validate_every=1000"]


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    env.update(extra)
    return env


def _oracle_cfg(out, *extra, method="progressive"):
    return load_config(None, [f"method={method}", *ORACLE, f"train.output_dir={out}", *extra])


# ------------------------------------------------------------------------------------------------
# training state without pickle
# ------------------------------------------------------------------------------------------------
def test_storage_state_round_trip_without_pickle(tmp_path):
    w = torch.randn(3, 4)
    state = {"loop": {"step": 7, "lr": 0.5, "name": "x", "flag": True, "none": None},
             "ema": {"shadow_params": [w, w[0], torch.arange(3)]}, "nested": [{"a": torch.ones(2)}]}
    save_state(state, tmp_path, "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    back = load_state(tmp_path, "s")
    assert back["loop"] == state["loop"]
    assert torch.equal(back["ema"]["shadow_params"][0], w) and torch.equal(back["ema"]["shadow_params"][1], w[0])
    assert back["ema"]["shadow_params"][2].dtype == torch.int64 and torch.equal(back["nested"][0]["a"], torch.ones(2))
    with pytest.raises(TypeError, match="state value at 'bad' has type object"):
        save_state({"bad": object()}, tmp_path, "t")


# ------------------------------------------------------------------------------------------------
# checkpoints: manifest, corrupt ones skipped, limit, resume refusal
# ------------------------------------------------------------------------------------------------
def test_checkpoint_manifest_corruption_and_fallback(tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(_oracle_cfg(out, "train.max_steps=6", "train.checkpoint_every=2", "train.checkpoints_total_limit=2",
                        "train.ema_decay=0.9")).fit()
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["checkpoint-4", "checkpoint-6"]  # the limit kept the newest two
    manifest = json.loads((ckpts[-1] / "manifest.json").read_text())
    assert manifest["step"] == 6 and manifest["config"]["train"]["max_steps"] == 6
    assert {"training_state.json", "training_state.safetensors", "student/diffusion_pytorch_model.safetensors"} <= set(manifest["files"])
    assert "model.safetensors" not in manifest["files"]  # each weight once: in the trainable's own folder
    assert not list(ckpts[-1].glob("*.pkl")) or all(p.name.startswith("random_states") for p in ckpts[-1].glob("*.pkl"))
    assert checkpoint_problem(ckpts[-1]) is None
    # corrupt the newest: one flipped byte, same size
    f = ckpts[-1] / "student/diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert checkpoint_problem(ckpts[-1]) == "student/diffusion_pytorch_model.safetensors does not match its checksum"
    (ckpts[0] / "optimizer.bin").write_bytes(b"")
    assert "optimizer.bin has 0 bytes" in checkpoint_problem(ckpts[0])
    # both broken: a longer run starts over, warning about each; nothing is resumed from a bad file
    trainer = Trainer(_oracle_cfg(out, "train.max_steps=8", "train.checkpoint_every=2", "train.ema_decay=0.9"))
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert trainer.resume() == 0
    assert "skipping checkpoint" in caplog.text and "checkpoint-6" in caplog.text and "checkpoint-4" in caplog.text


def test_checkpoint_student_gives_the_ema_weights_the_run_saves(tmp_path):
    """A checkpoint's student with ema=True is the run's student_ema/ (what the benchmark's curve
    measures for an EMA run), with ema=False its trained weights; an EMA that does not fit is refused."""
    from stepdistill.models.student import Student
    from stepdistill.training.checkpoints import TRAINING_STATE, checkpoint_student

    out = tmp_path / "run"
    Trainer(_oracle_cfg(out, "train.max_steps=3", "train.checkpoint_every=3", "train.ema_decay=0.5",
                        "method_args.lr=1e-2")).fit()
    ckpt = list_checkpoints(out)[-1]
    ema, raw = checkpoint_student(ckpt), checkpoint_student(ckpt, ema=False)
    saved_ema, saved_raw = Student.load(out / "student_ema"), Student.load(out / "student")
    for a, b, c, d in zip(ema.model.parameters(), saved_ema.model.parameters(), raw.model.parameters(),
                          saved_raw.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert any(not torch.equal(a, c) for a, c in zip(ema.model.parameters(), raw.model.parameters()))
    state = load_state(ckpt, TRAINING_STATE)
    state["ema"]["student"]["shadow_params"] = state["ema"]["student"]["shadow_params"][:-1]
    save_state(state, ckpt, TRAINING_STATE)
    with pytest.raises(ConfigError, match="its EMA .* does not match the student's"):
        checkpoint_student(ckpt)


def test_resume_uses_previous_good_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(_oracle_cfg(out, "train.max_steps=4", "train.checkpoint_every=2")).fit()
    newest = list_checkpoints(out)[-1]
    (newest / "training_state.json").unlink()
    trainer = Trainer(_oracle_cfg(out, "train.max_steps=6", "train.checkpoint_every=2"))
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert trainer.resume() == 2
    assert "checkpoint-4: training_state.json is missing" in caplog.text


def test_unfinished_checkpoint_is_invisible(tmp_path):
    out = tmp_path / "run"
    Trainer(_oracle_cfg(out, "train.max_steps=2", "train.checkpoint_every=2")).fit()
    good = list_checkpoints(out)[-1]
    tmp = out / "checkpoints" / "checkpoint-4.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert list_checkpoints(out) == [good]
    assert Trainer(_oracle_cfg(out, "train.max_steps=4", "train.checkpoint_every=2")).resume() == 2


def test_resume_refuses_changed_config_naming_it_and_keeps_files(tmp_path):
    out = tmp_path / "run"
    Trainer(_oracle_cfg(out, "train.max_steps=2", "train.checkpoint_every=2")).fit()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = [("method_args.start_steps=4", "method_args.start_steps: 32 -> 4"),
           ("train.seed=1", "train.seed: 0 -> 1"),
           ("student.num_steps=2", "student.num_steps: 1 -> 2"),
           ("train.batch_size=16", "train.batch_size: 8 -> 16")]
    for override, named in bad:
        with pytest.raises(ConfigError, match="resume: .*checkpoint-2 was written with a different config: " + named):
            Trainer(_oracle_cfg(out, "train.max_steps=4", override)).fit()
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # config.yaml, checkpoints, student: untouched by the refused runs


def test_safe_changes_are_allowed_and_logged(tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(_oracle_cfg(out, "train.max_steps=2", "train.checkpoint_every=2", "train.lr_schedule=cosine")).fit()
    trainer = Trainer(_oracle_cfg(out, "train.max_steps=4", "train.checkpoint_every=2", "train.lr_schedule=cosine",
                                  "method_args.lr=5e-4"))
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert trainer.resume() == 2
    assert "method_args.lr: 0.0001 -> 0.0005" in caplog.text and "train.max_steps: 2 -> 4" in caplog.text
    import math

    lr = trainer.states["student"].optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))  # new base lr, position kept
    trainer.close()
    # the step budget alone changed: the first resumed iteration already runs the new schedule
    trainer = Trainer(_oracle_cfg(out, "train.max_steps=8", "train.checkpoint_every=2", "train.lr_schedule=cosine"))
    assert trainer.resume() == 2
    lr = trainer.states["student"].optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    trainer.close()


def test_learning_rate_schedules_follow_the_loop_step_for_every_trainable(tmp_path):
    """DMD2 updates its student every 3rd step and its fake score every step: both learning rates still
    follow the loop's step (DMD2's own loop), so a linear schedule ends both at zero, and at every
    logged point they stand in the ratio of their base rates."""
    trainer = Trainer(_oracle_cfg(tmp_path / "run", "train.max_steps=6", "train.checkpoint_every=6",
                                  "train.lr_schedule=linear", "method_args.fake_updates=3", "method_args.lr=1e-3",
                                  "method_args.fake_lr=2e-3", method="dmd2"))
    seen = []
    update_once = trainer._update

    def spy(name, iteration, micro):
        seen.append((name, {n: st.optimizer.param_groups[0]["lr"] for n, st in trainer.states.items()}))
        return update_once(name, iteration, micro)

    trainer._update = spy
    trainer.fit()
    assert [p for p, _ in seen].count("student") == 2 and [p for p, _ in seen].count("fake") == 6
    fake_lrs = [lrs["fake"] for p, lrs in seen if p == "fake"]
    assert fake_lrs == pytest.approx([2e-3 * (1 - k / 6) for k in range(6)])
    assert all(lrs["student"] == pytest.approx(lrs["fake"] / 2) for _, lrs in seen)
    assert all(st.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12) for st in trainer.states.values())


def test_config_changes_classifies_keys():
    old = {"method": "dmd2", "train": {"max_steps": 10, "seed": 0}, "optim": {}, "method_args": {"fake_lr": 1e-4}}
    new = {"method": "dmd2", "train": {"max_steps": 20, "seed": 0}, "optim": {"student": {"lr": 1e-5}},
           "method_args": {"fake_lr": 2e-4}}
    unsafe, safe = config_changes(old, new)
    assert unsafe == []
    assert safe == ["method_args.fake_lr: 0.0001 -> 0.0002", "optim.student.lr: None -> 1e-05", "train.max_steps: 10 -> 20"]
    unsafe, _ = config_changes(old, {**new, "method": "sid"})
    assert unsafe == ["method: 'dmd2' -> 'sid'"]


# ------------------------------------------------------------------------------------------------
# non-finite losses and gradients
# ------------------------------------------------------------------------------------------------
def _optimizer_steps(ckpt: Path) -> int:
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    return int(next(iter(state.values()))["step"])


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, where):
    out = tmp_path / "run"
    cfg = _oracle_cfg(out, "train.max_steps=6", "train.checkpoint_every=6", "train.ema_decay=0.9", "train.log_every=1",
                      "method_args.nan_steps=[1, 3]", f"method_args.where={where}", "train.grad_clip=null",
                      method="nan_plugin:NaNInjector")
    Trainer(cfg).fit()
    ckpt = list_checkpoints(out)[-1]
    state = load_state(ckpt, "training_state")
    assert state["loop"]["nonfinite_skipped"] == 2
    assert state["ema"]["student"]["optimization_step"] == 4  # the EMA skipped them too
    assert _optimizer_steps(ckpt) == 4  # 6 steps, 2 updates skipped
    history = json.loads((out / "history.json").read_text())
    assert [h["nonfinite_skipped"] for h in history] == [0, 1, 1, 2, 2, 2]
    weights = load_file(out / "student" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_too_many_nonfinite_in_a_row_stop_with_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = _oracle_cfg(out, "train.max_steps=20", "train.checkpoint_every=2", "train.max_nonfinite_steps=3",
                      "method_args.nan_steps=[1, 4, 5, 6, 7, 8]", method="nan_plugin:NaNInjector")
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 7\).*Last good checkpoint: .*checkpoint-6"):
        Trainer(cfg).fit()
    ckpts = list_checkpoints(out)
    assert ckpts[-1].name == "checkpoint-6" and checkpoint_problem(ckpts[-1]) is None
    assert load_state(ckpts[-1], "training_state")["loop"]["nonfinite_skipped"] == 3  # steps 2, 5, 6 (1-based)
    assert all(torch.isfinite(v).all() for v in load_file(ckpts[-1] / "student" / "diffusion_pytorch_model.safetensors").values())
    assert not (out / "student").exists()


def test_nonfinite_stop_is_one_line_and_exit_4(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train/distill.py"), "--config", str(ROOT / "configs/oracle/progressive_1step.yaml"),
                        "method=nan_plugin:NaNInjector", *ORACLE, "method_args={nan_steps: [0, 1]}",
                        "train.max_nonfinite_steps=2", f"train.output_dir={out}"],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 4, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: 2 steps in a row (up to step 2) had a non-finite")


# ------------------------------------------------------------------------------------------------
# preemption and kill -9
# ------------------------------------------------------------------------------------------------
def _wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before the awaited point:\n{proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


@pytest.mark.slow  # about 30-40 s
def test_sigterm_saves_a_checkpoint_and_exits_3_then_continues(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train/distill.py"), "--config", str(ROOT / "configs/oracle/progressive_1step.yaml"), *ORACLE,
           "train.max_steps=100000", "train.checkpoint_every=100000", f"train.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "config.yaml").is_file(), proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert "received SIGTERM" in err
    (ckpt,) = list_checkpoints(out)
    step = int(ckpt.name.split("-")[1])
    assert 0 < step < 100000 and checkpoint_problem(ckpt) is None
    r = subprocess.run(cmd[:-3] + [f"train.max_steps={step + 3}", "train.checkpoint_every=100000", f"train.output_dir={out}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt} (step {step})" in r.stderr
    assert load_state(list_checkpoints(out)[-1], "training_state")["loop"]["step"] == step + 3


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


def _kill_group(proc, marker: str):
    """SIGKILL the launch and every process of it, as a preempted machine loses them all. torch's
    elastic launcher starts its workers in sessions of their own, outside the launcher's process group,
    so they are found by ``marker`` (their output folder) in their command lines."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while True:
        left = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, marker)]
        if not left:
            return
        if time.time() > deadline:
            raise AssertionError(f"processes {left} of the killed run are still alive")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _cmdline_has(proc_dir: Path, marker: str) -> bool:
    try:
        return marker in (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:  # gone meanwhile
        return False


def _final_state(run: Path) -> dict:
    """Every tensor at the end: the exported student and EMA, and the last checkpoint's model, fake
    score, optimiser, scheduler and training-state files."""
    out = {}
    for folder in ("student", "student_ema"):
        f = run / folder / "diffusion_pytorch_model.safetensors"
        if f.is_file():
            out.update({f"{folder}:{k}": v for k, v in load_file(f).items()})
    out.update(state_files(list_checkpoints(run)[-1]))
    return out


KILL_CASES = [pytest.param("progressive_2step", 1, None, "sd", marks=pytest.mark.slow),
              pytest.param("dmd2_4step", 1, None, "sd", marks=pytest.mark.slow),
              pytest.param("progressive_2step", 2, None, "sd", marks=pytest.mark.slow),
              pytest.param("dmd2_4step", 2, "fsdp", "sd", marks=pytest.mark.slow),
              pytest.param("dmd2_4step", 2, "fsdp", "flux", marks=pytest.mark.slow),  # packed tokens
              pytest.param("dmd2_4step", 2, "fsdp", "wan", marks=pytest.mark.slow)]  # video


@pytest.mark.parametrize("config,processes,accelerate_config,family", KILL_CASES,
                         ids=["progressive", "dmd2", "progressive-ddp", "dmd2-fsdp", "flux-dmd2-fsdp", "wan-dmd2-fsdp"])
def test_kill9_at_random_points_equals_uninterrupted(tmp_path, tiny_pipelines, config, processes, accelerate_config,
                                                     family):
    """SIGKILL (the whole process group) once in the middle of writing a checkpoint and twice at random
    times, re-run the same command each time; the end state equals an uninterrupted run's exactly."""
    rng = random.Random(f"{config}-{processes}")
    common = ["--config", str(ROOT / "configs" / f"tiny-{family}" / f"{config}.yaml"),
              f"teacher.path={tiny_pipelines[family]}",
              "train.report_to=none", "train.progress=false", "train.max_steps=6", "train.checkpoint_every=2",
              "train.validate_every=100", "train.ema_decay=0.9", "train.lr_schedule=cosine", "method_args.lr=1e-3"]
    if accelerate_config:
        head = LAUNCH + ["--config_file", str(ROOT / "configs" / "accelerate" / f"{accelerate_config}.yaml"),
                         "--num_processes", str(processes)]
    else:
        head = LAUNCH + (["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"])
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = subprocess.run(head + [str(ROOT / "train/distill.py"), *common, f"train.output_dir={full}"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = head + [str(HELPERS / "slow_save_distill.py"), *common, f"train.output_dir={cut}"]
    env = _env(SLOW_SAVE_SECONDS="0.5")
    root = cut / "checkpoints"

    def start():
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    # 1: while checkpoint-2 is being written
    proc = start()
    written = ("sharded", ".metadata") if processes > 1 else ("student", "diffusion_pytorch_model.safetensors")
    _wait_for(lambda: (root / "checkpoint-2.tmp").joinpath(*written).is_file(), proc)
    _kill_group(proc, f"train.output_dir={cut}")
    assert list_checkpoints(cut) == []  # the half-written checkpoint is not visible
    # 2 and 3: at random times after a checkpoint became complete
    for after in ("checkpoint-2", "checkpoint-4"):
        proc = start()
        _wait_for(lambda: (root / after / "manifest.json").is_file(), proc)
        time.sleep(rng.uniform(0.0, 1.5))
        _kill_group(proc, f"train.output_dir={cut}")
        assert list_checkpoints(cut) and all(checkpoint_problem(c) is None for c in list_checkpoints(cut))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _final_state(full), _final_state(cut)
    assert a.keys() == b.keys() and len(a) > 10
    assert any(k.startswith(("fake/", "sharded.fake.")) for k in a) == config.startswith("dmd2")  # the fake score is compared too
    assert any(k.startswith("student_ema:") for k in a)
    assert any(k.startswith("optimizer.bin") or ".optim.state." in k for k in a)  # the optimiser state is compared
    for k in a:
        assert torch.equal(a[k], b[k]), k
