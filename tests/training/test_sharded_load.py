"""Large teachers loaded sharded under FSDP (stepdistill/models/sharded_load.py): on 2 gloo processes the
network built on the meta device and read shard by shard equals the whole load bit for bit (weights,
buffers, dtypes, diffusers' fp32 modules), so do the student and LoRA copies made of it, each rank holds
only its rows; a CPU-offloaded teacher computes what the whole one does; a run launched so equals the old
path loss for loss and weight for weight; and the offload option is refused, in one line, without FSDP."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from helpers.runs import ROOT, env, launch
from safetensors.torch import load_file

FSDP = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]


def _full(module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def _same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b))[:4])
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k].cpu()), (what, k, a[k].dtype, b[k].dtype)


def _worker(rank, world, store, pipelines, errors):
    import torch.distributed as dist

    from stepdistill.diffusion.denoiser import unwrap
    from stepdistill.models.sharded_load import is_meta
    from stepdistill.models.sharding import local
    from stepdistill.models.student import copy_for_training
    from stepdistill.models.teachers import load_teacher
    from stepdistill.training.parallel import Parallel

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        acc = SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu"), is_main_process=rank == 0,
                              mixed_precision="no", state=SimpleNamespace(), distributed_type=None)
        for family, path, dtype in pipelines:
            whole = load_teacher(path, dtype=dtype, device="cpu")
            built = load_teacher(path, dtype=dtype, device="cpu", meta=True)
            assert is_meta(built.denoiser.model), family  # nothing read yet: no whole copy
            parallel = Parallel(acc, "fsdp")
            parallel.shard_teacher(built.denoiser.model, offload=family == "sd")
            net = unwrap(built.denoiser.model)
            assert not is_meta(net)
            # this rank holds its rows only: the largest weight's local part is about 1 / world of it
            big = max(net.parameters(), key=lambda p: p.numel())
            assert local(big).shape[0] == -(-big.shape[0] // world) or rank == world - 1, (family, local(big).shape)
            assert local(big).numel() < big.numel()
            expect = unwrap(whole.denoiser.model).state_dict()
            _same(expect, _full(net), f"{family} teacher")
            # the buffers that are not in the state dict (built by the network itself) too
            _same(dict(unwrap(whole.denoiser.model).named_buffers()), dict(net.named_buffers()), f"{family} buffers")
            if family == "sd":  # offloaded to the CPU, it computes what the whole teacher does
                assert all(local(p).device.type == "cpu" for p in net.parameters())
                x, t = torch.randn(2, *whole.sample_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0, 20.0])
                cond, _ = whole.encode(["a cat", "a dog"])
                with torch.no_grad():
                    assert torch.equal(whole.denoiser(x, t, cond), built.denoiser(x, t, cond))
            for lora in (0, 4):  # a student / fake-score copy, full and LoRA, from the same random state
                torch.manual_seed(7)
                plain = copy_for_training(whole.denoiser.model, lora_rank=lora)
                after_plain = torch.get_rng_state()
                torch.manual_seed(7)
                sharded = copy_for_training(built.denoiser.model, lora_rank=lora)
                assert torch.equal(torch.get_rng_state(), after_plain)  # the same draws, no more, no fewer
                _same(plain.state_dict(), _full(sharded), f"{family} copy lora={lora}")
                trained = {n for n, p in sharded.named_parameters() if p.requires_grad}
                assert trained == {n for n, p in plain.named_parameters() if p.requires_grad}
                assert lora == 0 or all("lora_" in n for n in trained)
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: B902  (reported to the test)
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


@pytest.mark.parametrize("families", [pytest.param(["sd", "wan22"], id="sd-wan22"),
                                      pytest.param(["flux"], id="flux", marks=pytest.mark.slow)])
def test_meta_build_and_sharded_load_equal_the_whole_load(tmp_path, tiny_pipelines, families):
    """sd (a UNet, offloaded to the CPU), wan22 (two experts, a pipeline whose networks are optional
    arguments, held in bf16 with diffusers' fp32 modules) and flux (single and double transformer blocks)
    on 2 gloo processes."""
    dtypes = {"wan22": torch.bfloat16}
    pipelines = [(f, str(tiny_pipelines[f]), dtypes.get(f)) for f in families]
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, 2, tmp_path / "store", pipelines, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    found = [] if errors.empty() else [errors.get()]
    assert not found and all(p.exitcode == 0 for p in procs), found


def test_a_hub_id_is_built_on_the_meta_device_from_its_cached_snapshot(tmp_path, tiny_pipelines, monkeypatch):
    """A teacher given by hub id is read from its snapshot folder in the hub cache (offline here) and built
    on the meta device like a local folder, its weights left in the snapshot's files (it was loaded whole
    before); one not in the cache is one error naming it."""
    import shutil

    import huggingface_hub.constants

    from stepdistill.diffusion.denoiser import unwrap
    from stepdistill.errors import TeacherLoadError
    from stepdistill.models.sharded_load import _FILES, is_meta
    from stepdistill.models.teachers import load_teacher

    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_pipelines["sd"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    teacher = load_teacher("someone/tiny-sd", device="cpu", meta=True)
    net = unwrap(teacher.denoiser.model)
    assert is_meta(net)
    files = set(_FILES[net].files.values())
    assert files == {str(snapshot / "unet" / "diffusion_pytorch_model.safetensors")}
    assert teacher.pipeline.config._name_or_path == "someone/tiny-sd"
    with pytest.raises(TeacherLoadError, match=r"^teacher 'someone/elsewhere' \(hub id"):
        load_teacher("someone/elsewhere", device="cpu", meta=True)


def test_offload_without_fsdp_is_refused_in_one_line(tmp_path, tiny_pipelines):
    """teacher.offload: cpu on one process (and, checked directly, under DDP): one line naming the option,
    before any work (no run folder)."""
    from stepdistill.config import load_config
    from stepdistill.errors import ConfigError
    from stepdistill.training.build import validate_inputs

    out = tmp_path / "run"
    r = launch("configs/tiny-sd/dmd2_4step.yaml", [f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={out}",
                                                   "teacher.offload=cpu"], python=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: teacher.offload: cpu offloads the shards of a sharded teacher, and this run is not sharded (one "
        "process); launch with an accelerate FSDP config (configs/accelerate/fsdp.yaml) or leave teacher.offload at none")
    assert not out.exists()
    cfg = load_config(ROOT / "configs/tiny-sd/dmd2_4step.yaml", [f"teacher.path={tiny_pipelines['sd']}",
                                                                 "teacher.offload=cpu", "train.batch_size=4"])
    with pytest.raises(ConfigError, match=r"not sharded \(train.parallel=ddp\)"):
        validate_inputs(cfg, 2, "ddp")
    validate_inputs(cfg, 2, "fsdp")  # accepted under FSDP


@pytest.mark.slow  # about 2 minutes each: two 2-process runs
@pytest.mark.parametrize("config,losses_of", [("dmd2_4step", {"student/loss", "fake/loss"}),
                                              ("lcm_lora_4step", {"student/loss"}),
                                              ("phased_dmd_2step", {"fake/loss"})], ids=["dmd2", "lcm-lora", "phased-dmd"])
def test_a_run_loaded_sharded_equals_the_old_path(tmp_path, tiny_pipelines, config, losses_of):
    """DMD2 (full student, LoRA fake score), LCM-LoRA (a LoRA student) and Phased DMD (per-phase experts; the
    fake score re-initialised at iteration 1, from its snapshot of shards) on 2 FSDP processes, 3 steps:
    built sharded with the teacher offloaded to the CPU, against built whole and then sharded
    (STEPDISTILL_WHOLE_LOAD=1): the same losses and the same student weights, bit for bit."""
    cfg = f"configs/tiny-sd/{config}.yaml"
    per_phase = ["method_args.steps_per_phase=1"] if config.startswith("phased") else []
    common = [*per_phase, f"teacher.path={tiny_pipelines['sd']}", "train.max_steps=3", "train.checkpoint_every=3", "train.log_every=1",
              "train.validate_every=3", "train.lr_schedule=linear", "method_args.lr=1e-3"]
    old, new = tmp_path / "old", tmp_path / "new"
    r = launch(cfg, common + [f"train.output_dir={old}"], processes=2, accelerate_args=FSDP,
               env_vars=env(STEPDISTILL_WHOLE_LOAD="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(cfg, common + [f"train.output_dir={new}", "teacher.offload=cpu"], processes=2, accelerate_args=FSDP,
               env_vars={k: v for k, v in env().items() if k != "STEPDISTILL_WHOLE_LOAD"})
    assert r.returncode == 0, r.stderr[-3000:]
    h_old, h_new = (json.loads((run / "history.json").read_text()) for run in (old, new))
    losses = [{k: v for k, v in row.items() if k.endswith("/loss")} for row in h_old]
    assert len(losses) == 3 and losses_of <= set(losses[0])
    assert losses == [{k: v for k, v in row.items() if k.endswith("/loss")} for row in h_new]
    name = "lora/adapter_model.safetensors" if "lora" in config else "diffusion_pytorch_model.safetensors"
    a, b = (load_file(run / "student" / name) for run in (old, new))
    if config.startswith("dmd2"):
        teacher = load_file(tiny_pipelines["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
        assert any(not torch.equal(a[k], teacher[k]) for k in a)  # trained
    assert a and any(v.abs().sum() > 0 for v in a.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "offload: cpu" in (new / "config.yaml").read_text()
