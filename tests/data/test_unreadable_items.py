"""An unreadable item decoded in DataLoader workers (stepdistill/data/loading.py ``InWorkers``) reaches
the main process as one DataError line naming the webdataset shard and member, whatever the worker
met, instead of torch's many-line "Caught ... in DataLoader worker process" message; with
``data.skip_bad_items=true`` the next readable item takes its place."""

import io
import tarfile

import pytest
import torch
import torchvision.transforms.functional  # noqa: F401  (imported here once, as a run has, not in every forked worker)

from stepdistill.config import DataConfig
from stepdistill.data.items import read_items
from stepdistill.data.loading import RealData, transform
from stepdistill.errors import DataError
from stepdistill.testing import data_fixtures as fx

N, BAD = 8, 3  # items in the shard; the unreadable one


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    fx.image_of(i).save(buf, "JPEG", quality=95)
    return buf.getvalue()


# kind -> (member suffix, the member's bytes for item i, bad or not)
KINDS = {
    "truncated png": ("png", lambda i, bad: fx.png_bytes(i)[:len(fx.png_bytes(i)) // 2] if bad else fx.png_bytes(i)),
    "truncated jpeg": ("jpg", lambda i, bad: _jpeg(i)[:len(_jpeg(i)) // 2] if bad else _jpeg(i)),
    "not an image": ("png", lambda i, bad: bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(i),
                                                               dtype=torch.uint8).tolist()) if bad else fx.png_bytes(i)),
    "zero bytes": ("png", lambda i, bad: b"" if bad else fx.png_bytes(i)),
}


def _shard(folder, kind: str, bad=(BAD,)) -> str:
    suffix, data = KINDS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "shard-000.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(N):
            key = f"{i:07d}"
            fx._add(tf, f"{key}.{suffix}", data(i, i in bad))
            fx._add(tf, f"{key}.txt", fx.caption_of(i).encode())
    return str(path)


class _Pixels:
    """A teacher whose "encoding" is the pixels themselves: what the loader decoded, unchanged."""

    def encode_images(self, pixels, noise=None):
        return pixels


def _real(shard: str, skip_bad: bool, workers: int) -> RealData:
    items = read_items(DataConfig(images=shard), True, None)
    real = RealData(items, _Pixels(), size=16, channels=3, crop="center", seed=0, skip_bad=skip_bad,
                    num_workers=workers, device="cpu")
    batches = {(0, 0): [0, 1, 2, 3], (1, 0): [4, 5, 6, 7]}
    real.prefetch(iter(batches), lambda key: torch.tensor(batches[key]))
    return real


# with DataLoader workers (10 s each: they start) for one kind by default, the others in the slow run
@pytest.mark.parametrize("kind,workers", [(k, 0) for k in KINDS] + [
    pytest.param(k, 2, marks=() if i == 0 else pytest.mark.slow) for i, k in enumerate(KINDS)])
def test_an_unreadable_member_is_one_line_naming_the_shard_and_member(tmp_path, kind, workers):
    shard = _shard(tmp_path / "wds", kind)
    suffix = KINDS[kind][0]
    real = _real(shard, False, workers)
    with pytest.raises(DataError) as e:
        real.latents((0, 0), torch.tensor([0, 1, 2, 3]), None)
    line = str(e.value)
    assert "\n" not in line and "Caught" not in line and "Traceback" not in line
    assert line.startswith(f"webdataset shard '{shard}' member '{BAD:07d}.{suffix}' cannot be read (")
    assert line.endswith("); remove it or set data.skip_bad_items=true")


@pytest.mark.parametrize("kind", list(KINDS))
def test_skip_bad_items_replaces_an_unreadable_member_by_the_next_in_the_workers(tmp_path, kind):
    real = _real(_shard(tmp_path / "wds", kind), True, 2)
    got = real.latents((0, 0), torch.tensor([0, 1, 2, 3]), None)
    for row, k in enumerate([0, 1, 2, 4]):  # item 3 unreadable: item 4 in its place
        with_jpeg_loss = 0.1 if KINDS[kind][0] == "jpg" else 1e-6
        torch.testing.assert_close(got[row], transform(fx.image_of(k), 16, 3, "center")[0], rtol=0, atol=with_jpeg_loss)
    assert real.latents((1, 0), torch.tensor([4, 5, 6, 7]), None).shape == (4, 3, 16, 16)


def test_a_training_run_with_workers_stops_on_one_line(tmp_path, tiny_pipelines):
    """The same through a run with ``data.num_workers=2``: the GAN probe (item 7, drawn at start in the
    main process) is readable, step 0's batch (items 7, 3, 5, 4, decoded by the workers) is not."""
    from stepdistill.config import load_config
    from stepdistill.training import Trainer

    shard = _shard(tmp_path / "wds", "not an image")
    cfg = load_config("configs/tiny-sd/dmd2_4step.yaml", [
        f"teacher.path={tiny_pipelines['sd']}", f"train.output_dir={tmp_path / 'run'}", "train.report_to=none",
        "train.progress=false", "method_args.gan=true", "train.validate_every=1000", "train.max_steps=2",
        f"data.images={shard}", "data.prompts=null", "data.num_workers=2"])
    trainer = Trainer(cfg)
    with pytest.raises(DataError) as e:
        trainer.fit()
    assert "next_batch" in [entry.name for entry in e.traceback]  # raised from the workers' record
    line = str(e.value)
    assert "\n" not in line and "Caught" not in line
    assert line == (f"webdataset shard '{shard}' member '{BAD:07d}.png' cannot be read (UnidentifiedImageError); "
                    f"remove it or set data.skip_bad_items=true")
