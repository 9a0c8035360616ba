"""Pictures people look at: sample grids (images) or scatter plots (vector data), loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def save_sample_figure(x: torch.Tensor, path: str | Path, oracle=None, labels: Sequence | None = None) -> Path:
    """Images in [-1, 1] (N, C, H, W) as a PNG grid; vector samples (N, d) as a scatter plot of the
    first two coordinates over the true distribution when the oracle is known."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = x.detach().float().cpu()
    if x.ndim == 4:
        from torchvision.utils import save_image

        save_image((x + 1) / 2, path, nrow=max(1, int(len(x) ** 0.5)), padding=1)
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if oracle is not None:
        ref, _ = oracle.sample(2000, torch.Generator().manual_seed(0))
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="lightgray", label="true p0")
    ax.scatter(x[:, 0], x[:, 1], s=6, c="tab:red", label="student")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


SEGMENT_KEYS = ("round", "stage", "phase")  # logged by progressive, guided and Phased DMD


def segment_starts(history: list[dict]) -> list[tuple[int, str]]:
    """(step, label) where a logged round, stage or phase begins (after the first)."""
    out = []
    for word in SEGMENT_KEYS:
        keys = [k for k in {k for h in history for k in h} if k.split("/")[-1] == word]
        for key in sorted(keys)[:1]:  # one trainable's record of it is enough
            last = None
            for h in history:
                if key in h and h[key] != last:
                    if last is not None:
                        out.append((h["step"], f"{word} {h[key]:g}"))
                    last = h[key]
    return sorted(out)


def plot_losses(history: list[dict], path: str | Path) -> Path:
    """Every logged ``*loss`` series against the step, one panel per trainable's loss, with the starts
    of progressive rounds, guided stages and Phased DMD phases marked (the loss of a new round is not
    comparable with the last one's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for h in history for k in h if k.endswith("loss")})
    marks = segment_starts(history)
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_yscale("log" if all(p[1] > 0 for p in pts) else "linear")
        for step, label in marks:
            ax.axvline(step, color="tab:gray", lw=0.8, ls="--")
            ax.text(step, 1.0, label, transform=ax.get_xaxis_transform(), rotation=90, va="top", ha="right", fontsize=7,
                    color="tab:gray")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
