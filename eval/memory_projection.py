#!/usr/bin/env python
"""Per-GPU memory of DMD2 / Phased DMD on the large transformer teachers (Flux-12B, Qwen-Image-20B,
Wan2.1-14B, Wan2.2-A14B) under FSDP over 8 GPUs, projected from CPU measurements (no GPU, no weights).

    python eval/memory_projection.py [--out runs/memory-projection] [--families flux,qwenimage,wan]  # fits cached
    python eval/memory_projection.py --validate flux --grid 64x64   # a real full-width 1-block run: RSS vs count

Model state is exact arithmetic on the public transformer configs built on the meta device (the
parameter counts are checked against the published sizes). Activations are measured: each network is
built at full width with 2-3 blocks of each kind (random bf16 weights, CPU) and run forward at two
reduced sequence lengths; a ``saved_tensors_hooks`` pair counts the distinct storage bytes autograd
keeps for the backward (parameters excluded: they are model state), with and without diffusers'
gradient checkpointing, full weights trainable or LoRA adapters only. The bytes are fitted linearly in
the number of blocks of each kind and in the number of tokens, and evaluated at full depth and
sequence. Attention is SDPA, which on the GPU (flash / memory-efficient kernels) and here (the CPU's
flash kernel) keeps O(tokens) bytes, so the fit is linear; ``linearity`` checks it at a third length.
What it leaves out (CUDA context, NCCL buffers, fragmentation, text encoders, VAE): docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9

# the public transformer configs (config.json of each repository's transformer folder)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
WAN21_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)  # Wan2.2-A14B: each expert the same

# class, config, {block list: config key of its depth}, published size, the full-size sample
FAMILIES = {
    "flux": dict(cls="FluxTransformer2DModel", config=FLUX_DEV, published=11.9e9,
                 blocks={"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"},
                 full=dict(grid=(64, 64), text=512), cfg_batch=1),  # 1024 px: 128x128 latents packed 2x2
    "qwenimage": dict(cls="QwenImageTransformer2DModel", config=QWEN_IMAGE, published=20.4e9,
                      blocks={"transformer_blocks": "num_layers"}, full=dict(grid=(64, 64), text=512), cfg_batch=2),
    "wan": dict(cls="WanTransformer3DModel", config=WAN21_14B, published=14.0e9, blocks={"blocks": "num_layers"},
                full=dict(grid=(21, 30, 52), text=512), cfg_batch=2),  # 81 x 480 x 832: 21 x 60 x 104 latents, 1x2x2
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # student.lora_targets' default
# working bytes beside the saved activations, per sample, in units of the largest block's saved bytes, from --validate
# (docs/RESULTS.md): a no-grad pass's peak; the backward's peak above the saved bytes without / with checkpointing
WORK = {"nograd": 0.7, "plain": 0.7, "ckpt": 1.7}


def model_class(family: str):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    return getattr(diffusers, FAMILIES[family]["cls"])


def build(family: str, depth: dict | None = None, device="meta", dtype=torch.bfloat16, config: dict | None = None):
    """The transformer of ``family`` (its public config, or ``config``), with ``depth`` blocks per block
    list ({list name: n}) in place of the config's."""
    fam = FAMILIES[family]
    cfg = dict(config or fam["config"])
    for name, n in (depth or {}).items():
        cfg[fam["blocks"][name]] = n
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in bf16 (no float32 copy on the way)
    try:
        with torch.device(device):
            model = model_class(family)(**cfg).to(dtype)
    finally:
        torch.set_default_dtype(default)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []  # as from_pretrained(torch_dtype=...) leaves them
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    return model


def lora_params(model: torch.nn.Module, rank: int, targets=LORA_TARGETS) -> int:
    """Parameters of rank-``rank`` LoRA adapters on the Linear layers whose names end in a target (peft's
    matching of ``target_modules``): rank * (in + out) each."""
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets))


def add_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """LoRA adapters (peft through diffusers' ``add_adapter``, as copy_for_training does); the base frozen."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=True))
    return model


def inputs(family: str, grid: tuple, text: int, batch=1, dtype=torch.bfloat16, config: dict | None = None) -> dict:
    """Random inputs for a sample of ``grid`` tokens (Flux / Qwen-Image: packed latent rows x columns;
    Wan: latent frames x height x width) and ``text`` text tokens."""
    c = config or FAMILIES[family]["config"]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    t = torch.full((batch,), 0.5)
    if family == "flux":
        h, w = grid
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                         indexing="ij"), -1).reshape(-1, 3)
        return dict(hidden_states=rnd(batch, h * w, c["in_channels"]),
                    encoder_hidden_states=rnd(batch, text, c["joint_attention_dim"]),
                    pooled_projections=rnd(batch, c["pooled_projection_dim"]), timestep=t, img_ids=ids,
                    txt_ids=torch.zeros(text, 3), guidance=torch.full((batch,), 3.5))
    if family == "qwenimage":
        h, w = grid
        return dict(hidden_states=rnd(batch, h * w, c["in_channels"]),
                    encoder_hidden_states=rnd(batch, text, c["joint_attention_dim"]),
                    encoder_hidden_states_mask=torch.ones(batch, text, dtype=torch.long), timestep=t,
                    img_shapes=[[(1, h, w)]] * batch)
    f, h, w = grid
    return dict(hidden_states=rnd(batch, c["in_channels"], f, 2 * h, 2 * w),
                encoder_hidden_states=rnd(batch, text, c["text_dim"]),
                timestep=t * 1000)


def tokens(family: str, grid: tuple) -> int:
    return int(torch.tensor(grid).prod())

def saved_bytes(model: torch.nn.Module, kwargs: dict) -> int:
    """Distinct storage bytes that autograd keeps for the backward of one forward pass (parameters
    excluded), counted by ``saved_tensors_hooks``; the output is dropped without a backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and t.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**kwargs, return_dict=False)[0]
    del out
    return sum(seen.values())


def with_depth(model: torch.nn.Module, depth: dict):
    """``model`` running only the first ``depth[name]`` blocks of each list (the rest kept aside)."""
    kept = model.__dict__.setdefault("_all_blocks", {})
    for name, n in depth.items():
        full = kept.setdefault(name, getattr(model, name))
        setattr(model, name, torch.nn.ModuleList(list(full)[:n]))
    return model


def measure(family: str, modes=("full", "lora"), lora_rank: int = 64, sizes=None, config: dict | None = None) -> dict:
    """Saved bytes of ``family`` at full width: for each mode (full / lora) x checkpointing (off / on) and each
    sample size, at depth 2 of every block list and depth 3 of each list in turn (not 1 and 2: under LoRA
    the first block keeps less, its input not needing a gradient, and a table shared by the blocks is
    first kept by the second); a linear fit per block list, a constant and per-token slopes. Returns
    {mode: {ckpt: fit}}."""
    fam = FAMILIES[family]
    names = list(fam["blocks"])
    sizes = sizes or ([(2, 4, 8), (2, 8, 8), (2, 8, 16)] if family == "wan" else [(8, 8), (8, 16), (16, 16)])
    text = fam["full"]["text"] if family == "wan" else None
    out = {}
    for mode in modes:
        torch.manual_seed(0)
        model = build(family, {n: 3 for n in names}, device="cpu", config=config)
        if mode == "lora":
            add_lora(model, lora_rank)
        model.train()
        out[mode] = {}
        for ckpt in (False, True):
            if ckpt:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()
            rows = []
            for grid in sizes:
                n_text = text if text else max(1, tokens(family, grid) // 8)  # images: 1 text token per 8 image tokens
                kw = inputs(family, grid, n_text, config=config)
                depths = [{n: 2 for n in names}] + [{n: 2 + (n == m) for n in names} for m in names]
                measured = [saved_bytes(with_depth(model, d), kw) for d in depths]
                n = tokens(family, grid) + (0 if text else n_text)  # the line's variable: image + text / video tokens
                rows.append(dict(grid=list(grid), tokens=n, text=n_text, depths=depths, bytes=measured))
            out[mode]["ckpt" if ckpt else "plain"] = fit(rows, names)
        with_depth(model, {n: 3 for n in names})
        del model
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed heap back before the next build
    return out


def fit(rows: list[dict], names: list[str]) -> dict:
    """Per block list: bytes per block as a + b * tokens (from the first two sizes); the rest (embeddings,
    output layer, the first block's share of the input) likewise; the third size checks the line."""
    per = {}
    for r in rows:
        base = r["bytes"][0]
        r["per_block"] = {n: r["bytes"][1 + i] - base for i, n in enumerate(names)}
        r["rest"] = base - 2 * sum(r["per_block"].values())
    (r0, r1), r2 = rows[:2], rows[-1]
    dn = r1["tokens"] - r0["tokens"]

    def line(key, name=None):
        v0 = r0[key][name] if name else r0[key]
        v1 = r1[key][name] if name else r1[key]
        slope = (v1 - v0) / dn
        return dict(per_token=slope, const=v0 - slope * r0["tokens"])

    for n in names:
        per[n] = line("per_block", n)
    rest = line("rest")
    predicted = rest["const"] + rest["per_token"] * r2["tokens"] + 2 * sum(
        per[n]["const"] + per[n]["per_token"] * r2["tokens"] for n in names)
    return dict(blocks=per, rest=rest, rows=rows, linearity=predicted / r2["bytes"][0] - 1)


def project(f: dict, depth: dict, n_tokens: int, batch: int = 1) -> float:
    """Saved bytes of the fitted network at ``depth`` blocks and ``n_tokens`` (linear in the batch)."""
    total = f["rest"]["const"] + f["rest"]["per_token"] * n_tokens
    for n, k in depth.items():
        total += k * (f["blocks"][n]["const"] + f["blocks"][n]["per_token"] * n_tokens)
    return batch * total


def state_bytes(counts: dict, networks: list[dict], world: int = 8) -> dict:
    """Per-rank model state under FSDP2 (every parameter sharded over ``world``): each network is
    {"params": n, "dtype_bytes": weights, "trained": n trained, "grad_bytes", "optim_bytes" per trained param,
    "optim_params": trained params that hold optimiser state}."""
    w = sum(n["params"] * n["dtype_bytes"] for n in networks) / world
    g = max((n["trained"] * n["grad_bytes"] for n in networks), default=0) / world  # one trainable's grads at a time
    o = sum(n.get("optim_params", n["trained"]) * n["optim_bytes"] for n in networks) / world
    return dict(weights=w, grads=g, optim=o)


def recipes(counts: dict, lora: dict, t: int) -> list[dict]:
    """The cases. ``t``: bytes of a trainable weight (2: bf16, 4: fp32); its gradient the same, AdamW's two
    moments in the weight's dtype (torch's AdamW; torchao's for bf16). The teacher is bf16 and frozen."""
    def net(p, dtype, trained):
        return dict(params=p, dtype_bytes=dtype, trained=trained, grad_bytes=t, optim_bytes=2 * t)

    def lora_copy(p, r):  # copy_for_training: its own base copy in the trainable dtype, plus the adapters
        return net(p + r, t, r)
    f, q, w = counts["flux"], counts["qwenimage"], counts["wan"]
    rf, rq, rw = lora["flux"], lora["qwenimage"], lora["wan"]
    shared, own = "LoRA + LoRA on the teacher's base", "LoRA student + LoRA fake"
    phased = [net(2 * w, 2, 0), net(w, t, w), net(w, t, w), net(2 * w, t, 2 * w)]
    cases = [(f"Flux.1-dev DMD2, {own}", "flux", [net(f, 2, 0), lora_copy(f, rf), lora_copy(f, rf)]),
             (f"Flux.1-dev DMD2, {shared}", "flux", [net(f, 2, 0), net(rf, t, rf), net(rf, t, rf)]),
             ("Flux.1-dev DMD2, full student + full fake", "flux", [net(f, 2, 0), net(f, t, f), net(f, t, f)]),
             (f"Qwen-Image DMD2, {own}", "qwenimage", [net(q, 2, 0), lora_copy(q, rq), lora_copy(q, rq)]),
             (f"Qwen-Image DMD2, {shared}", "qwenimage", [net(q, 2, 0), net(rq, t, rq), net(rq, t, rq)]),
             (f"Wan2.1-14B DMD2, {shared}", "wan", [net(w, 2, 0), net(rw, t, rw), net(rw, t, rw)]),
             ("Wan2.1-14B DMD2, full student + LoRA fake", "wan", [net(w, 2, 0), net(w, t, w), lora_copy(w, rw)]),
             ("Wan2.1-14B DMD2, full student + full fake", "wan", [net(w, 2, 0), net(w, t, w), net(w, t, w)]),
             # two phases, one 14B expert each, both with optimiser state by the second phase; the teacher and the
             # fake score hold Wan2.2's two experts (each phase's fake score is copied again from the teacher: no
             # snapshot of it is kept)
             ("Wan2.2-A14B Phased DMD (2 phases), full experts + full fake", "wan", phased)]
    return [dict(case=c, family=fam, nets=nets, lora=nets[1]["trained"] < counts[fam]) for c, fam, nets in cases]


def table(counts, lora, fits, trainable=2, world=8, batch=1, gpu_gb=80) -> tuple[str, list[dict]]:
    """Per rank: model state, FSDP's gathered blocks, activations (fit at full depth and sequence) and the
    working bytes next to them; with checkpointing, the context-parallel degree k (activations / k) that fits."""
    rows, lines = [], []
    for r in recipes(counts, lora, trainable):
        fam = FAMILIES[r["family"]]
        depth = {n: fam["config"][k] for n, k in fam["blocks"].items()}
        n_tok = tokens(r["family"], fam["full"]["grid"]) + (0 if r["family"] == "wan" else fam["full"]["text"])
        st = state_bytes(counts, r["nets"], world)
        meta = build(r["family"])
        block = max(sum(p.numel() for p in getattr(meta, n)[0].parameters()) for n in depth)  # the largest block
        gathered = 2 * block * 2 + block * trainable  # two bf16 blocks gathered (prefetch), one unsharded gradient
        f = fits[r["family"]]["lora" if r["lora"] else "full"]
        one_block = batch * max(b["const"] + b["per_token"] * n_tok for b in f["plain"]["blocks"].values())
        row = dict(case=r["case"], tokens=n_tok, **st, gathered=gathered)
        row["state"] = st["weights"] + st["grads"] + st["optim"] + gathered
        for ckpt in ("plain", "ckpt"):
            # one pass's activations alive (student or fake score), beside them the larger of the teacher's no-grad
            # pass at the CFG batch and the backward's working bytes, in units of one block's saved bytes (WORK)
            row["acts_" + ckpt] = project(f[ckpt], depth, n_tok, batch)
            row["work_" + ckpt] = one_block * max(fam["cfg_batch"] * WORK["nograd"], WORK[ckpt])
            row["peak_" + ckpt] = row["state"] + row["acts_" + ckpt] + row["work_" + ckpt]
        fits_k = [k for k in (1, 2, 4, 8) if row["state"] + (row["acts_ckpt"] + row["work_ckpt"]) / k <= gpu_gb * GB]
        row["cp"] = fits_k[0] if fits_k else None
        rows.append(row)
    lines = ["| case | tokens | weights | grads | optimiser | FSDP working | activations "
             "(no ckpt) | peak (no ckpt) | activations (ckpt) | peak (ckpt) | context parallel k to fit |",
             "|" + "---|" * 11]
    for r in rows:
        def gb(v):
            return f"**{v / GB:.1f}**" if v <= gpu_gb * GB else f"{v / GB:.1f} (over)"
        lines.append(f"| {r['case']} | {r['tokens']} | {r['weights'] / GB:.1f} | {r['grads'] / GB:.1f} | "
                     f"{r['optim'] / GB:.1f} | {r['gathered'] / GB:.1f} | "
                     f"{r['acts_plain'] / GB:.0f} | {gb(r['peak_plain'])} | {r['acts_ckpt'] / GB:.1f} | "
                     f"{gb(r['peak_ckpt'])} | {r['cp'] or 'none of 1-8'} |")
    return "\n".join(lines), rows


def param_counts() -> dict:
    return {f: sum(p.numel() for p in build(f).parameters()) for f in FAMILIES}

# -- validation: a real run ----------------------------------------------------------------------------
def _rss(field="VmRSS") -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def validate(family: str, grid: tuple, text: int, ckpt: bool) -> dict:
    """A full-width network of one block per list on the CPU (glibc's mmap threshold fixed at 64 KiB: every
    tensor's pages come and go with it): the peak over a no-grad forward; over a forward, the resident
    set's growth against the hooks' count; the peak over forward and backward, gradients allocated first."""
    names = list(FAMILIES[family]["blocks"])
    torch.manual_seed(0)
    model = build(family, {n: 1 for n in names}, device="cpu").train()
    if ckpt:
        model.enable_gradient_checkpointing()
    kw = inputs(family, grid, text)
    counted = saved_bytes(model, kw)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss()
    with torch.no_grad():  # the teacher's pass: nothing kept, each block's intermediates come and go
        model(**kw, return_dict=False)
    nograd = _rss("VmHWM") - before
    for p in model.parameters():  # the gradients in place before the forward: the peak below is activations
        p.grad = torch.zeros_like(p)
    before = _rss()
    Path("/proc/self/clear_refs").write_text("5")
    out = model(**kw, return_dict=False)[0]
    after = _rss()
    out.float().square().mean().backward()
    peak = _rss("VmHWM") - before
    return dict(family=family, grid=list(grid), text=text, ckpt=ckpt, tokens=tokens(family, grid), counted=counted,
                rss_growth=after - before, out_bytes=out.nbytes, growth_over_counted=(after - before) / counted,
                backward_peak=peak, nograd_peak=nograd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "memory-projection")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="samples per rank")
    p.add_argument("--validate", default=None, help="a family: the real-run check instead of the table")
    p.add_argument("--grid", default=None, help="with --validate: the sample's token grid, e.g. 64x64 (Wan: 4x30x52)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.validate:
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # glibc reads it at start: run again with it
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        grid = tuple(int(s) for s in (args.grid or "32x32").split("x"))
        text = 512 if args.validate == "wan" else max(1, tokens(args.validate, grid) // 8)
        res = [validate(args.validate, grid, text, ckpt) for ckpt in (False, True)]
        fits = json.loads((args.out / "fits.json").read_text()) if (args.out / "fits.json").is_file() else {}
        if args.validate in fits:  # the fit's projection of this 1+1-block network at this length
            n = tokens(args.validate, grid) + (0 if args.validate == "wan" else text)
            for r in res:
                f = fits[args.validate]["full"]["ckpt" if r["ckpt"] else "plain"]
                r["projected"] = project(f, {k: 1 for k in FAMILIES[args.validate]["blocks"]}, n)
                r["counted_over_projected"] = r["counted"] / r["projected"]
        print(json.dumps(res, indent=1))
        (args.out / f"validate-{args.validate}.json").write_text(json.dumps(res, indent=1))
        return 0
    families = args.families.split(",")
    counts = param_counts()
    lora = {f: lora_params(build(f), args.lora_rank) for f in FAMILIES}
    print(json.dumps({"params": counts, "over_published": {f: counts[f] / FAMILIES[f]["published"] for f in counts},
                      "lora": lora}))
    cache = args.out / "fits.json"
    fits = json.loads(cache.read_text()) if cache.is_file() else {}
    for f in families:
        if f not in fits:
            fits[f] = measure(f, lora_rank=args.lora_rank)
            cache.write_text(json.dumps(fits, indent=1))
        print(f, {m: {c: round(v["linearity"], 4) for c, v in d.items()} for m, d in fits[f].items()}, flush=True)
    if set(fits) >= set(FAMILIES):
        for t, label in ((2, "bf16"), (4, "fp32")):
            md, rows = table(counts, lora, fits, trainable=t, batch=args.batch)
            print(f"\ntrainable weights {label}, batch {args.batch} per rank, 8-way FSDP, GB per rank\n{md}")
            (args.out / f"table-{label}.md").write_text(md + "\n")
            (args.out / f"table-{label}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
