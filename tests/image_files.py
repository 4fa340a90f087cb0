"""Tiny image files for data tests: random RGB arrays, a saver, and a 20-px MVTec-style category."""
from pathlib import Path

import numpy as np
from PIL import Image


def random_rgb(h: int = 20, w: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_image(arr: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def write_small_category(root: Path, n_train: int = 3, n_anomalous: int = 1) -> Path:
    """Raw MVTec layout, 20 px: n_train train images, 1 good and n_anomalous `crack` test images;
    only crack/000 has a mask (a 4x4 square)."""
    for i in range(n_train):
        save_image(random_rgb(seed=i), root / f"train/good/{i:03d}.png")
    save_image(random_rgb(seed=10), root / "test/good/000.png")
    for i in range(n_anomalous):
        save_image(random_rgb(seed=11 + i), root / f"test/crack/{i:03d}.png")
    mask = np.zeros((20, 20), np.uint8)
    mask[5:9, 5:9] = 255
    save_image(mask, root / "ground_truth/crack/000_mask.png")
    return root
