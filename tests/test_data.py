"""Batches: a short prompt list is encoded once at start and gives the text encoder's own states."""

import numpy as np
import pytest
import torch

from stepdistill import data
from stepdistill.data import BatchSource
from stepdistill.teachers import load_teacher


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cached_prompt_states_equal_the_text_encoders(tiny_pipelines, monkeypatch, family):
    teacher = load_teacher(tiny_pipelines[family])
    prompts = ["a red cube", "two cats", "a red cube", "a dog on grass"]
    cached = BatchSource(teacher, seed=0, device="cpu", prompts=prompts)
    assert cached._encoded is not None and cached._encoded[1].batch_size() == 3  # the distinct prompts only
    monkeypatch.setattr(data, "PROMPT_CACHE_LIMIT", 2)  # too many distinct prompts: encoded per batch
    direct = BatchSource(teacher, seed=0, device="cpu", prompts=prompts)
    assert direct._encoded is None
    a, b = cached.batch(step=3, rank=0, size=6), direct.batch(step=3, rank=0, size=6)
    assert a.prompts == b.prompts and len(set(a.prompts)) > 1
    want_c, want_u = teacher.encode(a.prompts)
    for got, want in ((a.cond, want_c), (a.uncond, want_u), (b.cond, want_c)):
        flat_got, flat_want = [], []
        got.map(lambda t: flat_got.append(t) or t)
        want.map(lambda t: flat_want.append(t) or t)
        assert len(flat_got) == len(flat_want)
        for x, y in zip(flat_got, flat_want):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_shipped_mnist_train_images(tmp_path, monkeypatch):
    """`data.images: stepdistill:mnist-train` is the teacher's 4000 real train digits, written once."""
    from PIL import Image

    from stepdistill.data import DataError, list_images
    from stepdistill.evaluation.digits import load_mnist

    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    files = list_images("stepdistill:mnist-train")
    assert len(files) == 4000 and {f.parent.name for f in files} == {str(d) for d in range(10)}
    x, y = load_mnist("train")
    for f in files[::997]:  # <digit>/<index>.png holds train digit <index>
        i = int(f.stem)
        img = np.asarray(Image.open(f), dtype=np.float32) / 127.5 - 1
        assert img.shape == (32, 32) and np.abs(img - x[i, 0].numpy()).max() < 1 / 127
        assert f.parent.name == str(int(y[i]))
    with pytest.raises(DataError, match="data.images 'stepdistill:mnist-test'"):
        list_images("stepdistill:mnist-test")
