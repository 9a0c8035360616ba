"""Several processes (gloo, on the CPU) through FSDP2 (stepdistill/training/parallel.py): DDP and FSDP runs equal
the one-process run with the same global batch, DDP ranks stay identical, FSDP's gathered weights equal
DDP's, and a sharded checkpoint reshards onto another process count, one process included; the same
for the packed (Flux) and video (Wan) families."""

import json
import os
import subprocess

import pytest
import torch
from helpers.runs import LAUNCH, ROOT, env, launch
from safetensors.torch import load_file

from stepdistill.storage import load_state
from stepdistill.training import list_checkpoints

FSDP = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]


def _weights(run, folder="student"):
    return load_file(run / folder / "diffusion_pytorch_model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _distance(a, b):
    """The L2 distance of two weight sets, over all their tensors."""
    assert a.keys() == b.keys()
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a).sqrt())


def _history(run):
    return json.loads((run / "history.json").read_text())


def _fsdp(config, overrides, processes=2):
    return launch(config, overrides, processes=processes, accelerate_args=FSDP)


# DMD2 with 2 micro-batches per update: gradients stay local in the first backward, reduced in the second
CASES = [pytest.param("dmd2_4step", ["train.gradient_accumulation_steps=2"], 1e-5, marks=pytest.mark.slow),  # about 110 s
         pytest.param("dmd2_4step", ["method_args.gan=true", "data.images=GAN_IMAGES"], 1e-5, marks=pytest.mark.slow),
         pytest.param("sid_1step", ["method_args.fake_lora_rank=4"], 2e-4, marks=pytest.mark.slow),
         # LCM's EMA target: averaged shards under FSDP, averaged whole weights under DDP
         pytest.param("lcm_4step", ["method_args.target_decay=0.5"], 1e-5, marks=pytest.mark.slow)]


@pytest.mark.parametrize("config,extra,tol", CASES, ids=["dmd2", "dmd2-gan", "sid-lora-fake", "lcm"])
def test_ddp_and_fsdp_equal_the_one_process_run(tmp_path, tiny_pipelines, config, extra, tol):
    """The same global batch on 1 process, 2 DDP processes and 2 FSDP processes: the logged losses (means
    over the ranks) agree step by step within float tolerance, the DDP ranks hold identical weights after
    every step, the FSDP student's gathered weights are as close to the 1-process run's as DDP's are, and
    the FSDP checkpoint holds each weight as one shard per rank."""
    cfg = f"configs/tiny-sd/{config}.yaml"
    if "data.images=GAN_IMAGES" in extra:  # DMD2's GAN head on captioned real images (its features under FSDP2)
        from stepdistill.testing.data_fixtures import write_image_folder

        extra = [e for e in extra if e != "data.images=GAN_IMAGES"] + [f"data.images={write_image_folder(tmp_path / 'im', 12)}"]
    common = [f"teacher.path={tiny_pipelines['sd']}", "train.max_steps=3", "train.checkpoint_every=3", "train.log_every=1",
              "train.validate_every=3", "train.ema_decay=0.9", "train.lr_schedule=linear", "method_args.lr=1e-3", *extra]
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    r = launch(cfg, common + [f"train.output_dir={one}"], python=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(cfg, common + [f"train.output_dir={ddp}", "train.verify_rank_sync=true"], processes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _fsdp(cfg, common + [f"train.output_dir={fsdp}"])
    assert r.returncode == 0, r.stderr[-3000:]
    h1, h2, h3 = _history(one), _history(ddp), _history(fsdp)
    keys = [k for k in h1[0] if k.endswith("/loss")]
    assert ({"student/loss"} | (set() if config.startswith("lcm") else {"fake/loss"})) <= set(keys)
    for a, b, c in zip(h1, h2, h3):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=tol), (a["step"], k)
                # FSDP reduces and clips shard by shard, a summation order of its own: against the 1-process run
                # within the same margin as DDP (SiD's student loss, a difference of near-equal terms, moves by
                # 2e-5 between any two orders already at step 1)
                assert c[k] == pytest.approx(a[k], rel=1e-4, abs=tol), (a["step"], k)
    # DDP: every step's checksums were gathered from both ranks and equal (the run fails otherwise), and they move
    log = json.loads((ddp / "rank_sync.json").read_text())
    assert [e["step"] for e in log] == [1, 2, 3] and all(e["ranks"] == 2 for e in log)
    assert len({tuple(e["checksums"]) for e in log}) == 3
    # the weights: 2 processes against 1 within float tolerance (the gradient sums are ordered otherwise, and
    # Adam's first steps magnify that on parameters whose gradient is near zero: measured relative to how far
    # training moved them), DDP and FSDP alike, for the student and its EMA
    teacher = load_file(tiny_pipelines["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    for folder in ("student", "student_ema"):
        # (over the teacher's weights: a w-conditioned LCM student has a guidance input the teacher lacks)
        moved = _distance(teacher, {k: v for k, v in _weights(one, folder).items() if k in teacher})
        assert moved > 0.05
        for run in (ddp, fsdp):
            off = _distance(_weights(one, folder), _weights(run, folder))
            assert off < 0.02 * moved, (folder, run.name, off, moved)
    # every schedule ends where it should after max_steps loop iterations with 2 processes: it steps once per
    # iteration, whatever the process count, so a linear one ends at zero, not at zero halfway
    ckpt = list_checkpoints(fsdp)[-1]
    scheds = load_state(ckpt, "training_state")["schedules"]
    assert sorted(scheds) == (["student"] if config.startswith("lcm") else ["fake", "student"])  # one per trainable
    for name, state in scheds.items():
        assert state["last_epoch"] == 3 and float(state["_last_lr"][0]) == pytest.approx(0.0, abs=1e-12), (name, state)
    # the checkpoint is sharded: one file per rank, no whole-weights copy
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # and really sharded, not replicated: each weight of the student is stored as one chunk per rank (a DDP
    # run's replicated weights are one chunk each)
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(ckpt / "sharded").read_metadata().state_dict_metadata
    weights = {k: v for k, v in meta.items() if k.startswith("student.model.") and k.endswith(".weight")}
    assert weights and all(len(v.chunks) == 2 for v in weights.values() if v.size[0] >= 2), \
        sorted((k, len(v.chunks)) for k, v in weights.items())[:5]
    assert not list(ckpt.rglob("*.safetensors")) or all("training_state" in p.name for p in ckpt.rglob("*.safetensors"))


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_three_processes_and_on_one(tmp_path, tiny_pipelines):
    """Stopped after step 2 of 4 on 2 FSDP processes: 3 processes reshard it, and one process gathers it
    into whole weights; both end where the uninterrupted 2-process run ends (to float tolerance)."""
    import shutil

    cfg = "configs/tiny-sd/dmd2_4step.yaml"
    common = [f"teacher.path={tiny_pipelines['sd']}", "train.max_steps=4", "train.checkpoint_every=100",
              "train.validate_every=100", "train.ema_decay=0.9", "train.batch_size=6", "train.lr_schedule=cosine",
              "method_args.lr=1e-3"]
    full, split, single = tmp_path / "full", tmp_path / "split", tmp_path / "single"
    r = _fsdp(cfg, common + [f"train.output_dir={full}"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _fsdp(cfg, ["--stop-after", "2", *common, f"train.output_dir={split}"])
    # every rank exits with status 3; torch's launcher reports a worker's non-zero status as 1
    assert r.returncode != 0 and "stopped at step 2 with a checkpoint" in r.stderr, r.stderr[-3000:]
    shutil.copytree(split, single)
    r = _fsdp(cfg, common + [f"train.output_dir={split}"], processes=3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes: 2 -> 3 (the sharded state reshards" in r.stderr
    r = launch(cfg, common + [f"train.output_dir={single}"], python=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes: 2 -> 1 (the sharded state is gathered into whole weights" in r.stderr
    teacher = load_file(tiny_pipelines["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    for folder in ("student", "student_ema"):  # to float tolerance (3 ranks sum the gradients in another order)
        moved = _distance(teacher, _weights(full, folder))
        assert moved > 0.05
        for run in (split, single):
            assert _distance(_weights(full, folder), _weights(run, folder)) < 0.02 * moved, (folder, run.name)


@pytest.mark.slow  # about 2 minutes each on 2 cores
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_fsdp_on_flux_and_wan_equals_one_process_and_resumes_on_one(tmp_path, tiny_pipelines, family):
    """configs/tiny-flux and configs/tiny-wan DMD2 on 2 FSDP processes (gloo): the logged losses equal the
    one-process run's step by step within float tolerance, the weights are sharded one chunk per rank, the
    gathered student is as close to the one-process student as float reordering allows; a checkpoint of
    the 2-process run, stopped after step 2, resumes on one process and ends where the 2-process run ends."""
    cfg = f"configs/tiny-{family}/dmd2_4step.yaml"
    common = [f"teacher.path={tiny_pipelines[family]}", "train.max_steps=4", "train.checkpoint_every=2",
              "train.log_every=1", "train.validate_every=100", "train.ema_decay=0.9", "train.lr_schedule=linear",
              "method_args.lr=1e-3"]
    one, fsdp, split = tmp_path / "one", tmp_path / "fsdp", tmp_path / "split"
    r = launch(cfg, common + [f"train.output_dir={one}"], python=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _fsdp(cfg, common + [f"train.output_dir={fsdp}"])
    assert r.returncode == 0, r.stderr[-3000:]
    h1, h2 = _history(one), _history(fsdp)
    keys = [k for k in h1[0] if k.endswith("/loss")]
    assert {"student/loss", "fake/loss"} <= set(keys) and len(h1) == len(h2) == 4
    for a, b in zip(h1, h2):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    teacher = load_file(tiny_pipelines[family] / "transformer" / "diffusion_pytorch_model.safetensors")
    for folder in ("student", "student_ema"):
        moved = _distance(teacher, _weights(one, folder))
        assert moved > 0
        assert _distance(_weights(one, folder), _weights(fsdp, folder)) < 0.02 * moved, folder
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(list_checkpoints(fsdp)[-1] / "sharded").read_metadata().state_dict_metadata
    weights = {k: v for k, v in meta.items() if k.startswith("student.model.") and k.endswith(".weight")}
    assert weights and all(len(v.chunks) == 2 for v in weights.values() if v.size[0] >= 2)
    # stopped after step 2 on 2 processes, resumed on one
    r = _fsdp(cfg, ["--stop-after", "2", *common, f"train.output_dir={split}"])
    assert r.returncode != 0 and "stopped at step 2 with a checkpoint" in r.stderr, r.stderr[-3000:]
    r = launch(cfg, common + [f"train.output_dir={split}"], python=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes: 2 -> 1 (the sharded state is gathered into whole weights" in r.stderr
    resumed = {row["step"]: row for row in _history(split)}
    for b in h2[2:]:  # steps 3 and 4, on one process from the 2-process state
        for k in keys:
            if k in b:
                assert resumed[b["step"]][k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (b["step"], k)
    for folder in ("student", "student_ema"):
        moved = _distance(teacher, _weights(fsdp, folder))
        assert _distance(_weights(fsdp, folder), _weights(split, folder)) < 0.02 * moved, folder


def test_an_fsdp_launch_without_cuda_shards(monkeypatch):
    """On the CPU the Accelerator is built with cpu=True and reports MULTI_CPU without an FSDP plugin even
    under an FSDP config; ``train.parallel=auto`` still shards, with the launch's FSDP settings."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from stepdistill.training.parallel import fsdp_plugin, resolve_strategy

    acc = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU, state=SimpleNamespace())
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert resolve_strategy(acc, "auto") == "ddp" and fsdp_plugin(acc) is None
    # what `accelerate launch --config_file configs/accelerate/fsdp.yaml` exports to every process
    for k, v in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
                 "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                 "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock"}.items():
        monkeypatch.setenv(k, v)
    assert resolve_strategy(acc, "auto") == "fsdp"
    assert resolve_strategy(acc, "ddp") == "ddp"  # an explicit strategy wins
    plugin = fsdp_plugin(acc)
    assert plugin.reshard_after_forward is False and list(plugin.transformer_cls_names_to_wrap) == ["BasicTransformerBlock"]
    assert resolve_strategy(SimpleNamespace(num_processes=1), "auto") == "none"


@pytest.mark.slow  # about 60 s
def test_two_nodes_on_localhost_equal_the_two_process_run(tmp_path, tiny_pipelines):
    """configs/accelerate/multinode.yaml as two "nodes" on localhost (machine_rank 0 and 1, one process
    each, gloo): the same run as two processes on one node, loss for loss and weight for weight."""
    cfg = "configs/tiny-sd/dmd2_4step.yaml"
    common = [f"teacher.path={tiny_pipelines['sd']}", "train.max_steps=3", "train.checkpoint_every=3",
              "train.log_every=1", "train.validate_every=3", "train.lr_schedule=linear", "method_args.lr=1e-3",
              "train.report_to=none", "train.progress=false"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    r = launch(cfg, common + [f"train.output_dir={single}"], processes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    port = str(29600 + os.getpid() % 1000)
    nodes = [subprocess.Popen(
        LAUNCH[:3] + ["--config_file", str(ROOT / "configs" / "accelerate" / "multinode.yaml"), "--num_machines", "2",
                      "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                      "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
                      str(ROOT / "train" / "distill.py"), "--config", str(ROOT / cfg), *common,
                      f"train.output_dir={multi}"],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    assert _history(multi) == [{**row, "it_per_s": h["it_per_s"]} for row, h in zip(_history(single), _history(multi))]
    a, b = _weights(single), _weights(multi)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # about a minute on 2 cores
def test_fsdp_two_expert_runs_equal_one_process_when_ranks_route_differently(tmp_path, tiny_pipelines):
    """Wan2.2's two experts (teacher and fake score) under 2 FSDP processes with one row each: the rows of
    the two processes fall on different experts in some calls, and every expert still gathers its shards
    with both processes (one with no rows runs on a row at weight 0), so the run ends and its losses equal
    the one-process run's."""
    cfg = "configs/tiny-wan/phased_dmd_2step.yaml"
    common = [f"teacher.path={tiny_pipelines['wan22']}", "train.max_steps=4", "train.log_every=1",
              "train.validate_every=4", "train.batch_size=2", "method_args.steps_per_phase=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = launch(cfg, common + [f"train.output_dir={one}"], python=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _fsdp(cfg, common + [f"train.output_dir={two}"])
    assert r.returncode == 0, r.stderr[-3000:]
    h1, h2 = _history(one), _history(two)
    keys = sorted({k for row in h1 for k in row if k.endswith("/loss")})
    assert keys and len(h1) == len(h2) == 4
    for a, b in zip(h1, h2):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
