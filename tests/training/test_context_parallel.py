"""Context parallelism (stepdistill/diffusion/context_parallel.py, ``train.context_parallel``): one sample's
tokens split over 2 gloo processes give the one-process network's output and, summed over the processes,
its gradients; a 2-process run with both processes on one sample trains as the one-process run does; bad
settings are refused in one line before any work."""

import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.runs import ROOT, launch
from safetensors.torch import load_file

from stepdistill.config import load_config
from stepdistill.errors import ConfigError
from stepdistill.training.build import validate_inputs

FSDP = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _network(family: str):
    if family == "wan":
        from stepdistill.testing.tiny_pipelines.wan import tiny_wan_transformer

        return tiny_wan_transformer(0).float()
    from stepdistill.testing.tiny_pipelines.flux import tiny_flux_transformer

    return tiny_flux_transformer(0).float()


def _call(family, net, generator):
    """One forward of the family's adapter on fixed inputs (batch 2), and its loss."""
    from stepdistill.diffusion.denoiser import Cond, ModelCall, find_adapter

    g = torch.Generator().manual_seed(generator)
    if family == "wan":
        x, cond = torch.randn(2, 4, 2, 4, 4, generator=g), {"encoder_hidden_states": torch.randn(2, 6, 32, generator=g)}
    else:  # 16-channel latents of 4x4: 4 packed tokens, and 6 text tokens; FLUX.1-dev's embedded guidance
        x = torch.randn(2, 16, 4, 4, generator=g)
        cond = {"encoder_hidden_states": torch.randn(2, 6, 32, generator=g),
                "pooled_projections": torch.randn(2, 32, generator=g)}
    t = torch.tensor([300.0, 700.0])
    guidance = None if family == "wan" else torch.full((2,), 3.5)
    out = find_adapter(net)(net, ModelCall(x, t, t, Cond(cond).kwargs, guidance))
    return out, (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).square().sum()


def _worker(rank, world, port, family, out_dir):
    from stepdistill.diffusion import context_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        net = _network(family)
        with context_parallel.using(context_parallel.build_mesh("cpu", world, world)):
            out, loss = _call(family, net, 1)
            loss.backward()
            try:  # a copy made after the first call would run the original's weights: refused
                _call(family, copy.deepcopy(net), 1)
                copy_refused = False
            except RuntimeError as exc:
                copy_refused = "a copy of a context-parallel" in str(exc)
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        for g in grads.values():
            dist.all_reduce(g)
        if rank == 0:
            torch.save({"out": out.detach(), "grads": grads, "copy_refused": copy_refused}, out_dir / "cp.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # One CI run aborted a worker of this test ("terminate called without an active exception", the message of
    # a C++ thread destroyed while still joinable, as gloo's worker threads are when torn down at interpreter
    # exit); it did not recur in 11 local runs and was not traced further. Leaving without the interpreter's
    # teardown keeps the test about the outputs and gradients; an error above still fails it (mp.spawn
    # re-raises it).
    os._exit(0)


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_split_tokens_give_the_whole_networks_output_and_gradients(tmp_path, family):
    """2 processes, each with half of the tokens (Ulysses attention over gloo): the output equals the
    one-process output, and the gradients summed over the processes equal the one-process gradients; a
    copy of the network made after its first call is refused."""
    mp.spawn(_worker, args=(2, _port(), family, tmp_path), nprocs=2)
    got = torch.load(tmp_path / "cp.pt")
    net = _network(family)
    out, loss = _call(family, net, 1)
    loss.backward()
    assert got["copy_refused"]
    assert torch.allclose(got["out"], out.detach(), atol=1e-5, rtol=1e-5)
    ref = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert got["grads"].keys() == ref.keys()
    for n, g in ref.items():
        assert torch.allclose(got["grads"][n], g, atol=1e-5 * max(1.0, float(g.abs().max())), rtol=1e-4), n


# (config, tiny family, processes, the reference's processes): a group of 2 against one process; two groups
# of 2 against two processes without context parallelism (the same two data streams)
RUNS = [("tiny-wan/dmd2_4step", "wan", 2, 1, []),
        ("tiny-wan/phased_dmd_2step", "wan22", 2, 1, []),  # both experts of the two-expert teacher
        ("tiny-flux/sid_1step", "flux", 2, 1, []),  # the generator's gradient flows through the fake score's input
        ("tiny-flux/progressive_2step", "flux", 2, 1, ["method_args.start_steps=8", "method_args.steps_per_round=2"]),
        ("tiny-wan/lcm_4step", "wan", 4, 2, []),
        ("tiny-wan/sid_1step", "wan", 2, 1, ["train.parallel=ddp"])]  # whole weights on every rank (DDP launch)


@pytest.mark.slow  # 30-90 s each on 2 cores
@pytest.mark.parametrize("config,family,processes,reference,extra", RUNS,
                         ids=["wan-dmd2", "wan22-phased", "flux-sid", "flux-progressive", "wan-lcm-2x2", "wan-sid-ddp"])
def test_context_parallel_groups_train_as_without_them(tmp_path, tiny_pipelines, config, family, processes,
                                                       reference, extra):
    """Groups of 2 FSDP processes sharing each sample (train.context_parallel=2): the logged losses and
    gradient norms equal those of the run with one process per sample (the same global batch) step by
    step, and the student ends as close to it as float reordering allows."""
    common = [f"teacher.path={tiny_pipelines[family]}", "train.max_steps=4", "train.log_every=1",
              "train.validate_every=4", "train.grad_clip=1e6", *extra]
    one, cp = tmp_path / "one", tmp_path / "cp"
    cfg = f"configs/{config}.yaml"
    if reference == 1:
        r = launch(cfg, common + [f"train.output_dir={one}"], python=True)
    else:
        r = launch(cfg, common + [f"train.output_dir={one}"], processes=reference, accelerate_args=FSDP)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = "train.parallel=ddp" in extra
    r = launch(cfg, common + [f"train.output_dir={cp}", "train.context_parallel=2"], processes=processes,
               accelerate_args=None if ddp else FSDP)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "enable_parallelism" in r.stderr  # diffusers' context parallelism was switched on
    h1, h2 = (json.loads((run / "history.json").read_text()) for run in (one, cp))
    # the gradient norms too: without the split, or without the loss scaled by the group size, they would be
    # twice or half the reference's (Adam's updates would hide that from the weights)
    keys = sorted({k for row in h1 for k in row if k.endswith("/loss") or k.endswith("/grad_norm")})
    assert any(k.endswith("grad_norm") for k in keys) and len(h1) == len(h2) == 4
    for a, b in zip(h1, h2):
        assert a.keys() == b.keys()
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    net = "transformer"
    teacher = load_file(tiny_pipelines[family] / net / "diffusion_pytorch_model.safetensors")
    for path in sorted((one / "student").rglob("*.safetensors")):
        w1, w2 = load_file(path), load_file(cp / path.relative_to(one))
        common_keys = [k for k in w1 if k in teacher]
        moved = sum(float((w1[k] - teacher[k]).square().sum()) for k in common_keys) ** 0.5
        apart = sum(float((w1[k] - w2[k]).square().sum()) for k in w1) ** 0.5
        assert apart <= 0.02 * moved + 1e-6, path.name


@pytest.mark.parametrize("overrides,processes,message", [
    (["train.context_parallel=2"], 3, "multiple of 2 (this one has 3)"),
    (["train.context_parallel=2", "train.batch_size=3"], 4, "does not divide by the 2 context-parallel groups"),
    (["train.context_parallel=2", "teacher.path=SD"], 2, "UNet2DConditionModel has no context-parallel plan"),
    (["train.context_parallel=2", "teacher.path=HV"], 2, "HunyuanVideoTransformer3DModel has no context-parallel plan"),
    (["train.context_parallel=2", "teacher.path=FLUX", "method=dmd2", "method_args.gan=true"], 2, "gan=true"),
    (["train.context_parallel=2"], 2, "oracle"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, tiny_pipelines, overrides, processes, message):
    """Before anything is loaded: a launch that is not whole groups, a batch that is not whole groups, a
    family without diffusers' plan, DMD2's GAN head, the oracle; each in one line naming the key."""
    overrides = [o.replace("=SD", f"={tiny_pipelines['sd']}").replace("=FLUX", f"={tiny_pipelines['flux']}")
                 .replace("=HV", f"={tiny_pipelines['hunyuanvideo']}") for o in overrides] + \
        [f"train.output_dir={tmp_path / 'run'}"]
    config = ROOT / "configs" / ("oracle/dmd2_1step.yaml" if message == "oracle" else "tiny-wan/dmd2_4step.yaml")
    if message != "oracle" and not any(o.startswith("teacher.path") for o in overrides):
        overrides.append(f"teacher.path={tiny_pipelines['wan']}")
    cfg = load_config(config, overrides)
    with pytest.raises(ConfigError, match="train.context_parallel|train.batch_size") as err:
        validate_inputs(cfg, processes)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_loaded_teacher_without_a_plan_is_refused(tmp_path, tiny_pipelines):
    """A teacher given by hub id is known only once loaded: the same one line then, before training."""
    from stepdistill.models.teachers import load_teacher
    from stepdistill.training.build import check_context_parallel_teacher

    cfg = load_config(ROOT / "configs" / "tiny-wan" / "dmd2_4step.yaml",
                      [f"teacher.path={tiny_pipelines['wan']}", "train.context_parallel=2"])
    check_context_parallel_teacher(cfg, load_teacher(tiny_pipelines["wan"], device="cpu"))  # Wan has a plan
    with pytest.raises(ConfigError, match=r"^train.context_parallel: UNet2DConditionModel has no context-parallel"):
        check_context_parallel_teacher(cfg, load_teacher(tiny_pipelines["sd"], device="cpu"))


def test_the_families_with_a_plan_are_the_diffusers_networks_with_one():
    """CP_FAMILIES is every adapted diffusers network whose class carries diffusers' ``_cp_plan`` (in this
    diffusers: not HunyuanVideo's, which is refused above)."""
    import diffusers

    from stepdistill.diffusion.context_parallel import CP_FAMILIES
    from stepdistill.diffusion.denoiser import MODEL_ADAPTERS

    planned = {name for name in MODEL_ADAPTERS if getattr(getattr(diffusers, name, None), "_cp_plan", None) is not None}
    assert planned == set(CP_FAMILIES) and "HunyuanVideoTransformer3DModel" in MODEL_ADAPTERS
