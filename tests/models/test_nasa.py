"""SNOOPI's NASA: a negative prompt through the cross-attention layers of a guidance-free student."""

import copy

import pytest
import torch

from stepdistill.models.nasa import cross_attention_names, negative_away
from stepdistill.models.teachers import load_teacher


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_negative_away_attention(tiny_pipelines, family):
    teacher = load_teacher(tiny_pipelines[family])
    den = teacher.denoiser
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 999.0)
    cond = teacher.encode(["a red cube", "two cats"])[0]
    neg = teacher.encode(["blurry", "blurry"])[0]
    plain = den(x, t, cond)
    with negative_away(den.model, neg, scale=0.0):  # scale 0: the network as it is
        torch.testing.assert_close(den(x, t, cond), plain)
    with negative_away(den.model, neg, scale=0.5):
        steered = den(x, t, cond)
    assert not torch.allclose(steered, plain, atol=1e-4)
    torch.testing.assert_close(den(x, t, cond), plain)  # the processors are restored after the block
    # the negative prompt = the prompt at scale 1: every cross-attention output is 0 before its projection,
    # which is the network whose cross-attention values are zero
    zeroed = copy.deepcopy(den)
    names = {n.rsplit(".processor", 1)[0] for n in cross_attention_names(den.model)}
    assert names
    with torch.no_grad():
        for name, m in zeroed.model.named_modules():
            if name in names:
                m.to_v.weight.zero_()
                if m.to_v.bias is not None:
                    m.to_v.bias.zero_()
    with negative_away(den.model, cond, scale=1.0):
        torch.testing.assert_close(den(x, t, cond), zeroed(x, t, cond), rtol=1e-4, atol=1e-5)


def test_negative_away_refuses_a_network_without_cross_attention(tiny_pipelines):
    teacher = load_teacher(tiny_pipelines["pixel"])
    with pytest.raises(ValueError, match="has no diffusers cross-attention layers"):
        with negative_away(teacher.denoiser.model, torch.zeros(1, 4, 8)):
            pass
