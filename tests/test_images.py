"""Image decoding: every PIL mode against a reference decode written with
numpy (or colorsys), from files in real formats where PIL can write them;
the up-front check levels; finding images in files, folders and globs."""

from __future__ import annotations

import colorsys
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gkg_pyg.data.images import (
    UnreadableImageError, check_image, exif_upright, find_images, load_rgb, to_rgb,
)  # fmt: skip


@pytest.fixture
def rng():
    """Each test's own generator: its values do not depend on which tests ran before it."""
    return np.random.default_rng(0)


WHITE = np.array([255, 255, 255])


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def _gray_ref(values, lo, hi) -> np.ndarray:
    """Reference: linear [lo, hi] -> 0..255 in float64, rounded, as RGB."""
    v = np.clip(np.round((np.asarray(values, dtype=np.float64) - lo) / (hi - lo) * 255.0), 0, 255)
    v = np.nan_to_num(v, nan=0.0)
    return np.repeat(v[..., None], 3, axis=-1).astype(np.int64)


def _composite_ref(colour, alpha, background=WHITE) -> np.ndarray:
    colour = np.asarray(colour, dtype=np.float64)
    if colour.ndim == 2:
        colour = np.repeat(colour[..., None], 3, axis=-1)
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255.0
    return np.round(colour * a + np.asarray(background) * (1 - a)).astype(np.int64)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


# ----------------------------------------------------------------- plain modes
def test_rgb_jpeg_unchanged(tmp_path, rng):
    path = _save(Image.fromarray(rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)), tmp_path / "a.jpg")
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB")).astype(np.int64)
    out = load_rgb(path)
    assert out.size == (23, 17)
    assert np.array_equal(_rgb(out), expected)


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff"])
def test_bilevel_and_gray(tmp_path, fmt, rng):
    bits = rng.integers(0, 2, (9, 13)).astype(bool)
    gray = rng.integers(0, 256, (9, 13), dtype=np.uint8)
    out1 = load_rgb(_save(Image.fromarray(bits), tmp_path / f"b.{fmt}"))
    assert np.array_equal(_rgb(out1), np.repeat(bits[..., None] * 255, 3, axis=-1))
    outl = load_rgb(_save(Image.fromarray(gray), tmp_path / f"g.{fmt}"))
    assert np.array_equal(_rgb(outl), np.repeat(gray[..., None], 3, axis=-1).astype(np.int64))


def test_palette_without_transparency(tmp_path, rng):
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (8, 11), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.tobytes())
    for name in ("p.png", "p.gif", "p.bmp"):
        out = load_rgb(_save(im, tmp_path / name))
        assert np.array_equal(_rgb(out), palette[index].astype(np.int64)), name


# ------------------------------------------------------------- high bit depths
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_sixteen_bit_gray(tmp_path, fmt, rng):
    values = np.concatenate([[0, 1, 128, 129, 255, 256, 257, 32767, 32768, 65534, 65535],
                             rng.integers(0, 65536, 53)]).astype(np.uint16).reshape(8, 8)  # fmt: skip
    path = _save(Image.fromarray(values), tmp_path / f"s.{fmt}")
    with Image.open(path) as im:
        assert im.mode.startswith("I;16"), im.mode
    assert np.array_equal(_rgb(load_rgb(path)), _gray_ref(values, 0, 65535))
    # What convert("RGB") alone does: clips everything above 255 (the bug this fixes).
    with Image.open(path) as im:
        assert (np.asarray(im.convert("RGB"))[..., 0] == 255).mean() > 0.5


def test_sixteen_bit_big_endian_tiff(tmp_path, rng):
    values = rng.integers(0, 65536, (6, 7)).astype(np.uint16)
    im = Image.frombytes("I;16B", (7, 6), values.astype(">u2").tobytes())
    path = _save(im, tmp_path / "be.tiff")
    with Image.open(path) as reread:
        assert reread.mode in ("I;16B", "I;16"), reread.mode
    assert np.array_equal(_rgb(load_rgb(path)), _gray_ref(values, 0, 65535))
    assert np.array_equal(_rgb(to_rgb(im)), _gray_ref(values, 0, 65535))


def test_sixteen_bit_pgm_opens_as_I(tmp_path, rng):
    values = rng.integers(0, 65536, (5, 6)).astype(np.uint16)
    path = tmp_path / "s.pgm"
    path.write_bytes(b"P5\n6 5\n65535\n" + values.astype(">u2").tobytes())
    with Image.open(path) as im:
        mode = im.mode
    assert mode in ("I", "I;16", "I;16B")
    assert np.array_equal(_rgb(load_rgb(path)), _gray_ref(values, 0, 65535))


def test_int32_tiff_uses_declared_range(tmp_path):
    values = np.array([-(2**31), -1, 0, 1, 2**20, 2**31 - 1] * 4, dtype=np.int32).reshape(4, 6)
    path = _save(Image.fromarray(values), tmp_path / "i.tiff")
    with Image.open(path) as im:
        assert im.mode == "I" and im.tag_v2[339] in (2, (2,))  # signed integers
    assert np.array_equal(_rgb(load_rgb(path)), _gray_ref(values, -(2**31), 2**31 - 1))


def test_int32_in_memory_ranges(rng):
    sixteen = rng.integers(0, 65536, (4, 5)).astype(np.int32)
    assert np.array_equal(_rgb(to_rgb(Image.fromarray(sixteen))), _gray_ref(sixteen, 0, 65535))
    wide = np.array([[-5, 0, 70000, 1_000_000]], dtype=np.int32)  # no fixed range: min..max
    assert np.array_equal(_rgb(to_rgb(Image.fromarray(wide))), _gray_ref(wide, -5, 1_000_000))
    flat = np.full((2, 2), 70000, dtype=np.int32)
    assert _rgb(to_rgb(Image.fromarray(flat))).max() == 0


@pytest.mark.parametrize(
    "values, lo, hi",
    [
        (np.linspace(0.0, 1.0, 12), 0.0, 1.0),
        (np.linspace(0.0, 1.0, 12) * 0.3, 0.0, 1.0),  # dark, still the [0, 1] scale
        (np.linspace(0.0, 200.0, 12), 0.0, 255.0),
        (np.linspace(0.0, 4000.0, 12), 0.0, 65535.0),
        (np.linspace(-2.0, 3.0, 12), -2.0, 3.0),  # no fixed range: min..max
    ],
)
def test_float_tiff(tmp_path, values, lo, hi):
    values = values.astype(np.float32).reshape(3, 4)
    path = _save(Image.fromarray(values), tmp_path / "f.tiff")
    with Image.open(path) as im:
        assert im.mode == "F"
    assert np.array_equal(_rgb(load_rgb(path)), _gray_ref(values, lo, hi))


def test_float_nan_and_inf():
    values = np.array([[0.0, 0.5, np.nan, 1.0, np.inf]], dtype=np.float32)
    out = _rgb(to_rgb(Image.fromarray(values)))[0, :, 0]
    assert out.tolist() == [0, 128, 0, 255, 255]


def test_sixteen_bit_rgb_png_within_one_level(tmp_path, rng):
    # PIL reads 48-bit PNGs as 8-bit RGB itself (the high byte): written by hand here.
    values = rng.integers(0, 65536, (5, 4, 3)).astype(np.uint16)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 5, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))  # fmt: skip
    path = tmp_path / "rgb48.png"
    path.write_bytes(png)
    expected = np.round(values / 65535.0 * 255.0)
    assert np.abs(_rgb(load_rgb(path)) - expected).max() <= 1


# ----------------------------------------------------------------- transparency
def test_rgba_and_la_png_composited_over_background(tmp_path, rng):
    colour = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)
    rgba = _save(Image.fromarray(np.dstack([colour, alpha]), "RGBA"), tmp_path / "a.png")
    assert np.array_equal(_rgb(load_rgb(rgba)), _composite_ref(colour, alpha))
    black = (0, 0, 0)
    assert np.array_equal(_rgb(load_rgb(rgba, background=black)), _composite_ref(colour, alpha, np.zeros(3)))
    la = _save(Image.fromarray(np.dstack([colour[..., 0], alpha]), "LA"), tmp_path / "la.png")
    assert np.array_equal(_rgb(load_rgb(la)), _composite_ref(colour[..., 0], alpha))
    # Fully transparent pixels are the background, opaque ones their colour.
    out = _rgb(load_rgb(rgba))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == colour[0, 1].tolist()


def test_webp_rgba(tmp_path, rng):
    colour = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    path = _save(Image.fromarray(np.dstack([colour, alpha]), "RGBA"), tmp_path / "a.webp", lossless=True)
    assert np.array_equal(_rgb(load_rgb(path)), _composite_ref(colour, alpha))


def test_premultiplied_modes(rng):
    colour = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    alpha = np.full((4, 5), 255, dtype=np.uint8)
    alpha[0] = 0
    rgba = Image.fromarray(np.dstack([colour, alpha]), "RGBA")
    # Opaque pixels survive premultiplication exactly; transparent ones become the background.
    out = _rgb(to_rgb(rgba.convert("RGBa")))
    assert np.array_equal(out, _composite_ref(colour, alpha))
    la = Image.fromarray(np.dstack([colour[..., 0], alpha]), "LA")
    assert np.array_equal(_rgb(to_rgb(la.convert("La"))), _composite_ref(colour[..., 0], alpha))


@pytest.mark.parametrize("name", ["t.png", "t.gif"])
def test_palette_with_transparent_index(tmp_path, name, rng):
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (7, 8), dtype=np.uint8)
    index[0, 0] = 5
    im = Image.fromarray(index, "P")
    im.putpalette(palette.tobytes())
    path = _save(im, tmp_path / name, transparency=5)
    alpha = np.where(index == 5, 0, 255)
    assert np.array_equal(_rgb(load_rgb(path)), _composite_ref(palette[index], alpha))


def test_palette_with_alpha_table_png(tmp_path, rng):
    palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    alphas = np.array([0, 90, 200, 255])
    index = rng.integers(0, 4, (5, 6), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.tobytes())
    path = _save(im, tmp_path / "pa.png", transparency=bytes(alphas.astype(np.uint8)))
    assert np.array_equal(_rgb(load_rgb(path)), _composite_ref(palette[index], alphas[index]))
    pa = Image.frombytes("PA", (6, 5), np.dstack([index, alphas[index]]).astype(np.uint8).tobytes())
    pa.putpalette(palette.tobytes())
    assert np.array_equal(_rgb(to_rgb(pa)), _composite_ref(palette[index], alphas[index]))


def test_gray_and_rgb_with_transparent_colour(tmp_path, rng):
    gray = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    gray[0, 0] = 77
    path = _save(Image.fromarray(gray), tmp_path / "l.png", transparency=77)
    alpha = np.where(gray == 77, 0, 255)
    assert np.array_equal(_rgb(load_rgb(path)), _composite_ref(gray, alpha))
    colour = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    colour[1, 1] = (1, 2, 3)
    path = _save(Image.fromarray(colour), tmp_path / "rgb.png", transparency=(1, 2, 3))
    alpha = np.where((colour == (1, 2, 3)).all(-1), 0, 255)
    assert np.array_equal(_rgb(load_rgb(path)), _composite_ref(colour, alpha))


# ----------------------------------------------------------------- colour spaces
def test_cmyk(tmp_path, rng):
    cmyk = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    expected = np.round((255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0)
    path = _save(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.tiff")
    assert np.abs(_rgb(load_rgb(path)) - expected).max() <= 1
    jpeg = _save(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.jpg", quality=100)
    with Image.open(jpeg) as im:
        assert im.mode == "CMYK"
        decoded = np.asarray(im).astype(np.float64)  # the lossy CMYK pixels, then the reference formula
    expected = np.round((255.0 - decoded[..., :3]) * (255.0 - decoded[..., 3:]) / 255.0)
    assert np.abs(_rgb(load_rgb(jpeg)) - expected).max() <= 1


def test_ycbcr(rng):
    ycc = rng.integers(16, 240, (5, 6, 3)).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    expected = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    expected = np.clip(np.round(expected), 0, 255)
    out = _rgb(to_rgb(Image.fromarray(ycc.astype(np.uint8), "YCbCr")))
    assert np.abs(out - expected).max() <= 1


def _lab_reference(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CIELAB (D50; PIL's 8-bit encoding: L * 255 / 100, a and b as signed bytes) -> sRGB:
    XYZ, Bradford D50 -> D65, sRGB gamma. Also which pixels lie inside the sRGB gamut (outside
    it a converter's clipping is its own choice: PIL's differs from clipping linear RGB)."""
    L = lab[..., 0].astype(np.float64) * 100.0 / 255.0
    a, b = lab[..., 1].view(np.int8).astype(np.float64), lab[..., 2].view(np.int8).astype(np.float64)
    fy = (L + 16.0) / 116.0
    fx, fz = fy + a / 500.0, fy - b / 200.0

    def finv(t):
        return np.where(t > 6 / 29, t**3, 3 * (6 / 29) ** 2 * (t - 4 / 29))

    xyz = np.stack([0.9642 * finv(fx), finv(fy), 0.8249 * finv(fz)], axis=-1)
    bradford = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
                         [0.0122982, -0.0204830, 1.3299098]])  # fmt: skip
    to_rgb_matrix = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                              [0.0556434, -0.2040259, 1.0572252]])  # fmt: skip
    linear = xyz @ bradford.T @ to_rgb_matrix.T
    in_gamut = ((linear >= 0.0) & (linear <= 1.0)).all(axis=-1)
    linear = np.clip(linear, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.round(srgb * 255.0), in_gamut


def test_lab(tmp_path, rng):
    # L 20..90, |a|, |b| <= 25; compared where the colour lies inside the sRGB gamut.
    lab = np.stack([rng.integers(51, 230, (16, 16)), rng.integers(-25, 26, (16, 16)) & 0xFF,
                    rng.integers(-25, 26, (16, 16)) & 0xFF], axis=-1).astype(np.uint8)  # fmt: skip
    im = Image.fromarray(lab, "LAB")
    expected, in_gamut = _lab_reference(lab)
    assert in_gamut.mean() > 0.5
    # Mid grey and white land where they should.
    grey_white = Image.fromarray(np.array([[[128, 0, 0], [255, 0, 0]]], dtype=np.uint8), "LAB")
    assert np.abs(_rgb(to_rgb(grey_white))[0] - [[119, 119, 119], [255, 255, 255]]).max() <= 1
    # PIL's conversion is within a level or two of the formula for most colours and further off
    # (up to about 20 levels) for a few percent, dark red components; a missing conversion, or
    # another white point, moves every colour.
    for image in (to_rgb(im), load_rgb(_save(im, tmp_path / "lab.tiff"))):
        error = np.abs(_rgb(image) - expected)[in_gamut]
        assert error.mean() < 1 and (error <= 3).mean() > 0.9, (error.mean(), (error <= 3).mean())


def test_hsv(rng):
    hsv = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    expected = np.array([[colorsys.hsv_to_rgb(*(px / 255.0)) for px in row] for row in hsv]) * 255.0
    out = _rgb(to_rgb(Image.fromarray(hsv, "HSV")))
    assert np.abs(out - expected).max() <= 1


def test_rgbx(rng):
    rgbx = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    assert np.array_equal(_rgb(to_rgb(Image.fromarray(rgbx, "RGBX"))), rgbx[..., :3].astype(np.int64))


def test_every_pil_mode_gives_rgb():
    modes = ["1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
             "I", "F", "I;16", "I;16L", "I;16B", "I;16N"]  # fmt: skip
    for mode in modes:
        out = to_rgb(Image.new(mode, (3, 2)))
        assert out.mode == "RGB" and out.size == (3, 2), mode


def test_background_argument_checked():
    with pytest.raises(ValueError, match="background"):
        to_rgb(Image.new("RGBA", (1, 1)), background=(0, 0))


# ----------------------------------------------------------------- orientation
# EXIF orientation -> the numpy operation that makes the stored pixels upright.
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation(tmp_path, orientation, rng):
    # Blocks of 8 px make the JPEG nearly lossless and the layout unmistakable.
    blocks = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[274] = orientation
    path = _save(im, tmp_path / f"o{orientation}.jpg", exif=exif, quality=100)
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB")).astype(np.int64)
    out = _rgb(load_rgb(path))
    assert np.array_equal(out, ORIENTATIONS[orientation](stored))
    assert np.array_equal(_rgb(load_rgb(path, exif=False)), stored)
    with Image.open(path) as raw:
        assert exif_upright(raw).size == out.shape[1::-1]


# ------------------------------------------------------------------ bad files
def _jpeg_bytes(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_unreadable_files_name_the_path(tmp_path, rng):
    data = _jpeg_bytes(rng)
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_bytes(b"not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("trunc.jpg", "text.jpg", "empty.png"):
        with pytest.raises(UnreadableImageError, match=name) as info:
            load_rgb(tmp_path / name)
        assert info.value.path == str(tmp_path / name) and isinstance(info.value, OSError)
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "nothere.jpg")


def test_decompression_bomb_is_reported_with_path(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (40, 40)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 x 100: PIL refuses
    with pytest.raises(UnreadableImageError, match="big.png.*MAX_IMAGE_PIXELS"):
        load_rgb(path)


def test_check_levels(tmp_path, rng):
    data = _jpeg_bytes(rng)
    good = tmp_path / "good.jpg"
    good.write_bytes(data)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(data[: int(len(data) * 0.9)])
    text = tmp_path / "text.png"
    text.write_bytes(b"hello")
    png = _save(Image.new("RGB", (30, 30), (1, 2, 3)), tmp_path / "p.png")
    bad_crc = tmp_path / "crc.png"
    raw = bytearray(png.read_bytes())
    raw[-20] ^= 0xFF  # inside the IDAT data: its CRC no longer matches
    bad_crc.write_bytes(bytes(raw))
    missing = tmp_path / "missing.jpg"

    def verdicts(level):
        return {p.name: check_image(p, level) is None for p in (good, trunc, text, png, bad_crc, missing)}

    assert verdicts("exists") == {"good.jpg": True, "trunc.jpg": True, "text.png": True, "p.png": True,
                                  "crc.png": True, "missing.jpg": False}  # fmt: skip
    # verify() does not decode JPEG data: the truncated JPEG passes the header check.
    assert verdicts("header") == {"good.jpg": True, "trunc.jpg": True, "text.png": False, "p.png": True,
                                  "crc.png": False, "missing.jpg": False}  # fmt: skip
    assert verdicts("decode") == {"good.jpg": True, "trunc.jpg": False, "text.png": False, "p.png": True,
                                  "crc.png": False, "missing.jpg": False}  # fmt: skip
    assert check_image(missing, "decode") == "missing file"
    assert "truncated" in check_image(trunc, "decode")
    with pytest.raises(ValueError, match="level"):
        check_image(good, "full")


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95, 0.995])
def test_decode_check_finds_truncated_jpeg_like_load_rgb(tmp_path, cut, rng):
    data = _jpeg_bytes(rng)
    path = tmp_path / "t.jpg"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(UnreadableImageError):
        load_rgb(path)
    assert check_image(path, "decode") is not None


# ------------------------------------------------------------------ finding
def test_find_images(tmp_path):
    for name in ("a/x.jpg", "a/b/y.PNG", "a/b/notes.txt", "c/z.webp", "d.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = find_images([tmp_path / "a", str(tmp_path / "c" / "*.webp"), tmp_path / "d.jpeg",
                         tmp_path / "a" / "x.jpg", tmp_path / "a" / "b" / "notes.txt"])  # fmt: skip
    rel = [str(Path(p).relative_to(tmp_path)) for p in found]
    assert rel == ["a/b/y.PNG", "a/x.jpg", "c/z.webp", "d.jpeg", "a/b/notes.txt"]
    assert [Path(p).name for p in find_images([str(tmp_path / "**" / "*.jpg")])] == ["x.jpg"]
    with pytest.raises(FileNotFoundError, match="nothing"):
        find_images([tmp_path / "nothing"])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        find_images([str(tmp_path / "*.gif")])
