"""Generic procedural images for pretraining a prior: DST/train/good/<index>.png.

Six families, in turn (image i is family i mod 6), none of them modelled on a product or a defect:
  dead_leaves   overlapping discs, ellipses and rotated rectangles with power-law sizes (occlusion,
                sharp edges at all scales; Baradad et al. 2021)
  gratings      sums of 1-3 oriented sine or square gratings through a random colour map
  fractal_noise 1/f^beta noise (beta 1-3) through a random colour map, or per channel
  line_drawing  lines, polylines, arcs and circles of several widths on a plain background
  lattice       a small random motif tiled on a rotated, sheared grid (periodic structure)
  texture       Voronoi cells with dark borders, or thresholded smooth noise (spots, stripes, mazes)
Then, for every image: a random blur (half of the images), random gain and contrast, and sensor
noise. Each image has its own random stream np.random.default_rng([seed, index]), so the output is
fully determined by the seed (same seed, same PNG bytes on the same software) and does not depend on
--num_images. This script shares nothing with scripts/make_synthetic_mvtec.py: a prior pretrained on
its images has seen no capsule, textile or circuit board.

  python scripts/make_procedural.py --dst /tmp/procedural --num_images 4000 --size 112 --seed 0

The output is a category folder that `main_train.py --data_path DST` reads (train/good only).
"""
import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import OneLineArgumentParser, UserError, run_cli  # noqa: E402

Array = np.ndarray
SUPERSAMPLE = 2  # vector families are drawn at 2x and box-downscaled: anti-aliased edges


def _colours(rng: np.random.Generator, n: int) -> Array:
    """[n, 3] RGB colours in 0-255: around a random hue family, or fully random (a third of images)."""
    if rng.random() < 1 / 3:
        return rng.uniform(0, 255, (n, 3))
    base = rng.uniform(0, 255, 3)
    spread = rng.uniform(20, 120)
    return np.clip(base + rng.normal(0, spread, (n, 3)) * rng.uniform(0.3, 1.0, 3), 0, 255)


def _colour_map(field: Array, rng: np.random.Generator) -> Array:
    """[H, W] values -> [H, W, 3] float RGB through a random piecewise-linear map of 2-5 colours."""
    lo, hi = np.percentile(field, [1, 99])
    t = np.clip((field - lo) / max(hi - lo, 1e-6), 0, 1)
    stops = _colours(rng, int(rng.integers(2, 6)))
    xs = np.linspace(0, 1, len(stops))
    return np.stack([np.interp(t, xs, stops[:, c]) for c in range(3)], axis=-1)


def _canvas(size: int, rng: np.random.Generator) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), tuple(int(v) for v in _colours(rng, 1)[0]))
    return img, ImageDraw.Draw(img)


def _downscale(img: Image.Image, size: int) -> Array:
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float64)


def _fill(rng: np.random.Generator, palette: Array) -> tuple[int, int, int]:
    c = palette[rng.integers(len(palette))] + rng.normal(0, 12, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _rotated_rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in ((-w, -h), (w, -h), (w, h), (-w, h))]


def dead_leaves(size: int, rng: np.random.Generator) -> Array:
    img, draw = _canvas(size, rng)
    big = size * SUPERSAMPLE
    palette = _colours(rng, int(rng.integers(3, 12)))
    r_min, r_max = big * rng.uniform(0.01, 0.03), big * rng.uniform(0.15, 0.5)
    for _ in range(int(rng.integers(60, 250))):
        # radius density ~ r^-3 between r_min and r_max (scale-invariant dead leaves), by inverse CDF
        u = rng.random()
        r = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5
        cx, cy = rng.uniform(-0.1, 1.1, 2) * big
        fill = _fill(rng, palette)
        if rng.random() < 0.6:
            a = r * rng.uniform(0.5, 1.0)
            draw.ellipse([cx - r, cy - a, cx + r, cy + a], fill=fill)
        else:
            draw.polygon(_rotated_rect(cx, cy, r, r * rng.uniform(0.2, 1.0), rng.uniform(0, np.pi)), fill=fill)
    return _downscale(img, size)


def gratings(size: int, rng: np.random.Generator) -> Array:
    y, x = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for _ in range(int(rng.integers(1, 4))):
        theta = rng.uniform(0, np.pi)
        freq = np.exp(rng.uniform(np.log(1.5), np.log(size / 5)))  # cycles per image
        wave = np.sin(2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.3:
            wave = np.tanh(wave * rng.uniform(3, 20))  # square-ish grating
        field += wave * rng.uniform(0.3, 1.0)
    return _colour_map(field, rng)


def _fractal_field(size: int, rng: np.random.Generator, beta: float) -> Array:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amplitude = np.hypot(fx, fy)
    amplitude[0, 0] = 1.0
    spectrum = (rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape)) * amplitude ** (-beta / 2)
    spectrum[0, 0] = 0.0
    return np.fft.irfft2(spectrum, s=(size, size))


def fractal_noise(size: int, rng: np.random.Generator) -> Array:
    beta = rng.uniform(1.0, 3.0)
    if rng.random() < 0.6:
        return _colour_map(_fractal_field(size, rng, beta), rng)
    channels = np.stack([_fractal_field(size, rng, beta) for _ in range(3)], axis=-1)
    channels = (channels - channels.mean((0, 1))) / (channels.std((0, 1)) + 1e-9)
    return np.clip(128 + channels * rng.uniform(20, 60, 3), 0, 255)


def line_drawing(size: int, rng: np.random.Generator) -> Array:
    img, draw = _canvas(size, rng)
    big = size * SUPERSAMPLE
    palette = _colours(rng, int(rng.integers(1, 6)))
    for _ in range(int(rng.integers(5, 40))):
        fill = _fill(rng, palette)
        width = int(rng.integers(1, 5)) * SUPERSAMPLE
        kind = rng.integers(4)
        if kind == 0:
            draw.line([tuple(p) for p in rng.uniform(-0.1, 1.1, (2, 2)) * big], fill=fill, width=width)
        elif kind == 1:
            points = np.cumsum(rng.normal(0, big * 0.12, (int(rng.integers(3, 9)), 2)), axis=0) + rng.uniform(0, big, 2)
            draw.line([tuple(p) for p in points], fill=fill, width=width, joint="curve")
        else:
            cx, cy = rng.uniform(0, big, 2)
            r = big * rng.uniform(0.03, 0.4)
            box = [cx - r, cy - r, cx + r, cy + r]
            if kind == 2:
                draw.ellipse(box, outline=fill, width=width)
            else:
                start = rng.uniform(0, 360)
                draw.arc(box, start, start + rng.uniform(30, 300), fill=fill, width=width)
    return _downscale(img, size)


def lattice(size: int, rng: np.random.Generator) -> Array:
    period = int(rng.integers(6, max(8, size // 3)))
    motif, draw = _canvas(period, rng)
    big = period * SUPERSAMPLE
    palette = _colours(rng, int(rng.integers(2, 5)))
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0, big, 2)
        r = big * rng.uniform(0.1, 0.45)
        fill = _fill(rng, palette)
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_rotated_rect(cx, cy, r, r * rng.uniform(0.1, 1.0), rng.uniform(0, np.pi)), fill=fill)
    tile = _downscale(motif, period)  # [p, p, 3]
    # Pixel (x, y) -> motif coordinates on a rotated, sheared grid; nearest lookup with wrap-around.
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle, shear = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5) if rng.random() < 0.5 else 0.0
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle) + shear * u
    return tile[np.floor(v).astype(int) % period, np.floor(u).astype(int) % period]


def texture(size: int, rng: np.random.Generator) -> Array:
    if rng.random() < 0.5:  # Voronoi cells, each its own colour, with dark borders
        seeds = rng.uniform(0, size, (int(rng.integers(8, 200)), 2))
        y, x = np.mgrid[0:size, 0:size]
        dist, idx = cKDTree(seeds).query(np.stack([y.ravel(), x.ravel()], axis=1), k=2)
        palette = _colours(rng, len(seeds))
        img = palette[idx[:, 0]].reshape(size, size, 3)
        border = (dist[:, 1] - dist[:, 0]).reshape(size, size) < rng.uniform(0.5, 2.5)
        return np.where(border[..., None], img * rng.uniform(0.0, 0.6), img)
    # Thresholded smooth noise: spots, blobs, stripes (anisotropic smoothing) or mazes (band threshold)
    sigma = rng.uniform(1, size / 12, 2) * (rng.uniform(1, 4, 2) if rng.random() < 0.4 else 1)
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma, mode="wrap")
    field = (field - field.mean()) / (field.std() + 1e-9)
    level = rng.uniform(-0.8, 0.8)
    mask = np.abs(field - level) < rng.uniform(0.15, 0.5) if rng.random() < 0.3 else field > level
    a, b = _colours(rng, 2)
    return np.where(mask[..., None], a, b)


FAMILIES: dict[str, Callable[[int, np.random.Generator], Array]] = {
    f.__name__: f for f in (dead_leaves, gratings, fractal_noise, line_drawing, lattice, texture)
}


def _finish(img: Array, rng: np.random.Generator) -> Array:
    """Blur (half of the images), gain/contrast, sensor noise -> uint8 [H, W, 3]."""
    if rng.random() < 0.5:
        s = rng.uniform(0.3, 2.0)
        img = ndimage.gaussian_filter(img, (s, s, 0))
    img = (img - 128) * rng.uniform(0.6, 1.2) + 128 + rng.uniform(-30, 30)
    img = img + rng.normal(0, rng.uniform(0, 6), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(index: int, size: int, seed: int) -> Array:
    """Image `index` of the set made with `seed`: uint8 [size, size, 3]; family = index mod 6."""
    rng = np.random.default_rng([seed, index])
    family = list(FAMILIES.values())[index % len(FAMILIES)]
    return _finish(family(size, rng), rng)


def make_procedural(dst: Path, num_images: int, size: int, seed: int, overwrite: bool = False,
                    progress: bool = False) -> Path:
    """Write `num_images` PNGs to dst/train/good (replaced as a whole, atomically); returns that folder."""
    good = dst / "train" / "good"
    if good.exists() and any(good.iterdir()) and not overwrite:
        raise UserError(f"{good} is not empty; pass --overwrite to replace it")
    tmp = dst / "train" / ".good.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width = max(5, len(str(num_images - 1)))
    for i in tqdm(range(num_images), desc="procedural images", disable=not progress, mininterval=2):
        Image.fromarray(render(i, size, seed)).save(tmp / f"{i:0{width}d}.png", format="PNG", compress_level=1)
    shutil.rmtree(good, ignore_errors=True)
    tmp.rename(good)
    return good


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    p.add_argument("--dst", type=Path, required=True, help="output category folder; images go to DST/train/good")
    p.add_argument("--num_images", type=int, default=4000, help="number of images (default: %(default)s)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST/train/good")
    p.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    return p


def main(args: argparse.Namespace) -> None:
    if args.num_images < 1 or args.size < 8:
        raise UserError("--num_images must be >= 1 and --size >= 8")
    t0 = time.time()
    good = make_procedural(args.dst, args.num_images, args.size, args.seed, args.overwrite, progress=True)
    print(f"wrote {args.num_images} images ({args.size}px, seed {args.seed}, families "
          f"{', '.join(FAMILIES)}) to {good} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    sys.exit(run_cli(main, _args, _args.debug))
