"""eval/memory_projection.py: the fit of saved-for-backward bytes from 1-2 blocks and two sequence lengths
projects a deeper network at another length; the parameter counts of its meta builds and its LoRA
arithmetic agree with real builds."""

import pytest
import torch

TINY = {
    "flux": dict(patch_size=1, in_channels=16, num_layers=4, num_single_layers=4, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6)),
    "qwenimage": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=16, ffn_dim=64, num_layers=4, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64),
}
SIZES = {"flux": [(4, 4), (4, 8), (8, 8)], "qwenimage": [(4, 4), (4, 8), (8, 8)],
         "wan": [(1, 2, 4), (1, 4, 4), (2, 4, 4)]}
TARGET = {"flux": (8, 12), "qwenimage": (8, 12), "wan": (3, 4, 6)}  # a length the fit never saw


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_two_block_fit_projects_a_four_block_network(family, eval_script):
    mp = eval_script("memory_projection")
    cfg = TINY[family]
    fits = mp.measure(family, modes=("full", "lora"), lora_rank=4, sizes=SIZES[family], config=cfg)
    names = list(mp.FAMILIES[family]["blocks"])
    grid = TARGET[family]
    text = 512 if family == "wan" else mp.tokens(family, grid) // 8
    n = mp.tokens(family, grid) + (0 if family == "wan" else text)
    for mode in ("full", "lora"):
        torch.manual_seed(0)
        deep = mp.build(family, {k: 4 for k in names}, device="cpu", config=cfg).train()
        if mode == "lora":
            mp.add_lora(deep, 4)
        for ckpt in ("plain", "ckpt"):
            if ckpt == "ckpt":
                deep.enable_gradient_checkpointing()
            f = fits[mode][ckpt]
            assert abs(f["linearity"]) < 0.02, (mode, ckpt, f["linearity"])  # the third length is on the line
            measured = mp.saved_bytes(deep, mp.inputs(family, grid, text, config=cfg))
            projected = mp.project(f, {k: 4 for k in names}, n)
            assert abs(projected / measured - 1) < 0.02, (mode, ckpt, projected, measured)
        if mode == "full":  # checkpointing keeps a fraction of what a plain pass keeps
            deep4 = {k: 4 for k in names}
            assert mp.project(f, deep4, n) < 0.5 * mp.project(fits[mode]["plain"], deep4, n)


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_meta_build_and_lora_arithmetic_match_real_builds(family, eval_script):
    mp = eval_script("memory_projection")
    cfg = TINY[family]
    meta = mp.build(family, config=cfg)
    real = mp.build(family, device="cpu", config=cfg)
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
    # the adapters peft adds (the way copy_for_training adds them) are what lora_params counts
    mp.add_lora(real, 4)
    trained = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert trained == mp.lora_params(meta, 4) > 0


def test_state_arithmetic_shards_and_keeps_one_gradient(eval_script):
    mp = eval_script("memory_projection")
    nets = [dict(params=100, dtype_bytes=2, trained=0, grad_bytes=0, optim_bytes=0),
            dict(params=100, dtype_bytes=4, trained=100, grad_bytes=4, optim_bytes=8),
            dict(params=50, dtype_bytes=4, trained=50, grad_bytes=4, optim_bytes=8)]
    st = mp.state_bytes({}, nets, world=4)
    assert st == dict(weights=(200 + 400 + 200) / 4, grads=400 / 4, optim=(800 + 400) / 4)
