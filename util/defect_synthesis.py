"""Crude synthetic defects pasted onto held-out NORMAL images, with exact masks.

They let a category choose its scoring recipe without test labels (scoring.choose_recipes): a recipe
that separates held-out normal images from the same images with a defect pasted on them is likely to
separate real defects too. Three kinds, one of each per normal image:

- cutpaste: a rectangle (6-16% of the side) of ANOTHER held-out image pasted at a random place
  (a foreign pattern in the right colours);
- scratch: a straight line 2 px wide, 20-50% of the side long, in a random colour;
- stain: a soft-edged ellipse (8-20% of the side) blended towards a random colour with opacity
  0.35-0.7; the mask is where the blended pixel differs from the original.

The mask of every kind is where the pixel values changed, so a kind that happens to paste colours equal
to the image's own marks nothing there. Deterministic: one random stream per (seed, image, kind).
"""
from typing import NamedTuple

import numpy as np
import torch

DEFECT_KINDS = ("cutpaste", "scratch", "stain")


class SyntheticDefects(NamedTuple):
    images: torch.Tensor  # [m, 3, S, S] uint8
    masks: torch.Tensor  # [m, S, S] bool, where the pixels changed
    source: torch.Tensor  # [m] long, the index of the normal image each was made from
    kinds: list[str]  # [m]


def _rng(seed: int, index: int, kind: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, kind)))


def _cutpaste(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = img.shape[-1]
    h, w = (rng.uniform(0.06, 0.16, size=2) * s).astype(int).clip(2)
    sy, sx = rng.integers(0, s - h), rng.integers(0, s - w)  # where the patch comes from
    dy, dx = rng.integers(0, s - h), rng.integers(0, s - w)  # where it goes
    out = img.copy()
    out[:, dy:dy + h, dx:dx + w] = donor[:, sy:sy + h, sx:sx + w]
    return out


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = img.shape[-1]
    length = rng.uniform(0.2, 0.5) * s
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.2, 0.8, size=2) * s
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    dy, dx = np.sin(angle), np.cos(angle)
    along = (yy - cy) * dy + (xx - cx) * dx
    across = np.abs(-(yy - cy) * dx + (xx - cx) * dy)
    line = (np.abs(along) <= length / 2) & (across <= 1.0)  # 2 px wide
    out = img.copy()
    out[:, line] = rng.integers(0, 256, size=3, dtype=np.uint8)[:, None]
    return out


def _stain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = img.shape[-1]
    ry, rx = rng.uniform(0.04, 0.10, size=2) * s  # half-axes: 8-20% of the side across
    cy, cx = rng.uniform(0.15, 0.85, size=2) * s
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    alpha = rng.uniform(0.35, 0.7) * np.clip(1.5 - r, 0.0, 1.0)  # flat inside, soft edge
    colour = rng.integers(0, 256, size=3).astype(np.float64)[:, None, None]
    out = img.astype(np.float64) * (1 - alpha) + colour * alpha
    return np.rint(out).clip(0, 255).astype(np.uint8)


def synthetic_defects(images: torch.Tensor, seed: int = 0) -> SyntheticDefects:
    """One defect of each kind on each normal image [n, 3, S, S] uint8 (n >= 2: cutpaste needs a donor)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [n, 3, S, S], got {images.dtype} {tuple(images.shape)}")
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"synthetic defects need at least 2 normal images, got {n}")
    normals = images.numpy()
    out, masks, source, kinds = [], [], [], []
    for i in range(n):
        for k, kind in enumerate(DEFECT_KINDS):
            rng = _rng(seed, i, k)
            if kind == "cutpaste":
                donor = normals[(i + 1 + rng.integers(0, n - 1)) % n]  # any image but i
                img = _cutpaste(normals[i], donor, rng)
            elif kind == "scratch":
                img = _scratch(normals[i], rng)
            else:
                img = _stain(normals[i], rng)
            changed = (img != normals[i]).any(axis=0)
            if not changed.any():  # an invisible defect is no evidence; skip it
                continue
            out.append(img)
            masks.append(changed)
            source.append(i)
            kinds.append(kind)
    return SyntheticDefects(torch.from_numpy(np.stack(out)), torch.from_numpy(np.stack(masks)),
                            torch.tensor(source, dtype=torch.long), kinds)
