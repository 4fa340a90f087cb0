"""Simulated anomalies for training the discriminative head (models_head): batches of normal images, a
share of them with one fresh defect of util.defects drawn on each, and the per-pixel training targets.

Per anomalous sample: a kind drawn uniformly from `kinds` (util.defects.DEFECT_MAKERS: scratch, hole,
stain, particle, crack, cutpaste, missing and the DRAEM-style texture_paste), placed anywhere, drawn
again (up to util.defects.MAX_TRIES) until it is visible at full strength (util.defects.visible), then
blended at a strength (opacity) drawn uniformly from [min_strength, max_strength]: DRAEM's ablation
found random opacity the part of its simulation that matters most for localisation. cutpaste takes its
patch from a random image of the batch (possibly the sample itself, as in CutPaste); texture_paste a
random image of `textures` (procedural images: nothing from the category or from outside the project).
Images whose three channels are equal throughout the batch are treated as grey, as
util.defects.synthetic_defects does (a grey category's stains stay grey).

Exactly round(normal_share * n) samples of a batch stay normal (DRAEM: half), at random positions.

Targets are soft (NSA, Schlueter et al. 2022): a defect at a low opacity may change the pixels by a grey
level or two, which no detector should be asked to see with certainty. With v the mean over the defect's
mask of the largest channel change (in [0, 1] units), every pixel of the mask gets

    target = 1 - exp(-v / SOFT_LABEL_SCALE)

(0.28 at v = 0.01, about 2.5 grey levels; 0.63 at 0.03; 0.96 at 0.1); pixels outside the mask 0.

Deterministic: the same images, textures, config and numpy Generator state give the same batch.
"""
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from util.defects import DEFECT_MAKERS, MAX_TRIES, as_scene, blend, changed, visible

SOFT_LABEL_SCALE = 0.03
NORMAL_KIND = "normal"


@dataclass(frozen=True)
class SimulationConfig:
    """Which defects a batch gets and how strong; stored with the head (to_dict)."""

    kinds: tuple[str, ...] = tuple(DEFECT_MAKERS)
    normal_share: float = 0.5
    min_strength: float = 0.1
    max_strength: float = 1.0

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in DEFECT_MAKERS]
        if not self.kinds or unknown:
            raise ValueError(f"unknown defect kinds {unknown or '(none given)'}; "
                             f"choose from {', '.join(DEFECT_MAKERS)}")
        if not 0.0 <= self.normal_share <= 1.0:
            raise ValueError(f"normal_share must be in [0, 1], got {self.normal_share}")
        if not 0.0 < self.min_strength <= self.max_strength <= 1.0:
            raise ValueError(f"strengths must satisfy 0 < min <= max <= 1, "
                             f"got {self.min_strength}, {self.max_strength}")

    def to_dict(self) -> dict:
        return {**asdict(self), "kinds": list(self.kinds)}


class SimulatedBatch(NamedTuple):
    images: torch.Tensor  # [n, 3, H, W] uint8
    masks: torch.Tensor  # [n, H, W] bool, exactly where the pixels changed (empty for normal samples)
    targets: torch.Tensor  # [n, H, W] float32, the soft labels (module docstring)
    kinds: list[str]  # [n], NORMAL_KIND for the normal samples
    strengths: torch.Tensor  # [n] float32, 0 for the normal samples


def soft_targets(original: np.ndarray, new: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 [H, W]: the soft label of one defect (module docstring) from uint8 [H, W, C] images."""
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    change = np.abs(new.astype(np.float32) - original.astype(np.float32)).max(axis=2) / 255.0  # [H, W]
    v = float(change[mask].mean())
    return mask.astype(np.float32) * np.float32(1.0 - np.exp(-v / SOFT_LABEL_SCALE))


def simulate(images: torch.Tensor, textures: Sequence[np.ndarray], config: SimulationConfig,
             rng: np.random.Generator) -> SimulatedBatch:
    """Simulated anomalies on normal images [n, 3, H, W] uint8 (module docstring).

    textures: images [h, w, 3] (or [h, w]) uint8 for texture_paste (needed when it is in config.kinds).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [n, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if "texture_paste" in config.kinds and not textures:
        raise ValueError("texture_paste needs textures (e.g. images of scripts/make_procedural.py)")
    n = images.shape[0]
    grey = bool((images == images[:, :1]).all())
    normals = (images[:, :1] if grey else images).permute(0, 2, 3, 1).contiguous().numpy()  # [n, H, W, C']
    is_normal = np.zeros(n, bool)
    is_normal[rng.permutation(n)[:round(config.normal_share * n)]] = True
    out, masks, targets, kinds, strengths = [], [], [], [], []
    for i in range(n):
        original = normals[i]
        if is_normal[i]:
            out.append(original)
            masks.append(np.zeros(original.shape[:2], bool))
            targets.append(np.zeros(original.shape[:2], np.float32))
            kinds.append(NORMAL_KIND)
            strengths.append(0.0)
            continue
        kind = config.kinds[int(rng.integers(len(config.kinds)))]
        extra: dict = {}
        if kind == "cutpaste":
            extra["donor"] = normals[int(rng.integers(n))]
        elif kind == "texture_paste":
            extra["texture"] = textures[int(rng.integers(len(textures)))]
        scene = as_scene(original)
        for _ in range(MAX_TRIES):
            defect = DEFECT_MAKERS[kind](scene, rng, None, 1.0, **extra)  # float, full strength
            if visible(changed(original, blend(original, defect, 1.0))):
                break
        strength = float(rng.uniform(config.min_strength, config.max_strength))
        img = blend(original, defect, strength)
        mask = changed(original, img)
        out.append(img)
        masks.append(mask)
        targets.append(soft_targets(original, img, mask))
        kinds.append(kind)
        strengths.append(strength)
    stacked = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # [n, C', H, W]
    if grey:
        stacked = stacked.expand(-1, 3, -1, -1)
    return SimulatedBatch(stacked.contiguous(), torch.from_numpy(np.stack(masks)), torch.from_numpy(np.stack(targets)),
                          kinds, torch.tensor(strengths, dtype=torch.float32))
