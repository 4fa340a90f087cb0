"""Decoding and finding image files, without torch (the ONNX predictor uses this module too).

Every reader of images in the project goes through `load_rgb` and `resize_square`, so a deployment
that reads images with this module feeds its model exactly the pixels training and inference saw.
"""
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
from PIL import Image

from util.cli import UserError

# Formats whose Pillow plugin only identifies files and cannot decode their pixels here (stubs that need
# a handler, a PostScript interpreter or Windows): listing such files as images would only make them fail.
_UNDECODED_FORMATS = ("BUFR", "EPS", "GRIB", "HDF5", "MPEG", "WMF")


def _decoded_extensions() -> tuple[str, ...]:
    """Every file extension of a format Pillow can decode (png, jpg, bmp, tif, webp, gif, ...)."""
    Image.init()  # registers every plugin, so the list does not depend on what was opened before
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                        if fmt in Image.OPEN and fmt not in _UNDECODED_FORMATS))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMG_EXTENSIONS = _decoded_extensions()
COMMON_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")  # named in messages

PathLike = Union[str, Path]


class UnreadableImage(Exception):
    """A file that cannot be decoded as an image (zero bytes, truncated, not an image).

    `reason` says why without the path (for lists of skipped files); str() names the path too.
    """

    def __init__(self, path: PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def is_image_file(path: PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def open_decoded(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # force the full decode: Image.open only reads the header
        return img
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UnreadableImage(path, f"cannot read image ({reason})") from e


def _to_uint8_gray(img: Image.Image) -> np.ndarray:
    """Integer/float single-channel modes ('I;16*', 'I', 'F') -> uint8, scaled by their range."""
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    if img.mode.startswith("I;16"):
        scale = 65535.0
    elif img.mode == "F" and a.size and np.nanmax(a) <= 1.0:
        scale = 1.0  # float images in [0, 1]
    else:
        # 'I' (Pillow opens some 16-bit files as 32-bit 'I'): use the smallest usual range that
        # holds the data, so a 16-bit image is value/257 and an 8-bit one stays as it is.
        hi = float(np.nanmax(a)) if a.size else 0.0
        scale = 255.0 if hi <= 255 else 65535.0 if hi <= 65535 else hi
    a = np.nan_to_num(a / scale * 255.0)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _composite_on_black(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def load_rgb(path: PathLike) -> Image.Image:
    """Decode an image fully and return it in RGB mode.

    Grayscale is replicated, transparent images are composited on black, palette/CMYK/other modes
    converted, 16-bit images scaled to 8 bit (value/257). EXIF orientation is not applied: masks
    are drawn on the stored pixel grid. Raises UnreadableImage naming the path.
    """
    path = Path(path)
    img = open_decoded(path)
    try:
        mode = img.mode
        if mode == "RGB":
            return img
        if mode in ("RGBA", "LA", "RGBa", "La", "PA") or (mode == "P" and "transparency" in img.info):
            return _composite_on_black(img)
        if mode.startswith("I") or mode == "F":
            return Image.fromarray(_to_uint8_gray(img)).convert("RGB")
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    except Exception as e:
        raise UnreadableImage(path, f"cannot convert image of mode {img.mode} to RGB ({e})") from e


def visible_files(folder: Path) -> List[Path]:
    """Files under `folder` at any depth, hidden files and folders skipped, by relative path."""
    out = [p for p in folder.rglob("*")
           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def list_images_recursive(folder: Path) -> List[Path]:
    """Image files under `folder` at any depth (hidden files and folders skipped), by relative path."""
    return [p for p in visible_files(folder) if is_image_file(p)]


def other_files(path: PathLike) -> List[Tuple[Path, str]]:
    """The files `find_images(path)` passes over (not hidden, no image extension), as (absolute path,
    path relative to PATH) pairs: a run lists them as not scored rather than ignoring them silently."""
    path = Path(path)
    if not path.is_dir():
        return []
    base = path.absolute()
    return [(base / p.relative_to(path), p.relative_to(path).as_posix())
            for p in visible_files(path) if not is_image_file(p)]


def not_image_reason(path: PathLike) -> str:
    suffix = Path(path).suffix.lower()
    return f"not an image: no format Pillow decodes has the extension {suffix}" if suffix else \
        "not an image: the file name has no extension"


def squash_note(resized: List[Tuple[str, Tuple[int, int]]], total: int, size: int) -> str:
    """The one line a run prints when it squashes non-square images: how many, and an example.

    resized: (name, (width, height)) of each non-square image."""
    name, (w, h) = resized[0]
    return (f"{len(resized)} of {total} images are not square (e.g. {name}, {w}x{h}): each is resized to "
            f"{size}x{size} without cropping, which stretches it; crop them to square for undistorted maps")


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> uint8 [size, size, 3], bicubic; non-square images are squashed (no crop)."""
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def find_images(path: PathLike) -> List[Tuple[Path, str]]:
    """`--images PATH`: one image file, or every image under a folder (recursive).

    Returns (absolute path, path relative to PATH with posix separators) pairs, sorted.
    """
    path = Path(path)
    if path.is_file():
        if not is_image_file(path):
            raise UserError(f"--images {path}: {not_image_reason(path)} (e.g. "
                            f"{', '.join(COMMON_EXTENSIONS)})")
        return [(path.absolute(), path.name)]
    if not path.is_dir():
        raise UserError(f"--images {path} does not exist; pass an image file or a folder of images")
    files = list_images_recursive(path)
    if not files:
        raise UserError(f"--images {path}: no images found (searched recursively for the formats Pillow "
                        f"decodes: {', '.join(COMMON_EXTENSIONS)} ...)")
    base = path.absolute()
    return [(base / p.relative_to(path), p.relative_to(path).as_posix()) for p in files]
