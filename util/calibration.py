"""Scoring against normal images: map recipes, their calibration on held-out normal images, and the
decision threshold. Nothing here sees a test label.

A *map recipe* names the error and how it is compared with normal images:

    <error>[-<norm>]    error: mse | msgms | fusion (both errors)    norm: raw (default) | z | absz

- raw:  the smoothed error map e(p) itself.
- z:    (e(p) - mu(p)) / s(p), mu and s the per-pixel mean and std of the held-out normal maps,
        s floored at STD_FLOOR x the mean of s over the image (pixels where every normal image has the
        same error would otherwise turn any noise into a huge z).
- absz: |z|: a deviation in either direction counts (a missing print makes the error LOWER than normal).
- fusion: max over mse and msgms of map_e / q_e, q_e the FUSION_QUANTILE quantile of the held-out
        normal values of map_e (so one unit is "as high as normal images go" for both errors).

Held-out statistics are used leave-one-out when applied to the held-out images themselves (each
image standardised with the mean/std of the others), so the quantiles and thresholds they give are
those of unseen normal images, not optimistic in-sample ones.

Image score: max of the image-level map ('max') or the mean of its top fraction ('topk').
Threshold: the image threshold is the `image_quantile` quantile of the held-out images' scores
(leave-one-out); the pixel threshold the `pixel_quantile` quantile of their pixel-level map values.
score_normalized = clip(0.5 + 0.5 (score - t) / (t - lo), 0, 1), t the image threshold and lo the
lowest held-out score: t -> 0.5, the most normal held-out image -> 0.
"""
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from util.error_maps import ERRORS

NORMS = ("raw", "z", "absz")
FUSION = "fusion"
MAP_CHOICES = tuple(f"{e}" if n == "raw" else f"{e}-{n}" for e in ERRORS + (FUSION,) for n in NORMS)
SCORE_METHODS = ("max", "topk")
STD_FLOOR = 0.5  # floor of the per-pixel std, as a fraction of its image mean
FUSION_QUANTILE = 0.99
MIN_CALIBRATION_IMAGES = 3  # leave-one-out needs at least 2 others for a std


@dataclass(frozen=True)
class MapSpec:
    """A parsed map recipe: the errors it reads and how they are normalised."""

    errors: tuple[str, ...]
    norm: str

    @classmethod
    def parse(cls, text: str) -> "MapSpec":
        if text not in MAP_CHOICES:
            raise ValueError(f"unknown map recipe {text!r}; choose one of {', '.join(MAP_CHOICES)}")
        error, _, norm = text.partition("-")
        return cls(ERRORS if error == FUSION else (error,), norm or "raw")

    def __str__(self) -> str:
        error = FUSION if len(self.errors) > 1 else self.errors[0]
        return error if self.norm == "raw" else f"{error}-{self.norm}"

    @property
    def needs_calibration(self) -> bool:
        return self.norm != "raw" or len(self.errors) > 1


@dataclass
class LevelStats:
    """What a map recipe needs from the held-out images: per error, mean and floored std maps
    [H, W] (for z/absz) and the fusion scale (for fusion)."""

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    scale: dict[str, float]


def image_scores(maps: torch.Tensor, method: str = "max", topk_fraction: float = 0.01) -> torch.Tensor:
    """[N, H, W] -> [N]: the map's maximum, or the mean of its top topk_fraction of pixels."""
    flat = maps.flatten(1)
    if method == "max":
        return flat.amax(dim=1)
    k = max(1, round(topk_fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def level_map(error_maps: dict[str, torch.Tensor], spec: MapSpec, stats: Optional[LevelStats]) -> torch.Tensor:
    """The recipe's map [N, H, W] from smoothed error maps {error: [N, H, W]} (module docstring).

    mean/std maps may also be [N, H, W] (leave-one-out statistics, one per image).
    """
    out = None
    for error in spec.errors:
        m = error_maps[error]
        if spec.norm != "raw":
            m = (m - stats.mean[error]) / stats.std[error]
            if spec.norm == "absz":
                m = m.abs()
        if len(spec.errors) > 1:
            m = m / stats.scale[error]
        out = m if out is None else torch.maximum(out, m)
    return out


def _floored(std: torch.Tensor) -> torch.Tensor:
    """Floor each std map (last two dims) at STD_FLOOR x its own mean."""
    floor = STD_FLOOR * std.mean(dim=(-2, -1), keepdim=True)
    return torch.maximum(std, floor)


def mean_std(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and floored std (population, ddof 0) of [n, H, W] normal maps, in float64."""
    maps = maps.double()
    return maps.mean(dim=0), _floored(maps.std(dim=0, correction=0))


def leave_one_out_mean_std(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, H, W] -> per-image mean and floored std [n, H, W] of the OTHER n - 1 maps (float64)."""
    maps = maps.double()
    n = maps.shape[0]
    total, total_sq = maps.sum(dim=0), (maps**2).sum(dim=0)
    mean = (total - maps) / (n - 1)
    var = ((total_sq - maps**2) / (n - 1) - mean**2).clamp_min(0.0)
    return mean, _floored(var.sqrt())


def fit_level(holdout_maps: dict[str, torch.Tensor], spec: MapSpec) -> tuple[LevelStats, torch.Tensor]:
    """Statistics of one recipe from held-out error maps {error: [n, H, W]}, and the recipe's map of
    each held-out image [n, H, W] computed leave-one-out (float64)."""
    stats = LevelStats({}, {}, {})
    loo = LevelStats({}, {}, {})
    for error in spec.errors:
        stats.mean[error], stats.std[error] = mean_std(holdout_maps[error])
        loo.mean[error], loo.std[error] = leave_one_out_mean_std(holdout_maps[error])
    maps64 = {e: holdout_maps[e].double() for e in spec.errors}
    if len(spec.errors) > 1:
        for error in spec.errors:
            single = level_map(maps64, MapSpec((error,), spec.norm), loo)
            scale = float(torch.quantile(single.flatten().float(), FUSION_QUANTILE))
            stats.scale[error] = loo.scale[error] = scale if scale > 0 else 1.0
    return stats, level_map(maps64, spec, loo)


@dataclass
class Threshold:
    """The decision threshold learnt from held-out normal images (module docstring)."""

    image: float
    pixel: float
    image_low: float
    image_quantile: float
    pixel_quantile: float
    n_images: int
    source: str = "holdout"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Threshold":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def fit_threshold(image_level: torch.Tensor, pixel_level: torch.Tensor, score: str, topk_fraction: float,
                  image_quantile: float, pixel_quantile: float) -> Threshold:
    """Thresholds from the held-out images' (leave-one-out) image-level and pixel-level maps [n, H, W]."""
    scores = image_scores(image_level.double(), score, topk_fraction)
    pixels = pixel_level.double().flatten()
    if pixels.numel() > 2**24:  # torch.quantile's input limit; a regular subsample keeps it exact enough
        pixels = pixels[:: -(-pixels.numel() // 2**24)]
    return Threshold(
        image=float(torch.quantile(scores, image_quantile)),
        pixel=float(torch.quantile(pixels, pixel_quantile)),
        image_low=float(scores.min()),
        image_quantile=float(image_quantile),
        pixel_quantile=float(pixel_quantile),
        n_images=int(scores.numel()),
    )


def normalized_scores(scores: np.ndarray, threshold: Threshold) -> np.ndarray:
    """clip(0.5 + 0.5 (score - t) / (t - lo), 0, 1): the threshold maps to 0.5 (module docstring)."""
    span = max(threshold.image - threshold.image_low, 1e-12)
    return np.clip(0.5 + 0.5 * (np.asarray(scores, dtype=np.float64) - threshold.image) / span, 0.0, 1.0)


def predicted_labels(scores: np.ndarray, threshold: Threshold) -> np.ndarray:
    """1 exactly where score >= the image threshold."""
    return (np.asarray(scores) >= threshold.image).astype(np.int64)


# ---- the threshold against new normal images ------------------------------------------------------
# A false-alarm warning needs a rate above FALSE_ALARM_FACTOR x the promised one AND a count of flagged
# normal images that a threshold keeping its promise reaches by chance with probability at most
# FALSE_ALARM_ALPHA (check_false_alarms).
FALSE_ALARM_FACTOR = 3.0
FALSE_ALARM_ALPHA = 0.01


@dataclass
class ThresholdCheck:
    """The image threshold's false alarms on labelled normal (good) test images (check_false_alarms)."""

    false_alarm_rate: float  # share of the normal images with score >= the threshold
    promised_rate: float  # 1 - image_quantile
    n_normal: int
    n_flagged: int
    warn_above: float  # the rate above which `warning` is set
    warning: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"false alarms at the image threshold: {self.n_flagged} of {self.n_normal} good test images "
                f"({_percent(self.false_alarm_rate)}; the quantile promises {_percent(self.promised_rate)}, "
                f"a warning above {_percent(self.warn_above)})")


def _percent(rate: float) -> str:
    return f"{100 * rate:.3g}%"


def binomial_tail(n: int, p: float) -> np.ndarray:
    """[n + 2] float64: P(X >= k) for k = 0 .. n + 1, X ~ Binomial(n, p) (log-space pmf: no overflow)."""
    k = np.arange(n + 1)
    if p <= 0.0 or p >= 1.0:
        pmf = (k == (0 if p <= 0.0 else n)).astype(np.float64)
    else:
        log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - k[:-1]) - np.log(k[:-1] + 1))])
        pmf = np.exp(log_comb + k * np.log(p) + (n - k) * np.log1p(-p))
    return np.concatenate([np.cumsum(pmf[::-1])[::-1], [0.0]])


def false_alarm_limit(n_normal: int, promised_rate: float) -> float:
    """max(FALSE_ALARM_FACTOR x p, p + a): the highest false-alarm rate on n normal images that is no
    warning, p the promised rate. p + a = (k - 1) / n, k the smallest count of flagged images with
    P(Binomial(n, p) >= k) <= FALSE_ALARM_ALPHA: on few images a rate well above p happens by chance
    (p = 0.05: 3 or more of 10 flagged in 1 run of 87, no warning; 4 of 10 warns), from about 40
    images on the factor decides."""
    tail = binomial_tail(n_normal, promised_rate)
    k = int(np.argmax(tail <= FALSE_ALARM_ALPHA))  # tail[n + 1] = 0: always found
    return max(FALSE_ALARM_FACTOR * promised_rate, (k - 1) / n_normal)


def check_false_alarms(normal_scores: np.ndarray, threshold: float, image_quantile: float
                       ) -> Optional[ThresholdCheck]:
    """Compare the false-alarm rate of an image threshold on normal test images with the rate its
    quantile promises, p = 1 - image_quantile; None without normal images.

    Rule: `warning` is set exactly when false_alarm_rate > warn_above = false_alarm_limit(n, p), i.e.
    the rate is more than FALSE_ALARM_FACTOR (3) times the promise AND that many flagged images would
    happen with probability at most FALSE_ALARM_ALPHA (0.01) if each normal image were flagged with
    probability p (binomial tail over the n normal images). The usual cause: held-out images that score
    lower than new normal images, e.g. crops overlapping the training images.
    """
    scores = np.asarray(normal_scores, dtype=np.float64)
    n = int(scores.size)
    if n == 0:
        return None
    flagged = int((scores >= threshold).sum())
    rate, promised = flagged / n, round(max(0.0, 1.0 - float(image_quantile)), 12)
    limit = false_alarm_limit(n, promised)
    warning = None
    if rate > limit:
        warning = (f"the image threshold {threshold:.4g} flags {flagged} of {n} good test images "
                   f"({_percent(rate)}) where its quantile {image_quantile:g} promises {_percent(promised)}: the "
                   f"held-out normal images score lower than these new ones (e.g. they overlap the training "
                   f"images); calibrate on separate normal images with main_train.py --holdout_root ROOT")
    return ThresholdCheck(rate, promised, n, flagged, limit, warning)
