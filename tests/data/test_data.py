"""Batches: a short prompt list is encoded once at start and gives the text encoder's own states."""

import numpy as np
import pytest
import torch

from stepdistill.data import batch as data
from stepdistill.data.batch import BatchSource
from stepdistill.models.teachers import load_teacher


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cached_prompt_states_equal_the_text_encoders(tiny_pipelines, monkeypatch, family):
    teacher = load_teacher(tiny_pipelines[family])
    prompts = ["a red cube", "two cats", "a red cube", "a dog on grass"]
    cached = BatchSource(teacher, seed=0, device="cpu", prompts=prompts)
    assert cached.prompt_table.cached is not None and cached.prompt_table.cached[1].batch_size() == 3  # the distinct prompts only
    monkeypatch.setattr(data, "PROMPT_CACHE_LIMIT", 2)  # too many distinct prompts: encoded per batch
    direct = BatchSource(teacher, seed=0, device="cpu", prompts=prompts)
    assert direct.prompt_table.cached is None
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

    from stepdistill.data.files import image_captions, list_images
    from stepdistill.errors import DataError
    from stepdistill.models.shipped import load_mnist

    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    files = list_images("stepdistill:mnist-train")
    assert len(files) == 4000 and {f.parent.name for f in files} == {str(d) for d in range(10)}
    from stepdistill.models.shipped import prompt_digit

    _, captions = image_captions(files)
    assert all(prompt_digit(c) == int(f.parent.name) for f, c in zip(files, captions))  # each its own digit
    x, y = load_mnist("train")
    for f in files[::997]:  # <digit>/<index>.png holds train digit <index>
        i = int(f.stem)
        img = np.asarray(Image.open(f), dtype=np.float32) / 127.5 - 1
        assert img.shape == (32, 32) and np.abs(img - x[i, 0].numpy()).max() < 1 / 127
        assert f.parent.name == str(int(y[i]))
    with pytest.raises(DataError, match="data.images 'stepdistill:mnist-test'"):
        list_images("stepdistill:mnist-test")


def test_real_images_come_with_their_own_captions_or_are_refused(tmp_path, tiny_pipelines):
    """A text teacher's real images are paired with the caption beside each one; uncaptioned images,
    or one image missing its caption, are refused naming what is wrong."""
    from PIL import Image

    from stepdistill.data.files import image_captions, list_images
    from stepdistill.errors import DataError

    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(folder / f"{i}.png")
    teacher = load_teacher(tiny_pipelines["sd"])
    files, captions = image_captions(list_images(folder))
    assert captions is None
    with pytest.raises(DataError, match="text-conditioned, so its real images need their own captions"):
        BatchSource(teacher, seed=0, device="cpu", prompts=["x"], x0_data=torch.zeros(3, 4, 4, 4))
    (folder / "0.txt").write_text("a red square\n")
    (folder / "2.txt").write_text("a blue square")
    with pytest.raises(DataError, match=r"image '.*1.png' has no caption \('1.txt' is missing\)"):
        image_captions(list_images(folder))
    files, captions = image_captions(list_images(folder), skip_bad=True)
    assert [f.name for f in files] == ["0.png", "2.png"] and captions == ["a red square", "a blue square"]
    x0 = torch.arange(2.0)[:, None, None, None].expand(2, 4, 4, 4).contiguous()  # item i is all i
    source = BatchSource(teacher, seed=0, device="cpu", x0_data=x0, x0_captions=captions)
    b = source.batch(step=1, rank=0, size=8)
    assert b.prompts == [captions[int(v)] for v in b.x0[:, 0, 0, 0]]  # without a prompt list: the captions
    want = teacher.encode(b.prompts)[0].kwargs["encoder_hidden_states"]
    torch.testing.assert_close(b.x0_cond.kwargs["encoder_hidden_states"], want, rtol=1e-5, atol=1e-6)
    mixed = BatchSource(teacher, seed=0, device="cpu", prompts=["a cat"], x0_data=x0, x0_captions=captions)
    b = mixed.batch(step=1, rank=0, size=8)
    assert b.prompts == ["a cat"] * 8  # generation prompts from the list, real items with their own captions
    want = teacher.encode([captions[int(v)] for v in b.x0[:, 0, 0, 0]])[0].kwargs["encoder_hidden_states"]
    torch.testing.assert_close(b.x0_cond.kwargs["encoder_hidden_states"], want, rtol=1e-5, atol=1e-6)


def test_the_global_batch_does_not_depend_on_the_process_count(tiny_pipelines):
    """Rank r of N keeps rows [r n, (r+1) n) of the one global draw: the two halves of a 2-rank micro-batch
    are the 1-rank batch (prompts, real items with their captions, per-sample noise and indices), and a
    draw for the whole batch is the same on every rank. Also for the exact oracle's samples and labels."""
    from stepdistill.config import OracleConfig
    from stepdistill.models.oracle import GaussianMixture
    from stepdistill.models.teachers import Teacher
    from stepdistill.training.build import oracle_process

    teacher = load_teacher(tiny_pipelines["sd"])
    x0 = torch.arange(5.0)[:, None, None, None].expand(5, 4, 4, 4).contiguous()
    text = BatchSource(teacher, seed=3, device="cpu", prompts=["a", "b", "c", "d"], x0_data=x0,
                       x0_captions=["p0", "p1", "p2", "p3", "p4"])
    spec = OracleConfig(components=4)
    gmm = getattr(GaussianMixture, spec.layout)(spec.components, spec.dim, spec.radius, spec.std)
    oracle = BatchSource(Teacher.from_oracle(gmm, oracle_process(spec)), seed=3, device="cpu", oracle=gmm)
    for source in (text, oracle):
        whole = source.batch(7, 0, 8, micro=1)
        halves = [source.batch(7, r, 4, micro=1, num_ranks=2) for r in (0, 1)]
        assert torch.equal(torch.cat([h.x0 for h in halves]), whole.x0)
        if source is text:
            assert halves[0].prompts + halves[1].prompts == whole.prompts and len(set(whole.prompts)) > 1
            got = torch.cat([h.x0_cond.kwargs["encoder_hidden_states"] for h in halves])
            assert torch.equal(got, whole.x0_cond.kwargs["encoder_hidden_states"])
        else:
            assert torch.equal(torch.cat([h.labels for h in halves]), whole.labels)
        for draw in (lambda b: b.randn(b.size, 3), lambda b: b.rand(b.size), lambda b: b.randint(0, 1000)):
            assert torch.equal(torch.cat([draw(h.fork(5)) for h in halves]), draw(whole.fork(5)))
        once = [h.randn(2, 3) for h in halves] + [whole.randn(2, 3)]  # not one row per sample: the same everywhere
        assert torch.equal(once[0], once[1]) and torch.equal(once[0], once[2])
        assert not torch.equal(halves[0].x0, halves[1].x0)  # the ranks do get different rows
