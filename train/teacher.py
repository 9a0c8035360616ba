"""Train the project's own teachers and evaluators on real data that ships offline.

    python train/teacher.py digits8 [--out stepdistill/assets/digits8] [--seed 0] [--steps 6000]

``digits8``: sklearn's 8x8 handwritten digits (train split of 1,500; 297 held out). Writes

* ``teacher/``: a class-conditional pixel ``DDPMPipeline`` (UNet2DModel with 10 digit classes plus
  the null class 10 for classifier-free guidance, trained with 10% label dropout; linear betas
  1e-4..0.02, epsilon prediction), the EMA weights. (Cosine betas reach alpha_bar = 2e-9 at t = 999,
  where a trailing DDIM/one-step start amplifies the epsilon error 20,000-fold: every sampler failed.)
* ``classifier/``: the evaluator (:class:`stepdistill.evaluation.digits.DigitClassifier`);
* ``metrics.json`` and ``README.md``: the teacher's FD (classifier features) and class accuracy at
  1, 2, 4, 10 and 50 DDIM steps with and without CFG, the held-out real-vs-train FD, the
  classifier's held-out accuracy, and the command that made them;
* ``teacher_samples.png``: 50-step CFG samples, one row per digit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stepdistill.evaluation.digits import DIGITS8, DigitsEvaluator, load_digits8, train_classifier  # noqa: E402

NULL = 10


def make_unet(seed: int):
    from diffusers import UNet2DModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=16, attention_head_dim=32, num_class_embeds=NULL + 1,
        )


def train_teacher(x, y, steps: int, seed: int, batch_size: int = 96, lr: float = 1e-3, p_uncond: float = 0.1):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                          clip_sample=False)
    unet = make_unet(seed)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    abar = sched.alphas_cumprod
    bar = tqdm(range(steps), desc="digits8 teacher", mininterval=2)
    for step in bar:
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(batch_size, generator=g) < p_uncond] = NULL
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=labels).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet.parameters())
    return unet.eval().requires_grad_(False), sched


@torch.no_grad()
def teacher_metrics(folder: Path, evaluator: DigitsEvaluator, n: int = 2000, seed: int = 1,
                    steps=(1, 2, 4, 10, 50), scales=(1.0, 2.0)) -> dict:
    from stepdistill.sampling import ode_sample
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(str(folder))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    z = torch.randn(n, *teacher.sample_shape, generator=g)
    cond, uncond = teacher.encode(labels)
    rows = {}
    for w in scales:
        for k in steps:
            t0 = time.perf_counter()
            x = ode_sample(teacher.denoiser, z, k, cond, **({"guidance_scale": w, "uncond": uncond} if w != 1.0 else {}))
            dt = time.perf_counter() - t0
            rows[f"ddim{k}_cfg{w:g}"] = {"steps": k, "guidance_scale": w, "fd": evaluator.fd(x),
                                         "accuracy": evaluator.accuracy(x, labels),
                                         "nfe": k * (2 if w != 1.0 else 1), "seconds_per_1k": dt * 1000 / n}
    return rows


def digits8(args) -> int:
    from diffusers import DDPMPipeline
    from stepdistill.evaluation.grids import save_sample_figure

    out = Path(args.out)
    x_train, y_train = load_digits8("train")
    x_held, y_held = load_digits8("heldout")
    t0 = time.perf_counter()
    clf = train_classifier(x_train, y_train, steps=args.classifier_steps, seed=args.seed)
    clf.save_pretrained(out / "classifier")
    held_acc = float((clf(x_held).argmax(-1) == y_held).float().mean())
    print(f"classifier: held-out accuracy {held_acc:.4f} ({time.perf_counter() - t0:.0f} s)")
    evaluator = DigitsEvaluator(clf, x_train)
    real_fd = evaluator.fd(x_held)
    noise_fd = evaluator.fd(torch.randn(x_held.shape, generator=torch.Generator().manual_seed(args.seed)).clamp(-1, 1))
    t0 = time.perf_counter()
    unet, sched = train_teacher(x_train, y_train, args.steps, args.seed)
    train_s = time.perf_counter() - t0
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(out / "teacher")
    rows = teacher_metrics(out / "teacher", evaluator)
    from stepdistill.sampling import ode_sample
    from stepdistill.teachers import load_teacher

    teacher = load_teacher(str(out / "teacher"))
    labels = torch.arange(100) // 10
    cond, uncond = teacher.encode(labels)
    z = torch.randn(100, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    save_sample_figure(ode_sample(teacher.denoiser, z, 50, cond, guidance_scale=2.0, uncond=uncond),
                       out / "teacher_samples.png")
    metrics = {
        "command": f"python train/teacher.py digits8 --out {args.out} --seed {args.seed} --steps {args.steps} "
                   f"--classifier-steps {args.classifier_steps}",
        "data": "sklearn load_digits, 1500 train / 297 held out (seed 0 shuffle)",
        "classifier_heldout_accuracy": held_acc,
        "fd_heldout_vs_train": real_fd,
        "fd_noise_vs_train": noise_fd,
        "teacher_train_seconds": train_s,
        "teacher": rows,
        "evaluation": "FD over 2000 samples (200 per digit) vs the 1500 train images, classifier features (64-d)",
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lines = ["# digits8 teacher and evaluator", "", f"Made by `{metrics['command']}`.", "",
             f"- classifier held-out accuracy: {held_acc:.4f}",
             f"- FD held-out real vs train: {real_fd:.3f}; Gaussian noise vs train: {noise_fd:.1f}", "",
             "| DDIM steps | guidance | NFE | FD | class accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['guidance_scale']:g} | {r['nfe']} | {r['fd']:.3f} | {r['accuracy']:.3f} |"
              for r in rows.values()]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["digits8"])
    p.add_argument("--out", default=str(DIGITS8.relative_to(ROOT)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000, help="teacher training steps")
    p.add_argument("--classifier-steps", type=int, default=3000)
    args = p.parse_args(argv)
    return digits8(args)


if __name__ == "__main__":
    sys.exit(main())
