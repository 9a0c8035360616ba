#!/usr/bin/env python
"""Peak memory of one training iteration on the full-size SD1.5 and SDXL UNets, under the memory
options, with a breakdown.

    python eval/memory.py [--model sd15|sdxl] [--latent 32] [--cases NAME,...] [--out runs/memory]
                          [--processes N]             # N FSDP processes (configs/accelerate/fsdp.yaml)
    python eval/memory.py --list                         # the cases

The UNet is built from the public ``unet/config.json`` values of SD1.5 (320/640/1280/1280, cross-
attention 768: 859.5M parameters) or SDXL (2.57B) with random weights, offline, inside a Stable
Diffusion pipeline whose text encoders and VAE are small stand-ins of the right widths (they hold no
share of the memory that matters). Each case runs in a fresh process: the distill config of its recipe
(``configs/sd15/<method>.yaml``, SDXL's ``configs/sdxl/dmd2_4step.yaml``) with the case's options, two
iterations of the real loop, and it reports

- peak memory over the two iterations: CUDA ``max_memory_allocated`` on a GPU, the peak resident set
  (VmHWM, reset after the build) on the CPU; and the peak while building (networks whole, before sharding);
- weights: every distinct parameter and buffer of every network (teacher, student, fake score,
  encoders), at their dtypes;
- gradients: the largest trainable's trained parameters at the trainable dtype (one trainable's
  gradients live at a time: each update clears them);
- optimiser state: every tensor the optimisers hold after their first step;
- activations and the rest: peak minus the memory after the build, minus optimiser state and
  gradients (on the CPU this includes the allocator's slack);
- the second iteration's time.

On the CPU the latents default to 32x32 (SD1.5's native is 64x64, SDXL's 128x128): weights, gradients
and optimiser state do not depend on the latent size, activations grow about linearly with the number
of latent pixels times the batch, so the table also gives the projection to the native size (x4 for
SD1.5 at 64x64 from 32x32). With ``--processes N`` each case runs under FSDP on N processes (student,
fake score and teacher sharded, ``stepdistill/training/parallel.py``) and every column is per process: the
largest over the ranks, each counting its own shards; ``--batch`` is then the batch of each process.

``--simulate N`` measures one rank of an N-process FSDP run in a single process: rank 0 of a world of N
over torch's fake process group, whose collectives move no data (this machine cannot hold N processes
of SDXL). Every tensor the rank holds has its real size (its 1/N shards, the gathered blocks, its
gradients and optimiser state), so the memory figures are those of one rank; the values are not (an
all-gather fills the other ranks' parts with copies of this rank's shard, a reduce-scatter keeps this
rank's part of its own gradients), and the iteration time has no communication in it. The peak is
reported twice: while building (``build_peak_gb``: each network whole before it is sharded, as every
rank of a real run holds it) and over the training iterations alone (``peak_gb``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
                 freq_shift=0)

# name: (method config, overrides); every case also runs at --batch
CASES = {
    "dmd2-full-full-fp32": ("sd15/dmd2_1step", ["train.trainable_dtype=fp32", "train.gradient_checkpointing=false", "train.mixed_precision=no"]),
    "dmd2-full-lora-fp32-ckpt": ("sd15/dmd2_1step", ["method_args.fake_lora_rank=64", "train.trainable_dtype=fp32",
                                                "train.gradient_checkpointing=true"]),
    "dmd2-full-lora-bf16-ckpt": ("sd15/dmd2_1step", ["method_args.fake_lora_rank=64", "train.trainable_dtype=bf16",
                                                "train.gradient_checkpointing=true"]),
    "dmd2-full-lora-bf16-ckpt-8bit": ("sd15/dmd2_1step", ["method_args.fake_lora_rank=64", "train.trainable_dtype=bf16",
                                                     "train.gradient_checkpointing=true", "train.optimizer=adamw8bit"]),
    "dmd2-full-full-bf16-ckpt": ("sd15/dmd2_1step", ["train.trainable_dtype=bf16", "train.gradient_checkpointing=true"]),
    "dmd2-full-full-bf16-ckpt-8bit": ("sd15/dmd2_1step", ["train.trainable_dtype=bf16", "train.gradient_checkpointing=true",
                                                     "train.optimizer=adamw8bit"]),
    "dmd2-lora-lora-bf16-ckpt": ("sd15/dmd2_1step", ["student.lora_rank=64", "method_args.fake_lora_rank=64",
                                                "train.trainable_dtype=bf16", "train.gradient_checkpointing=true"]),
    # a LoRA student and a LoRA fake score in fp32: adapters of the teacher's one network (the default,
    # train.shared_lora_base) against a whole copy of the network under each (docs/RESULTS.md, "One frozen base")
    "dmd2-lora-lora-fp32": ("sd15/dmd2_1step", ["student.lora_rank=64", "method_args.fake_lora_rank=64", "teacher.dtype=fp32",
                                           "train.trainable_dtype=fp32", "train.gradient_checkpointing=false", "train.mixed_precision=no"]),
    "dmd2-lora-lora-fp32-copies": ("sd15/dmd2_1step", ["student.lora_rank=64", "method_args.fake_lora_rank=64",
                                                  "teacher.dtype=fp32", "train.trainable_dtype=fp32",
                                                  "train.gradient_checkpointing=false", "train.mixed_precision=no", "train.shared_lora_base=false"]),
    "sid-full-lora-bf16-ckpt": ("sd15/sid_1step", ["method_args.fake_lora_rank=64", "train.trainable_dtype=bf16",
                                              "train.gradient_checkpointing=true"]),
    "vsd-full-lora-bf16-ckpt": ("sd15/vsd_1step", ["train.trainable_dtype=bf16", "train.gradient_checkpointing=true"]),
    "progressive-full-bf16-ckpt": ("sd15/progressive_4step", ["train.trainable_dtype=bf16", "train.gradient_checkpointing=true",
                                                         "method_args.pool_size=2", "method_args.pool_steps=2"]),
    # SDXL's recipe (4 steps, backward simulation, CFG 8; without the GAN head, which needs real images)
    "dmd2-4step-full-full-bf16-ckpt": ("sdxl/dmd2_4step", ["train.trainable_dtype=bf16", "train.gradient_checkpointing=true"]),
}


def build_pipeline(model: str, folder: Path, latent: int) -> Path:
    """A StableDiffusion(XL)Pipeline folder with the full-size UNet (random weights, seed 0; its
    ``sample_size``, the latent side the runs use, changes no weight) and small text encoders and VAE of
    the widths the UNet expects."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stepdistill.testing.tiny_pipelines import TINY_FAMILIES

    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    TINY_FAMILIES["sd" if model == "sd15" else "sdxl"](tmp)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp)

    def encoder(hidden: int, projection: int | None):
        tok = pipe.tokenizer
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                             num_attention_heads=8, max_position_embeddings=tok.model_max_length,
                             projection_dim=projection or hidden, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()

    torch.manual_seed(0)
    if model == "sd15":
        pipe.register_modules(unet=UNet2DConditionModel(**{**SD15_UNET, "sample_size": latent}),
                              text_encoder=encoder(768, None))
    else:
        pipe.register_modules(unet=UNet2DConditionModel(**{**SDXL_UNET, "sample_size": latent}), text_encoder=encoder(768, None),
                              text_encoder_2=encoder(1280, 1280))
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _tensor_bytes(tensors) -> int:
    """Distinct storage behind the tensors (a sharded parameter: this rank's shard)."""
    import torch

    from stepdistill.models.sharding import local

    def leaves(t):  # a tensor subclass (torchao's 8-bit optimiser state): the plain tensors it holds
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                yield from leaves(getattr(t, name))
        else:
            yield t

    seen, total = set(), 0
    for t in (leaf for x in tensors if x is not None for leaf in leaves(local(x))):
        if not hasattr(t, "untyped_storage"):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def simulate_world(size: int) -> None:
    """This process as rank 0 of ``size`` (``--simulate``): torch's fake process group, entered before the
    Accelerator is built (it then takes the group's world size), with FSDP's two collectives filling their
    outputs with this rank's data, so that the networks compute finite numbers on the gathered blocks."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                      ACCELERATE_USE_FSDP="true", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # accelerate would give 1 / size of the cores
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def all_gather_single(output, input, *args, **kwargs):
        output.view(size, -1).copy_(input.reshape(1, -1).expand(size, -1))  # every rank's part: this rank's shard
        return gather(output, input, *args, **kwargs)

    def reduce_scatter_single(output, input, *args, **kwargs):
        output.view(-1).copy_(input.view(size, -1)[0])  # this rank's part of its own gradients
        return scatter(output, input, *args, **kwargs)

    dist.all_gather_single, dist.reduce_scatter_single = all_gather_single, reduce_scatter_single


def _reset_peak() -> bool:
    """Reset the process's peak resident set (VmHWM) to its current size (Linux ``clear_refs`` 5), after
    handing the heap the build freed (the whole copies of sharded networks) back to the system: glibc
    keeps freed heap memory resident, which would count toward the training peak though no tensor
    holds it."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_one(spec: dict) -> dict:
    """One case, in this (fresh) process."""
    import torch

    from stepdistill.config import load_config
    from stepdistill.diffusion.denoiser import unwrap
    from stepdistill.models.sharding import local
    from stepdistill.training import Trainer

    cuda = torch.cuda.is_available()
    simulated = spec.get("simulate", 1)
    if simulated > 1:
        simulate_world(simulated)
    base_kib = _rss_kib("VmRSS")
    config, overrides = CASES[spec["case"]]
    cfg_path = ROOT / "configs" / f"{config}.yaml"  # the method's recipe; the teacher is the case's
    out = Path(spec["out"]) / "runs" / f"{spec['model']}-{spec['case']}-b{spec['batch']}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    world = max(spec.get("processes", 1), simulated)
    cfg = load_config(cfg_path, [f"teacher.path={spec['pipeline']}", f"train.output_dir={out}", "train.report_to=none",
                                 "train.progress=false", f"train.batch_size={spec['batch'] * world}", "train.max_steps=2",
                                 "train.ema_decay=null", "data.prompts=[a photo of a cat, a red car]", *overrides])
    trainer = Trainer(cfg)
    side = trainer.teacher.sample_shape[-1]
    build_peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    elif not _reset_peak():
        build_peak = None  # VmHWM cannot be reset: the peak below is the whole process's
    built_kib = _rss_kib("VmRSS")
    built_cuda = torch.cuda.memory_allocated() if cuda else 0
    micro = spec["batch"]  # per process
    times = []
    for it in range(2):
        t0 = time.perf_counter()
        trainer._iteration(it, micro, {})
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    nets = [m for m in trainer.teacher.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    nets += [unwrap(st.module) for st in trainer.states.values()]
    weights = _tensor_bytes(t for m in nets for t in list(m.parameters()) + list(m.buffers()))
    grads = max(sum(local(p).numel() * p.element_size() for p in st.params) for st in trainer.states.values())
    optim = _tensor_bytes(v for st in trainer.states.values() for s in st.optimizer.state.values()
                          for v in s.values() if torch.is_tensor(v))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        activations = peak - built_cuda - optim - grads
    else:
        peak = _rss_kib("VmHWM") * 1024
        activations = peak - built_kib * 1024 - optim - grads
    acc = trainer.accelerator
    if acc.num_processes > 1 and simulated == 1:  # per process: the largest over the ranks
        both = torch.tensor([peak, weights, grads, optim, activations, times[-1]], dtype=torch.float64, device=acc.device)
        peak, weights, grads, optim, activations, last = acc.gather(both[None]).reshape(-1, 6).max(0).values.tolist()
        times[-1] = last
    trainer.close()
    if acc.is_main_process:
        shutil.rmtree(out, ignore_errors=True)
    params = {n: sum(p.numel() for p in unwrap(st.module).parameters()) for n, st in trainer.states.items()}
    skipped = [n for n, st in trainer.states.items() if not st.optimizer.state]
    if skipped:  # an update skipped (non-finite) would leave its optimiser state out of the figures
        raise RuntimeError(f"no optimiser step was taken for {skipped}: the figures would miss their state")
    return {"processes": acc.num_processes, "simulated": simulated > 1, "model": spec["model"], "case": spec["case"],
            "batch": spec["batch"], "latent": side, "device": "cuda" if cuda else "cpu", "peak_gb": peak / 2**30,
            "build_peak_gb": None if build_peak is None else build_peak / 2**30, "weights_gb": weights / 2**30,
            "grads_gb": grads / 2**30, "optimizer_gb": optim / 2**30, "activations_gb": activations / 2**30,
            "runtime_gb": base_kib / 2**20, "iteration_s": times[-1], "unet_params": params,
            "trained_params": {n: sum(p.numel() for p in st.params) for n, st in trainer.states.items()}}


def markdown(rows: list[dict], native: int) -> str:
    lines = ["| model | case | processes | batch | latent | peak (GB) | build peak | weights | gradients | optimiser | "
             f"activations + rest | projected peak at {native}x{native} | model state on 8 FSDP processes | iteration (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scale = (native / r["latent"]) ** 2
        projected = r["peak_gb"] + r["activations_gb"] * (scale - 1)
        state = r["weights_gb"] + r["grads_gb"] + r["optimizer_gb"]
        n = r.get("processes", 1)
        procs = f"{n} (simulated)" if r.get("simulated") else str(n)
        build = "" if r.get("build_peak_gb") is None else f"{r['build_peak_gb']:.1f}"
        lines.append(f"| {r['model']} | {r['case']} | {procs} | {r['batch']} | {r['latent']} | {r['peak_gb']:.1f} | {build} | "
                     f"{r['weights_gb']:.1f} | {r['grads_gb']:.1f} | {r['optimizer_gb']:.1f} | {r['activations_gb']:.1f} | "
                     f"{projected:.1f} | {state * n / 8:.1f} | {r['iteration_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--cases", default=None, help=f"comma-separated, default all: {', '.join(CASES)}")
    p.add_argument("--batch", default="1,4", help="batch sizes, e.g. 1,4")
    p.add_argument("--latent", type=int, default=None, help="latent side (default: native on a GPU, 32 on the CPU)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "memory")
    p.add_argument("--processes", type=int, default=1, help="N > 1: FSDP on N processes (per-process figures)")
    p.add_argument("--simulate", type=int, default=1,
                   help="N > 1: one rank of N-process FSDP, in one process over a fake process group")
    p.add_argument("--list", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.list:
        print("\n".join(f"{k}: {v[0]} {' '.join(v[1])}" for k, v in CASES.items()))
        return 0
    if args.one:
        result = measure_one(json.loads(args.one))
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    import torch

    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; see --list")
    batches = [int(b) for b in args.batch.split(",")]
    native = 64 if args.model == "sd15" else 128
    latent = args.latent or (native if torch.cuda.is_available() else 32)
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(args.model, args.out / f"pipeline-{args.model}-{latent}", latent)
    rows = []
    if args.simulate > 1 and args.processes > 1:
        p.error("--simulate and --processes: give one")
    suffix = "" if max(args.processes, args.simulate) == 1 else f"-fsdp{max(args.processes, args.simulate)}"
    suffix += "-simulated" if args.simulate > 1 else ""
    results = args.out / f"results-{args.model}{suffix}.json"
    if args.processes > 1:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", str(args.processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__]
    else:
        head = [sys.executable, __file__]
    for case in cases:
        for batch in batches:
            spec = {"model": args.model, "case": case, "batch": batch, "processes": args.processes, "latent": latent, "out": str(args.out),
                    "pipeline": str(pipeline), "simulate": args.simulate}
            r = subprocess.run(head + ["--one", json.dumps(spec)], capture_output=True, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{case} batch {batch}: failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}",
                      flush=True)
                continue
            rows.append(json.loads(line[len("RESULT "):]))
            print(json.dumps(rows[-1]), flush=True)
            results.write_text(json.dumps(rows, indent=1))
    table = markdown(rows, native)
    (args.out / f"results-{args.model}{suffix}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
