"""Image decoding: any file PIL reads -> an upright 8-bit RGB PIL image.

``convert("RGB")`` alone is wrong for several modes: it clips 16-bit and
32-bit integer pixels at 255 (a 16-bit PNG comes out mostly white), clips
float pixels in [0, 1] to 0 or 1 (black), drops the alpha channel (showing
whatever colour transparent pixels happen to store) and ignores the EXIF
orientation. ``to_rgb`` handles every mode PIL has:

=====================================  ==========================================================
mode                                   8-bit RGB
=====================================  ==========================================================
RGB                                    unchanged
1, L, P, RGBX, CMYK, YCbCr, LAB, HSV   PIL's conversion (CMYK without colour management:
                                       R = (255 - C)(255 - K) / 255; LAB with a D50 white point)
I;16, I;16L, I;16B, I;16N              v * 255 / 65535, rounded
I (32-bit integer)                     linear from the file's declared range (TIFF BitsPerSample
                                       and SampleFormat), else [0, 65535] when all values lie in
                                       it (16-bit PNG / PGM data), else the image's min..max
F (32-bit float)                       linear from the smallest of [0, 1], [0, 255], [0, 65535]
                                       that holds all finite values, else min..max; NaN -> 0
LA, La, PA, RGBA, RGBa, P / L / RGB    composited over ``background`` (default white):
with a transparent colour              out = (rgb * a + background * (255 - a)) / 255, rounded
=====================================  ==========================================================

The EXIF orientation (tag 274, also TIFF's own) is applied first, so the
image is upright as a viewer shows it. Multi-frame files (GIF, TIFF) give
their first frame. 48-bit RGB PNGs are reduced to 8 bits by PIL itself
(the high byte, at most 1 level from rounding).

``load_rgb(path)`` decodes a file completely (a truncated file fails here,
not later inside a transform) and raises ``UnreadableImageError`` (an
``OSError``) naming the path for anything PIL cannot decode.
``check_image(path, level)`` is the cheaper test the up-front data check uses.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..errors import ImageError, MissingFileError

__all__ = [
    "BACKGROUND", "CHECK_LEVELS", "IMAGE_SUFFIXES", "UnreadableImageError", "check_image", "exif_upright",
    "find_images", "load_rgb", "to_rgb",
]  # fmt: skip

BACKGROUND = (255, 255, 255)
# File name endings treated as images when a folder is searched.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
CHECK_LEVELS = ("exists", "header", "decode")

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = {"LA": "LA", "La": "LA", "PA": "RGBA", "RGBA": "RGBA", "RGBa": "RGBA"}


class UnreadableImageError(ImageError):
    """An image file that exists but cannot be decoded (an ``OSError`` and a
    ``gkg_pyg.errors.ImageError``); ``path`` is the file.

    Built as ``UnreadableImageError.for_path(path, reason)``; the plain
    one-message constructor is kept so that a DataLoader worker can re-raise
    it in the main process as the same type."""

    def __init__(self, message: str, path: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason if reason is not None else message

    @classmethod
    def for_path(cls, path: str | os.PathLike, reason: str) -> "UnreadableImageError":
        return cls(f"cannot read image {os.fspath(path)}: {reason}", os.fspath(path), reason)


def _scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 (rounded, clipped; NaN -> 0)."""
    values = values.astype(np.float64)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.round((values - lo) * (255.0 / (hi - lo)))
    return np.nan_to_num(np.clip(scaled, 0, 255), nan=0.0).astype(np.uint8)


def _declared_range(image: Image.Image) -> tuple[float, float] | None:
    """The sample range a TIFF declares (BitsPerSample 258, SampleFormat 339)."""
    tags = getattr(image, "tag_v2", None)
    if tags is None or 258 not in tags:
        return None
    bits = tags[258]
    bits = int(bits[0] if isinstance(bits, tuple) else bits)
    fmt = tags.get(339, 1)
    fmt = int(fmt[0] if isinstance(fmt, tuple) else fmt)
    if fmt == 2:  # signed integers
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    if fmt == 1:
        return 0.0, 2.0**bits - 1
    return None


def _value_range(values: np.ndarray, ladder: Sequence[float]) -> tuple[float, float]:
    """The first [0, top] of ``ladder`` holding all finite values, else min..max."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    for top in ladder:
        if lo >= 0 and hi <= top:
            return 0.0, top
    return lo, hi


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float single-channel image as uint8."""
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT:
        # Exact integer rounding of v * 255 / 65535.
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if image.mode == "I":
        lo, hi = _declared_range(image) or _value_range(values, (65535.0,))
    else:  # "F"
        lo, hi = _value_range(values, (1.0, 255.0, 65535.0))
    return _scale_to_uint8(values, lo, hi)


def _composite(image: Image.Image, background: Sequence[int]) -> Image.Image:
    """An LA or RGBA image over an opaque background colour, as RGB."""
    pixels = np.asarray(image).astype(np.uint32)
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    bg = np.asarray(background, dtype=np.uint32).reshape(1, 1, 3)
    # (x + 127) // 255 equals round(x / 255) for integers x (255 is odd).
    out = (colour * alpha + bg * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _has_transparent_colour(image: Image.Image) -> bool:
    return image.mode in ("P", "L", "RGB") and "transparency" in image.info


def exif_upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (itself when upright)."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def to_rgb(image: Image.Image, background: Sequence[int] = BACKGROUND) -> Image.Image:
    """Any PIL image -> an 8-bit RGB image (table in the module docstring):
    a new image, or the image itself when it already is plain RGB.

    The EXIF orientation is not applied here (``load_rgb`` does it).
    """
    if len(background) != 3 or not all(0 <= int(v) <= 255 for v in background):
        raise ValueError(f"background must be three values in 0..255, got {background!r}")
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image  # no copy: a decoded image outlives its closed file (PIL closes only the file)
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(image), "L").convert("RGB")
    if mode in _ALPHA_MODES:
        return _composite(image.convert(_ALPHA_MODES[mode]), background)
    if _has_transparent_colour(image):
        # PIL turns the transparent palette entries / colour key into alpha.
        return _composite(image.convert("RGBA"), background)
    return image.convert("RGB")


def _open_error(path, err: BaseException) -> UnreadableImageError:
    reason = str(err) or type(err).__name__
    if isinstance(err, Image.DecompressionBombError):
        reason += " (PIL.Image.MAX_IMAGE_PIXELS raises the limit)"
    return UnreadableImageError.for_path(path, reason)


def load_rgb(path: str | os.PathLike, background: Sequence[int] = BACKGROUND, exif: bool = True) -> Image.Image:
    """Decode an image file completely into an upright 8-bit RGB PIL image.

    Args:
        path: the file.
        background: the colour transparent pixels are composited over.
        exif: apply the EXIF orientation.
    Raises:
        MissingFileError (a FileNotFoundError): the file does not exist; the
            message names it.
        UnreadableImageError (an OSError): the file is not a decodable image
            (truncated, corrupt, not an image, too large for PIL's
            decompression-bomb limit); the message names the path.
    """
    try:
        with Image.open(path) as image:
            image.load()  # the full decode: truncated files fail here
            upright = exif_upright(image) if exif else image
            return to_rgb(upright, background)
    except FileNotFoundError:
        raise MissingFileError(f"image not found: {os.fspath(path)}") from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        # OSError, SyntaxError, ValueError, struct.error, EOFError, ...: PIL's
        # messages (e.g. for a truncated JPEG) do not name the file.
        raise _open_error(path, err) from err


def check_image(path: str | os.PathLike, level: str = "decode") -> str | None:
    """Why ``path`` is not a usable image, or None when it is.

    Levels: ``"exists"`` (a file is there), ``"header"`` (PIL identifies it
    and ``verify()`` passes: catches non-images, empty files, bad headers and
    PNG checksum errors, not a truncated JPEG), ``"decode"`` (every pixel
    decodes; JPEGs are decoded at 1/8 scale, which still reads all of their
    compressed data, so truncation is found at a fraction of the cost).
    """
    if level not in CHECK_LEVELS:
        raise ValueError(f"unknown image check level {level!r}; expected one of {CHECK_LEVELS}")
    if not os.path.isfile(path):
        return "missing file"
    if level == "exists":
        return None
    try:
        with Image.open(path) as image:
            if level == "header":
                image.verify()
                return None
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            if image.mode not in ("RGB", "L") or _has_transparent_colour(image):
                to_rgb(image)  # the mode conversion can fail too (e.g. a broken palette)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - see load_rgb
        return _open_error(path, err).reason
    return None


def find_images(sources: Sequence[str | os.PathLike], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
    """Image files from files, folders (searched recursively, sorted) and
    glob patterns (``*``, ``?``, ``[...]``; ``**`` spans folders), in the
    order given, without repeats.

    A file named explicitly is kept whatever its ending (it is reported
    later if it cannot be decoded); folders and patterns contribute the
    files whose ending is in ``suffixes`` (case-insensitive).

    Raises:
        MissingFileError (a FileNotFoundError): a source that is no file or
            folder and matches nothing.
    """
    out: list[str] = []
    seen: set[str] = set()
    wanted = tuple(s.lower() for s in suffixes)

    def add(path: str) -> None:
        if path not in seen:
            seen.add(path)
            out.append(path)

    for source in sources:
        source = os.fspath(source)
        if os.path.isfile(source):
            add(source)
        elif os.path.isdir(source):
            for path in sorted(Path(source).rglob("*"), key=lambda p: str(p)):
                if path.is_file() and path.suffix.lower() in wanted:
                    add(str(path))
        elif glob.has_magic(source):
            matches = sorted(glob.glob(source, recursive=True))
            for path in matches:
                if os.path.isfile(path) and Path(path).suffix.lower() in wanted:
                    add(path)
                elif os.path.isdir(path):
                    for found in find_images([path], suffixes):
                        add(found)
            if not matches:
                raise MissingFileError(f"no file matches {source!r}")
        else:
            raise MissingFileError(f"no such file or folder: {source}")
    return out
