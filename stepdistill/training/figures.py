"""Pictures people look at: sample grids (images) or scatter plots (vector data), loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def save_sample_figure(x: torch.Tensor, path: str | Path, oracle=None, labels: Sequence | None = None) -> Path:
    """Images in [-1, 1] (N, C, H, W) as a PNG grid, videos (N, C, F, H, W) as a grid of one row of frames
    per sample; vector samples (N, d) as a scatter plot of the first two coordinates over the true
    distribution when the oracle is known."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = x.detach().float().cpu()
    if x.ndim == 5:  # videos (N, C, F, H, W): one row of frames per sample
        n, c, f = x.shape[:3]
        x = x.transpose(1, 2).reshape(n * f, c, *x.shape[-2:])
        from torchvision.utils import save_image

        save_image((x + 1) / 2, path, nrow=f, padding=1)
        return path
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


def save_sample_video(x: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Videos in [-1, 1] (N, C, F, H, W) as one clip whose frame k shows every sample's frame k in a grid:
    an mp4 through diffusers' ``export_to_video`` where imageio and imageio-ffmpeg are installed, otherwise
    an animated GIF written by PIL (no video encoder needed). ``path`` is given without a suffix; returns
    the file written (16 fps: Wan's frame rate)."""
    import importlib.util

    from torchvision.utils import make_grid

    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).transpose(1, 2)  # (N, F, C, H, W) in [0, 1]
    n, f = x.shape[:2]
    frames = [make_grid(x[:, k], nrow=max(1, int(n**0.5)), padding=1).permute(1, 2, 0).numpy() for k in range(f)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if all(importlib.util.find_spec(m) is not None for m in ("imageio", "imageio_ffmpeg")):
        from diffusers.utils import export_to_video

        return Path(export_to_video(frames, str(path.with_suffix(".mp4")), fps=fps, macro_block_size=1))
    from PIL import Image

    images = [Image.fromarray((frame * 255).round().astype("uint8")) for frame in frames]
    out = path.with_suffix(".gif")
    images[0].save(out, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return out


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
