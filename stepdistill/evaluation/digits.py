"""The digit judges this project trains on the real digits of ``stepdistill.models.shipped``
(``load_digits8``, ``load_mnist``).

* :class:`DigitClassifier`: a small CNN (diffusers ``ModelMixin`` + ``ConfigMixin``, so it saves
  and loads with ``save_pretrained`` / ``from_pretrained`` as safetensors). Its penultimate layer is
  the feature space of a Frechet distance (reported as FD, not FID: the features are not
  Inception's); its argmax gives class accuracy of conditional samples, the small-scale stand-in
  for CLIP score.
* :class:`DigitsEvaluator`: FD through torchmetrics' custom-feature path, with the reference
  statistics computed once and cached as safetensors; KID (torchmetrics) and improved precision /
  recall (Kynkaanniemi et al. 2019) in the same features; class accuracy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.shipped import DIGITS8, MNIST_SD
from ..storage import load_or_make


class DigitClassifier(ModelMixin, ConfigMixin):
    """conv 3x3 -> ``downsamples`` x (conv 3x3 stride 2, channels doubling) -> flatten -> linear
    (features) -> linear (logits)."""

    @register_to_config
    def __init__(self, in_channels: int = 1, sample_size: int = 8, num_classes: int = 10, width: int = 32,
                 feature_dim: int = 64, downsamples: int = 1):
        super().__init__()
        layers, c, size = [nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU()], width, sample_size
        for _ in range(downsamples):
            layers += [nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.GELU()]
            c, size = 2 * c, (size + 1) // 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * size**2, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, shift: int = 1, **config) -> DigitClassifier:
    """Adam with a cosine schedule; each batch randomly shifted by up to ``shift`` pixels.
    ``config``: further :class:`DigitClassifier` settings (``downsamples``, ``feature_dim``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier(in_channels=x.shape[1], sample_size=x.shape[-1], num_classes=int(y.max()) + 1,
                                **config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = x[idx]
        if shift:
            dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(-2, -1))
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


class ClassifierFeatures(nn.Module):
    """The classifier's penultimate layer as a torchmetrics custom feature extractor (images in [-1, 1])."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float())


def kid_spread(real: torch.Tensor) -> torch.Tensor:
    """The per-dimension spread KID standardises by: the real features' std, floored at a tenth of
    its median (see :meth:`DigitsEvaluator.kid`)."""
    spread = real.std(0)
    return spread.clamp(min=max(0.1 * float(spread.median()), 1e-6))


class DigitsEvaluator:
    """FD (classifier features, torchmetrics) against a reference image set, and class accuracy.

    The reference statistics (torchmetrics' running sums) are computed once per (classifier,
    reference set) and cached in ``cache_dir`` as safetensors."""

    _REAL = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")

    def __init__(self, classifier: DigitClassifier, reference: torch.Tensor, cache_dir: str | Path | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.classifier = classifier.eval().requires_grad_(False)
        self.metric = FrechetInceptionDistance(feature=ClassifierFeatures(self.classifier), reset_real_features=False)
        key = self._key(reference)
        cache = Path(cache_dir) / f"fd_ref_{key}" if cache_dir is not None else None
        if cache is None:
            stats = self._reference_statistics(reference)
        else:
            stats = load_or_make(cache, {"reference": key}, lambda: self._reference_statistics(reference),
                                 save=lambda st, tmp: save_file(st, str(tmp / "statistics.safetensors")),
                                 load=lambda f: load_file(str(f / "statistics.safetensors")),
                                 what="the FD reference statistics")
        for name, value in stats.items():
            setattr(self.metric, name, value)
        self.cache = cache
        self.reference = reference
        self._real_features = None

    @torch.no_grad()
    def _reference_statistics(self, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """torchmetrics' running sums over the reference images."""
        for chunk in reference.split(512):
            self.metric.update(chunk, real=True)
        return {n: getattr(self.metric, n).contiguous() for n in self._REAL}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(c.clamp(-1, 1).float()) for c in images.split(512)])

    def real_features(self) -> torch.Tensor:
        if self._real_features is None:
            self._real_features = self.features(self.reference)
        return self._real_features

    @torch.no_grad()
    def kid(self, samples: torch.Tensor, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> float:
        """Kernel distance (KID: the unbiased MMD^2 with a cubic polynomial kernel, torchmetrics) of
        ``samples`` to the reference set in the classifier's features, each standardised by the
        reference's mean and spread (the kernel is not scale-free), averaged over random subsets.

        A spread is floored at a tenth of the median spread: a ReLU feature that is almost never active
        on the real digits (the shipped classifier has one, std 8e-4 against a median of 9.9) would
        otherwise scale a sample that activates it by 10^4 and make the cubic kernel, and KID, meaningless
        (a negative KID of -2.3 for the teacher's own samples before the floor)."""
        from torchmetrics.image.kid import KernelInceptionDistance

        size = min(subset_size, len(samples), len(self.reference))
        real = self.real_features()
        mean, spread = real.mean(0), kid_spread(real)
        # the features go in already computed and standardised (the reference's once per evaluator)
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=size)
        metric.update((real - mean) / spread, real=True)
        metric.update((self.features(samples) - mean) / spread, real=False)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # torchmetrics draws its subsets from the global generator
            mean, _ = metric.compute()
        return float(mean)

    @torch.no_grad()
    def precision_recall(self, samples: torch.Tensor, k: int = 3) -> tuple[float, float]:
        """Improved precision and recall (Kynkaanniemi et al. 2019) in the classifier's features: the
        share of samples inside the real set's k-NN balls, and of real images inside the samples'."""
        real, fake = self.real_features(), self.features(samples)

        def radii(x):  # distance of each point to its k-th nearest neighbour within its own set
            return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(1024)])

        def inside(points, centres, r):
            return torch.cat([(torch.cdist(c, centres) <= r[None]).any(1) for c in points.split(1024)]).float().mean()

        return float(inside(fake, real, radii(real))), float(inside(real, fake, radii(fake)))

    def _key(self, reference: torch.Tensor) -> str:
        h = hashlib.sha256()
        for t in self.classifier.state_dict().values():
            h.update(t.detach().cpu().numpy().tobytes())
        h.update(reference.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def fd(self, samples: torch.Tensor) -> float:
        """Frechet distance of ``samples`` (N, C, H, W) in [-1, 1] to the reference set."""
        self.metric.reset()  # keeps the reference statistics
        for chunk in samples.clamp(-1, 1).split(512):
            self.metric.update(chunk, real=False)
        return float(self.metric.compute())

    @torch.no_grad()
    def accuracy(self, samples: torch.Tensor, labels: torch.Tensor) -> float:
        pred = torch.cat([self.classifier(c.clamp(-1, 1).float()).argmax(-1) for c in samples.split(512)])
        return float((pred == labels.to(pred.device)).float().mean())


def load_classifier(folder: str | Path = DIGITS8 / "classifier") -> DigitClassifier:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no digit classifier at {folder} (make it with: python train/teacher.py "
                                f"{'mnist-sd' if MNIST_SD in folder.parents else 'digits8'})")
    return DigitClassifier.from_pretrained(folder).eval().requires_grad_(False)
