"""DMD2's GAN (Yin et al., NeurIPS 2024, sec. 4.3): a classifier head on the fake score's bottleneck
features that tells real data from the student's samples. The head trains with the fake score (its
loss is added to the fake score's update, in one optimiser with the fake network); the student gets
the generator's loss. DMD2 and DisBack (whose official code runs on DMD2's, GAN included) use it
through :class:`GANMixin`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import check_range
from ..data.batch import Batch
from ..diffusion.denoiser import feature_module, unwrap
from ..models.sharding import is_sharded
from .base import Context, Trainable
from .score import FakeScoreOptions, score_times


@dataclass
class GANOptions(FakeScoreOptions):
    """The GAN head's options (flattened into DMD2's and DisBack's Options)."""

    gan: bool = False  # the GAN classifier head; needs real data (data.images, or the oracle)
    gan_gen_weight: float = 1e-3  # student's GAN loss weight (official: SD1.5 1e-3, SDXL 5e-3)
    gan_disc_weight: float = 1e-2  # the head's classification loss weight in the fake-score update

    def __post_init__(self):
        super().__post_init__()
        check_range("method_args.gan_gen_weight", self.gan_gen_weight, ge=0)
        check_range("method_args.gan_disc_weight", self.gan_disc_weight, ge=0)


class GANHead(nn.Module):
    """DMD2's classifier on the fake score's bottleneck features, one logit per sample.

    Feature maps (C, H, W) go through the official head's layout: 4x4 stride-2 convolutions (each with
    GroupNorm(32) and SiLU) until the map is at most 4x4, a convolution over the whole remaining map
    (stride 4 at 4x4) with GroupNorm and SiLU, and a 1x1 convolution to one channel. At the native
    bottlenecks this is exactly the official SD1.5 head (8x8: one stride-2 block) and SDXL head
    (32x32: three). Token or vector features (DiT, SD3, the oracle's MLP), which the official code
    never sees, get a LayerNorm-MLP."""

    def __init__(self, feat_shape: tuple[int, ...], width: int = 256):
        super().__init__()
        if len(feat_shape) == 3:  # (C, H, W)
            c, size = feat_shape[0], min(feat_shape[1:])
            groups = 32 if c % 32 == 0 else 1
            layers = []
            while size > 4:
                layers += [nn.Conv2d(c, c, 4, stride=2, padding=1), nn.GroupNorm(groups, c), nn.SiLU()]
                size //= 2
            layers += [nn.Conv2d(c, c, size, stride=size), nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, 1, 1)]
            self.net = nn.Sequential(*layers)
        else:  # (N, D) tokens or (D,)
            d = feat_shape[-1]
            self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width), nn.SiLU(), nn.Linear(width, 1))
        self.tokens = len(feat_shape) == 2
        self.maps = len(feat_shape) == 3

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            feats = feats.mean(1)
        out = self.net(feats.float())
        return out.flatten(1).mean(1) if self.maps else out.squeeze(-1)


class _Features:
    """Captures the output of the fake network's feature module during a forward pass."""

    def __init__(self, module: nn.Module):
        self.value = None
        module.register_forward_hook(self._hook)
        self.active = False

    def _hook(self, module, inputs, output):
        if self.active:
            self.value = output[-1] if isinstance(output, tuple) else output  # SD3 blocks: (text, image)


class GANMixin:
    """The GAN head of a fake-score method (a :class:`~stepdistill.distillers.dmd.DMDBase`): built by
    :meth:`setup_gan` when ``options.gan``, trained with the fake score (one bundle, one optimiser);
    :meth:`gan_disc_loss` goes into the fake score's update, :meth:`gan_gen_loss` into the student's."""

    head: GANHead | None = None

    def setup_gan(self, ctx: Context, options: GANOptions) -> None:
        self.head = None
        if not options.gan:
            return
        if getattr(ctx.teacher, "video", False):
            raise ValueError(f"method_args.gan=true: the GAN head tells real data from the student's, and teacher "
                             f"{ctx.teacher.name} makes videos, while real data here are still images; set "
                             f"method_args.gan=false")
        if not ctx.source.has_real:
            raise ValueError("method_args.gan=true needs real images: set data.images (stepdistill/data/sources.py)")
        self.features = _Features(feature_module(unwrap(self.fake.model)))
        with torch.no_grad():
            probe = torch.zeros(1, *ctx.teacher.sample_shape, device=ctx.device)
            b = ctx.source.draw("gan_probe", 1)
            t = torch.full((1,), self.fake.process.t_max / 2, device=ctx.device)
            feats = self._fake_features(probe, t, b.cond)
        self.head = GANHead(tuple(feats.shape[1:])).to(ctx.device)
        self.fake_bundle = nn.ModuleDict({"net": self.fake.model, "head": self.head})

    def trainables(self) -> dict[str, Trainable]:
        tr = super().trainables()
        if self.head is not None:
            tr["fake"] = Trainable(self.fake_bundle, self.fake_lr, lambda m: setattr(self.fake, "model", m["net"]))
        return tr

    def _fake_features(self, x_t, t, cond) -> torch.Tensor:
        self.features.active = True
        try:
            out = self.fake(x_t, t, cond)
        finally:
            self.features.active = False
        # taken out of the hook: a copy of the network (DisBack's path nodes, a fused LoRA copy) copies its hooks,
        # and a tensor in a graph cannot be copied
        feats, self.features.value = self.features.value, None
        if is_sharded(self.fake.model):  # (sharded after the head's probe at construction)
            # FSDP2 gathers a sharded module's weights for the backward in a hook on that module's outputs;
            # the network's root output is not in the GAN loss, so the root's hook would never run and the
            # backward through its layers (conv_in, time embedding) would meet freed weights. A zero-weight
            # term puts the output in the graph; it changes no value or gradient.
            feats = feats + 0.0 * out.flatten(1).mean(1).reshape(-1, *[1] * (feats.ndim - 1)).to(feats.dtype)
        return feats

    def _logits(self, x: torch.Tensor, cond, batch: Batch) -> torch.Tensor:
        """The head's logit for clean samples ``x`` under their own conditioning ``cond``, noised at a
        time drawn over the whole range (the official classifier's t ~ U[0, 1000), not the DM loss's)."""
        proc = self.student.process
        t = score_times(proc, batch, 0.0, 1.0, self.options.integer_times)
        x_t = proc.add_noise(x, batch.randn(*x.shape), t)
        return self.head(self._fake_features(x_t, t, cond))

    def gan_disc_loss(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The head's classification loss: the student's (detached) samples ``x`` with the prompts that
        made them as fake, the batch's real items with their own captions as real."""
        d_fake = self._logits(x, batch.cond, batch)
        d_real = self._logits(batch.x0, batch.x0_cond, batch)
        return nn.functional.softplus(d_fake).mean() + nn.functional.softplus(-d_real).mean()

    def gan_gen_loss(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The student's GAN loss on its samples ``x`` (with grad)."""
        return nn.functional.softplus(-self._logits(x, batch.cond, batch)).mean()
