"""Images are read by their mode's real range (stepdistill/data/files.py ``to_8bit``), the same way on
every path: a 16-bit grey stays grey, transparency lies on white, a float or 32-bit image whose range
is unknown is refused with one line naming it, and 8-bit RGB / L read exactly as PIL's convert."""

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.data.files import load_images, to_8bit
from stepdistill.data.loading import transform
from stepdistill.errors import DataError

W = 4  # every test image is W x W: resized to W, a data path keeps its pixels as they are


def _grey(values) -> np.ndarray:
    """A W x W array whose rows are ``values`` (W of them)."""
    return np.tile(np.asarray(values), (W, 1))


def _over_white(v: int, alpha: int) -> int:
    return round(v * alpha / 255 + 255 * (255 - alpha) / 255)


def _palette(path, transparent: int | None):
    im = Image.fromarray(_grey([1, 2, 1, 2]).astype(np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)  # 1: red, 2: blue
    if transparent is not None:
        im.info["transparency"] = transparent
    im.save(path)


# name -> (file, a writer of it, expected RGB pixels (W, W, 3) or one RGB colour)
CASES = {
    "I;16 mid-grey": ("g.png", lambda p: Image.fromarray(np.full((W, W), 32896, np.uint16)).save(p), (128, 128, 128)),
    "I;16 rounding": ("r.png", lambda p: Image.fromarray(_grey([0, 128, 129, 65535]).astype(np.uint16)).save(p),
                      _grey([0, 0, 1, 255])),
    "I 16-bit range": ("i16.tif", lambda p: Image.fromarray(_grey([0, 257, 32896, 65535]).astype(np.int32)).save(p),
                       _grey([0, 1, 128, 255])),
    "I 8-bit range": ("i8.tif", lambda p: Image.fromarray(_grey([0, 7, 128, 255]).astype(np.int32)).save(p),
                      _grey([0, 7, 128, 255])),
    "F in [0, 1]": ("f1.tif", lambda p: Image.fromarray(_grey([0, 0.25, 0.5, 1]).astype(np.float32)).save(p),
                    _grey([0, 64, 128, 255])),  # 63.75 and 127.5 round up
    "F in [0, 255]": ("f255.tif", lambda p: Image.fromarray(_grey([0, 7.4, 128, 255]).astype(np.float32)).save(p),
                      _grey([0, 7, 128, 255])),
    "LA": ("la.png", lambda p: Image.new("LA", (W, W), (100, 128)).save(p), (_over_white(100, 128),) * 3),
    "P with a palette": ("p.png", lambda p: _palette(p, None), np.tile([[255, 0, 0], [0, 0, 255]], (W, 2, 1))),
    "P with transparency": ("pt.png", lambda p: _palette(p, 1), np.tile([[255, 255, 255], [0, 0, 255]], (W, 2, 1))),
    "CMYK": ("c.tif", lambda p: Image.new("CMYK", (W, W), (0, 255, 255, 0)).save(p), (255, 0, 0)),
    "RGBA half-transparent red": ("rgba.png", lambda p: Image.new("RGBA", (W, W), (255, 0, 0, 128)).save(p),
                                  (255, _over_white(0, 128), _over_white(0, 128))),
    "1": ("one.png", lambda p: Image.fromarray(_grey([0, 1, 0, 1]).astype(bool)).save(p), _grey([0, 255, 0, 255])),
}


def _expected(want) -> np.ndarray:
    want = np.asarray(want)
    if want.ndim == 1:
        return np.broadcast_to(want, (W, W, 3)).astype(np.uint8)
    return (np.repeat(want[..., None], 3, -1) if want.ndim == 2 else want).astype(np.uint8)


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_is_read_by_its_real_range(tmp_path, case):
    name, write, want = CASES[case]
    path = tmp_path / name
    write(path)
    rgb = _expected(want)
    with Image.open(path) as im:
        got_rgb, got_l = to_8bit(im, 3), to_8bit(im, 1)
    assert got_rgb.mode == "RGB" and got_l.mode == "L"
    np.testing.assert_array_equal(np.asarray(got_rgb), rgb)
    np.testing.assert_array_equal(np.asarray(got_l), np.asarray(Image.fromarray(rgb).convert("L")))
    for channels in (3, 1):  # the data paths: the in-memory set and the loader workers' transform
        a = load_images([path], W, channels)[0][0]
        with Image.open(path) as im:
            b = transform(im, W, channels, "center")[0]
        assert torch.equal(a, b)
        want_t = torch.from_numpy(np.asarray(got_rgb if channels == 3 else got_l, dtype=np.float32) / 255)
        torch.testing.assert_close(a, (want_t.permute(2, 0, 1) if channels == 3 else want_t[None]) * 2 - 1,
                                   rtol=0, atol=1e-6)


def test_a_16_bit_grey_is_mid_grey_for_a_one_channel_teacher(tmp_path):
    Image.fromarray(np.full((W, W), 32896, np.uint16)).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "I;16" and im.convert("L").getpixel((0, 0)) == 255  # what PIL's convert makes of it
    images = load_images([tmp_path / "g.png"], W, 1)[0]
    assert images.shape == (1, 1, W, W)
    torch.testing.assert_close(images, torch.full_like(images, 128 / 255 * 2 - 1))  # about 0.0039


@pytest.mark.parametrize("mode,values,line", [
    ("I", [-5, 0, 7, 70000], r"mode 'I' values -5..70000, outside 0..65535"),
    ("F", [-1, 0, 0.5, 300], r"mode 'F' values -1..300, outside \[0, 1\] and \[0, 255\]"),
    ("F", [0, np.nan, 0.5, 1], r"mode 'F' values nan..nan"),
])
def test_a_range_that_is_neither_8_nor_16_bit_is_refused_naming_the_image(tmp_path, caplog, mode, values, line):
    path = tmp_path / "odd.tif"
    Image.fromarray(_grey(values).astype(np.int32 if mode == "I" else np.float32)).save(path)
    with pytest.raises(DataError, match=rf"^image '.*odd.tif' has {line}.*; remove it or set data.skip_bad_items=true$") as e:
        load_images([path], W, 3)
    assert "\n" not in str(e.value)
    with Image.open(path) as im, pytest.raises(DataError, match=rf"^image '.*odd.tif' has {line}"):
        transform(im, W, 3, "center", what=f"image '{path}'")
    Image.new("RGB", (W, W), (1, 2, 3)).save(tmp_path / "ok.png")
    assert [p.name for p in load_images([path, tmp_path / "ok.png"], W, 3, skip_bad=True)[1]] == ["ok.png"]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_8_bit_rgb_and_grey_read_exactly_as_convert(tmp_path, mode):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (9, 7, 3) if mode == "RGB" else (9, 7), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        for out in ("RGB", "L"):
            assert to_8bit(im, 3 if out == "RGB" else 1).tobytes() == im.convert(out).tobytes()


def _pa():
    p = Image.new("P", (W, W), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pa = p.convert("PA")
    pa.putalpha(128)
    return pa


HALF_RED = (255, _over_white(0, 128), _over_white(0, 128))


@pytest.mark.parametrize("make,want", [
    (_pa, HALF_RED),
    (lambda: Image.new("RGBa", (W, W), (128, 0, 0, 128)), HALF_RED),  # premultiplied: (255, 0, 0) at alpha 128
    (lambda: Image.new("La", (W, W), (64, 128)), (_over_white(127, 128),) * 3),  # premultiplied: about 127
    (lambda: Image.new("HSV", (W, W), (0, 255, 255)), (255, 0, 0)),
    (lambda: Image.new("YCbCr", (W, W), (76, 85, 255)), (254, 0, 0)),  # PIL's own conversion of (about) red
    (lambda: Image.new("LAB", (W, W), (255, 128, 128)), (254, 255, 254)),  # PIL's own: L 100, a = b = 0 (white)
], ids=["PA", "RGBa", "La", "HSV", "YCbCr", "LAB"])
def test_modes_made_in_memory_are_read_too(make, want):
    im = make()
    rgb = _expected(want)
    np.testing.assert_array_equal(np.asarray(to_8bit(im, 3)), rgb)
    np.testing.assert_array_equal(np.asarray(to_8bit(im, 1)), np.asarray(Image.fromarray(rgb).convert("L")))
