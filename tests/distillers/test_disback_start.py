"""DisBack started as the official scripts start it: from a trained DMD2 run (its student through
student.init, its fake score and GAN head through method_args.fake_init), and the fake score every
finished DMD-family run leaves in fake_score/."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stepdistill.config import ConfigError, load_config
from stepdistill.distillers.fake_store import FAKE_SCORE, GAN_HEAD, load_fake_init, resolve_fake_init
from stepdistill.training import Trainer

QUIET = ["train.report_to=none", "train.progress=false", "train.validate_every=100", "train.batch_size=2"]


def _images(folder: Path) -> Path:
    folder.mkdir()
    for i, caption in enumerate(["a red cube", "two cats", "a dog", "a blue car"]):
        Image.new("RGB", (32, 32), (60 * i, 255 - 60 * i, 20)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def dmd2_run(tmp_path_factory, tiny_pipelines):
    """A finished 2-iteration DMD2 run with the GAN head on the tiny sd pipeline (whole fake score)."""
    root = tmp_path_factory.mktemp("dmd2")
    out = root / "run"
    cfg = load_config("configs/tiny-sd/dmd2_4step.yaml", [
        f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={out}", *QUIET, "student.num_steps=1",
        "method_args.fake_lora_rank=0", "method_args.fake_updates=1", "method_args.lr=1e-3", "train.max_steps=2",
        "train.checkpoint_every=2", "method_args.gan=true", "method_args.save_fake_score=true",
        f"data.images={_images(root / 'images')}"])
    Trainer(cfg).fit()
    return out


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def test_finished_dmd2_run_saves_its_trained_fake_score_and_gan_head(dmd2_run, tiny_pipelines):
    folder = dmd2_run / FAKE_SCORE
    assert (folder / "config.json").is_file() and (folder / GAN_HEAD).is_file()
    assert resolve_fake_init(dmd2_run) == folder == resolve_fake_init(folder)  # the run folder, or the folder itself
    net, head = load_fake_init(folder, gan=True)
    # the final checkpoint's fake score (network and head in one bundle file): what the run trained
    bundle = load_file(dmd2_run / "checkpoints" / "checkpoint-2" / "fake" / "trainable.safetensors")
    assert _equal(net, {k[len("net."):]: v for k, v in bundle.items() if k.startswith("net.")})
    assert _equal(head, {k[len("head."):]: v for k, v in bundle.items() if k.startswith("head.")})
    teacher = load_file(Path(tiny_pipelines["sd"]) / "unet" / "diffusion_pytorch_model.safetensors")
    assert not _equal(net, teacher)  # trained, not the teacher's copy


def test_disback_starts_from_a_dmd2_runs_student_fake_score_and_gan_head(tmp_path, dmd2_run, tiny_pipelines):
    """Iteration 0: the student is DMD2's; stage 1 degrades a teacher copy toward it (the official
    degradation script loads only the generator); stage 2's first update meets DMD2's fake score and head."""
    deg = 2
    cfg = load_config("configs/tiny-sd/disback_1step.yaml", [
        f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={tmp_path / 'run'}", *QUIET, "train.max_steps=3",
        "train.checkpoint_every=100", f"method_args.degradation_steps={deg}", "method_args.path_nodes=1",
        "method_args.lr=1e-3", f"student.init={dmd2_run / 'student'}", f"method_args.fake_init={dmd2_run}", "method_args.save_fake_score=true",
        "method_args.gan=true", f"data.images={dmd2_run.parent / 'images'}"])
    trainer = Trainer(cfg)
    dis = trainer.distiller
    seen, loss = {}, dis.loss

    def spy(batch, iteration, update):
        seen.setdefault((iteration, update), (_state(dis.student.model), _state(dis.fake.model), _state(dis.head)))
        return loss(batch, iteration, update)

    dis.loss = spy
    trainer.fit()
    dmd2_student = load_file(dmd2_run / "student" / "diffusion_pytorch_model.safetensors")
    dmd2_fake, dmd2_head = load_fake_init(dmd2_run / FAKE_SCORE, gan=True)
    teacher = load_file(Path(tiny_pipelines["sd"]) / "unet" / "diffusion_pytorch_model.safetensors")
    student0, fake0, head0 = seen[(0, "fake")]
    assert _equal(student0, dmd2_student) and not _equal(student0, teacher)
    assert _equal(fake0, teacher) and not _equal(fake0, dmd2_fake)  # stage 1: the teacher copy
    assert not _equal(head0, dmd2_head)
    student2, fake2, head2 = seen[(deg, "student")]  # stage 2's first update (student first)
    assert _equal(fake2, dmd2_fake) and _equal(head2, dmd2_head)
    assert not _equal(fake2, seen[(deg - 1, "fake")][1])  # not the end of stage 1
    assert _equal(student2, dmd2_student)  # the student is frozen in stage 1
    assert not _equal(_state(dis.fake.model), dmd2_fake)  # and the fake score trains on from there
    assert (tmp_path / "run" / FAKE_SCORE / GAN_HEAD).is_file()  # a DisBack run leaves its own


def test_fake_init_of_another_configuration_or_without_the_gan_head_is_refused(tmp_path, dmd2_run, tiny_pipelines):
    common = [f"teacher.path={tiny_pipelines['sd']}", *QUIET, "method_args.degradation_steps=2",
              "method_args.path_nodes=1"]
    other = Path(tiny_pipelines["sdxl"]) / "unet"  # a UNet2DConditionModel too, of another configuration
    with pytest.raises(ConfigError, match=r"method_args.fake_init: '.*unet' holds a UNet2DConditionModel of another "
                                          r"configuration than the teacher's") as info:
        Trainer(load_config("configs/tiny-sd/disback_1step.yaml", common + [
            f"train.output_dir={tmp_path / 'a'}", f"method_args.fake_init={other}"]))
    assert "\n" not in str(info.value)
    plain = tmp_path / "plain"  # a fake-score folder without the head
    plain.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (plain / name).write_bytes((dmd2_run / FAKE_SCORE / name).read_bytes())
    images = dmd2_run.parent / "images"
    with pytest.raises(ConfigError, match=rf"method_args.fake_init: '.*plain' has no {GAN_HEAD} \(its run trained no "
                                          r"GAN head\) and method_args.gan=true"):
        Trainer(load_config("configs/tiny-sd/disback_1step.yaml", common + [
            f"train.output_dir={tmp_path / 'b'}", f"method_args.fake_init={plain}", "method_args.gan=true",
            f"data.images={images}"]))


def test_the_fake_score_is_written_only_when_asked(tmp_path, tiny_pipelines):
    """A full fake score is a second network's worth of disk: a run writes fake_score/ only with
    method_args.save_fake_score (DisBack's start), and Phased DMD, whose fake score restarts each phase, refuses it."""
    parts = {}
    for save in (False, True):
        cfg = load_config("configs/tiny-sd/dmd2_4step.yaml", [
            f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={tmp_path / str(save)}", *QUIET,
            f"method_args.save_fake_score={str(save).lower()}"])
        trainer = Trainer(cfg)
        parts[save] = trainer.distiller.final_parts()
        trainer.close()
    assert parts[False] == {} and list(parts[True]) == [FAKE_SCORE]
    from stepdistill.config import from_dict
    from stepdistill.distillers.phased_dmd import PhasedDMD

    with pytest.raises(ValueError, match="method_args.save_fake_score: Phased DMD"):
        from_dict(PhasedDMD.Options, {"save_fake_score": True}, "method_args")
