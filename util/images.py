"""Decoding and finding image files, without torch (the ONNX predictor uses this module too).

Every reader of images in the project goes through `load_rgb` and `resize_square`, so a deployment
that reads images with this module feeds its model exactly the pixels training and inference saw.
"""
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
from PIL import Image

from util.cli import UserError

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

PathLike = Union[str, Path]


class UnreadableImage(Exception):
    """A file that cannot be decoded as an image (zero bytes, truncated, not an image)."""


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
        raise UnreadableImage(f"{path}: cannot read image ({reason})") from e


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
        raise UnreadableImage(f"{path}: cannot convert image of mode {img.mode} to RGB ({e})") from e


def list_images_recursive(folder: Path) -> List[Path]:
    """Image files under `folder` at any depth (hidden files and folders skipped), by relative path."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and is_image_file(p):
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


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
            raise UserError(f"--images {path}: not an image file (extensions: "
                            f"{', '.join(IMG_EXTENSIONS)})")
        return [(path.absolute(), path.name)]
    if not path.is_dir():
        raise UserError(f"--images {path} does not exist; pass an image file or a folder of images")
    files = list_images_recursive(path)
    if not files:
        raise UserError(f"--images {path}: no images found (searched recursively for "
                        f"{', '.join(IMG_EXTENSIONS)})")
    base = path.absolute()
    return [(base / p.relative_to(path), p.relative_to(path).as_posix()) for p in files]
