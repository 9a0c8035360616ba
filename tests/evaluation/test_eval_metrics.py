"""FID (clean-fid protocol) and CLIP score (open_clip): the maths against independent computations,
the preprocessing against PIL and clean-fid, and every offline failure as one clear error."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from stepdistill.evaluation import fid as F
from stepdistill.evaluation.clip_score import CLIPScorer, check_clip_weights
from stepdistill.testing.tiny_eval_models import make_tiny_coco, make_tiny_inception, make_tiny_open_clip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmodels")
    return {"inception": make_tiny_inception(root / "inc.pt"), "clip": make_tiny_open_clip(root / "clip"),
            "coco": make_tiny_coco(root / "coco", num_images=6)}


def _scipy_fid(mu1, s1, mu2, s2):
    """The textbook formula with a general (non-symmetric) matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("dim,n", [(16, 400), (64, 1000)])
def test_frechet_distance_agrees_with_scipy_sqrtm(dim, n):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
    b = 0.7 * rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    (mu1, s1), (mu2, s2) = F.statistics(a), F.statistics(b)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-12)
    ours = F.frechet_distance(mu1, s1, mu2, s2)
    ref = _scipy_fid(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert abs(ours - ref) / ref < 1e-6, (ours, ref)
    assert abs(F.frechet_distance(mu2, s2, mu1, s1) - ours) / ours < 1e-9  # symmetric
    assert abs(F.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)  # zero on itself


def test_frechet_distance_rank_deficient_and_shape_errors():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 12)), rng.normal(size=(5, 12)) + 1  # fewer images than features
    fd = F.frechet_distance(*F.statistics(a), *F.statistics(b))
    assert np.isfinite(fd) and fd > 0
    with pytest.raises(F.EvalError, match="do not match"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(F.EvalError, match="at least 2"):
        F.statistics(np.zeros((1, 3)))


def test_center_crop_resize_is_centre_crop_then_lanczos():
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)  # H=30, W=40
    crop = F.center_crop_resize(wide, None)
    np.testing.assert_array_equal(crop, wide[:, 5:35])
    tall = rng.integers(0, 256, size=(41, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(F.center_crop_resize(tall, None), tall[10:30])
    out = F.center_crop_resize(wide, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(wide[:, 5:35]).resize((16, 16), Image.LANCZOS))
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, np.asarray(Image.fromarray(wide[:, 5:35]).resize((16, 16), Image.BICUBIC)))
    grey = Image.fromarray(wide[..., 0])  # mode L comes back as RGB
    assert F.center_crop_resize(grey, 8).shape == (8, 8, 3)


def test_image_features_follow_the_protocol(models, tmp_path):
    from cleanfid.resize import make_resizer

    ext = F.load_inception(models["inception"])
    files = F.list_images(models["coco"] / "val2014")[:3]
    feats = F.image_features(files, ext, eval_size=24, batch_size=2, verbose=False)
    clean = make_resizer("PIL", False, "bicubic", (299, 299))
    manual = []
    for f in files:
        x = clean(F.center_crop_resize(Image.open(f), 24))
        manual.append(ext(torch.from_numpy(x).permute(2, 0, 1)[None].float()).numpy()[0])
    np.testing.assert_allclose(feats, np.stack(manual), rtol=1e-5, atol=1e-6)
    other = F.image_features(files, ext, eval_size=None, verbose=False)
    assert not np.allclose(other, feats)  # the eval size matters


def test_image_files_are_read_by_their_real_range(models, tmp_path):
    """FID and CLIP score read files through data.files.to_8bit: a 16-bit mid-grey PNG gives the
    features of an 8-bit grey of 128 (clean-fid's own reading, convert("RGB"), makes it white), a
    half-transparent image lies on white, and an unreadable file is one line naming it."""
    Image.fromarray(np.full((24, 24), 32896, np.uint16)).save(tmp_path / "g16.png")
    Image.new("RGB", (24, 24), (128, 128, 128)).save(tmp_path / "g8.png")
    Image.new("RGBA", (24, 24), (255, 0, 0, 128)).save(tmp_path / "red.png")
    Image.new("RGB", (24, 24), (255, 127, 127)).save(tmp_path / "red_on_white.png")
    ext = F.load_inception(models["inception"])
    feats = F.image_features([tmp_path / n for n in ("g16.png", "g8.png", "red.png", "red_on_white.png")], ext,
                             eval_size=24, batch_size=2, verbose=False)
    np.testing.assert_array_equal(feats[0], feats[1])
    np.testing.assert_array_equal(feats[2], feats[3])
    assert (F.center_crop_resize(Image.open(tmp_path / "g16.png"), None) == 128).all()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for workers in (0, 2):
        with pytest.raises(F.EvalError, match=r"^image '.*bad.png' cannot be read \(UnidentifiedImageError\)$"):
            F.image_features([tmp_path / "g8.png", tmp_path / "bad.png"], ext, eval_size=24, num_workers=workers,
                             verbose=False)
    scorer = CLIPScorer(str(models["clip"]), None)
    a = scorer.score_files([tmp_path / "g16.png", tmp_path / "red.png"], ["grey", "red"], verbose=False)
    b = scorer.score_files([tmp_path / "g8.png", tmp_path / "red_on_white.png"], ["grey", "red"], verbose=False)
    np.testing.assert_array_equal(a, b)


def test_inception_weights_missing_or_wrong(tmp_path, monkeypatch):
    with pytest.raises(F.EvalError, match=r"--inception-weights .*nope.pt: no such file"):
        F.resolve_inception(tmp_path / "nope.pt")
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(F.EvalError, match=r"offline; download https://.*inception-2015-12-05.pt and pass --inception-weights"):
        F.resolve_inception(None)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a network")
    with pytest.raises(F.EvalError, match="not a TorchScript feature network"):
        F.load_inception(bad)
    folder = tmp_path / "weights"
    folder.mkdir()
    make_tiny_inception(folder / F.INCEPTION_FILE)
    assert F.resolve_inception(folder) == folder / F.INCEPTION_FILE  # a folder holding the file works too


def test_fid_cli_ref_then_calc(models, tmp_path):
    coco = models["coco"] / "val2014"
    gen = tmp_path / "gen"
    gen.mkdir()
    # a "generated" set: the real images, mirrored and darkened. (Mirrored only, the tiny feature net's
    # FID is ~1e-5, where float32 feature noise alone exceeds the 1e-6 relative tolerance.)
    for i, f in enumerate(F.list_images(coco)):
        Image.open(f).transpose(Image.FLIP_LEFT_RIGHT).point(lambda v: v // 2).save(gen / f"{i}.png")
    base = [sys.executable, "-m", "stepdistill", "fid"]
    common = ["--eval-size", "32", "--inception-weights", str(models["inception"]), "--device", "cpu"]
    r = subprocess.run(base + ["ref", str(coco), str(tmp_path / "ref.npz"), *common], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(base + ["calc", str(gen), "--ref", str(tmp_path / "ref.npz"), "--json", str(tmp_path / "r.json"),
                        *common], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    ext = F.load_inception(models["inception"])
    a = F.image_features(F.list_images(gen), ext, eval_size=32, verbose=False)
    b = F.image_features(F.list_images(coco), ext, eval_size=32, verbose=False)
    expected = _scipy_fid(*F.statistics(a), *F.statistics(b))
    assert res["fid"] > 0 and abs(res["fid"] - expected) / expected < 1e-6
    assert res["protocol"]["eval_size"] == 32 and "LANCZOS" in res["protocol"]["resize"]
    assert res["ref_num_images"] == 6
    # a reference made at another eval size is refused, naming the setting
    common[1] = "64"
    r = subprocess.run(base + ["calc", str(gen), "--ref", str(tmp_path / "ref.npz"), *common], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "another protocol: eval_size: 32 (reference) vs 64" in r.stderr


def test_clip_score_on_a_tiny_local_open_clip_model(models):
    import open_clip
    from safetensors.torch import load_file

    scorer = CLIPScorer(str(models["clip"]), None)
    saved = load_file(models["clip"] / "open_clip_model.safetensors")
    for k, v in scorer.model.state_dict().items():  # the weights are the file's
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    files = F.list_images(models["coco"] / "val2014")
    caps = ["a red cat", "a dog on the grass", "a blue bus", "the table", "a street", "a cat sitting"]
    scores = scorer.score_files(files, caps, batch_size=4, verbose=False)
    # independent computation: open_clip directly, caption prefixed
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{models['clip']}")
    tok = open_clip.get_tokenizer(f"local-dir:{models['clip']}")
    with torch.no_grad():
        im = model.encode_image(torch.stack([pre(Image.open(f).convert("RGB")) for f in files]))
        tx = model.encode_text(tok(["A photo depicts " + c for c in caps]))
        raw = model.encode_text(tok(caps))
    cos = torch.nn.functional.cosine_similarity(im, tx).numpy()
    np.testing.assert_allclose(scores, cos, rtol=1e-5, atol=1e-6)
    assert not np.allclose(scores, torch.nn.functional.cosine_similarity(im, raw).numpy(), atol=1e-4)  # prefix used
    assert np.all(np.abs(scores) <= 1)
    np.testing.assert_allclose(scorer.score_files(files, caps, batch_size=6, verbose=False), scores, rtol=1e-5, atol=1e-6)
    assert scorer.settings["clip_prefix"] == "A photo depicts "
    with pytest.raises(F.EvalError, match="6 images but 2 captions"):
        scorer.score_files(files, caps[:2])


def test_clip_weights_missing(models, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(F.EvalError, match=r"ViT-g-14/laion2b_s12b_b42k are not in the cache .* --clip-pretrained PATH"):
        check_clip_weights("ViT-g-14", "laion2b_s12b_b42k")
    with pytest.raises(F.EvalError, match=r"--clip-pretrained .*missing.bin: no such file"):
        check_clip_weights("ViT-g-14", str(tmp_path / "missing.bin"))
    with pytest.raises(F.EvalError, match=r"--clip-model .*: no open_clip_config.json"):
        check_clip_weights(str(tmp_path))
    with pytest.raises(F.EvalError, match="neither an open_clip model name nor a folder"):
        check_clip_weights("ViT-Q-99")
    check_clip_weights(str(models["clip"]), None)  # the local folder passes
