"""Scoring set-up shared by main_train.py (calibration at the end of training) and main_infer.py:
the scoring options and their defaults, the held-out normal maps stored in checkpoints, and the
calibrated AnomalyScorer with its decision threshold built from them. See util/calibration.py for
the definitions.

A checkpoint's `calibration` entry (a plain dict, weights_only-loadable):
    version, holdout_files (names in train/good), input_size, num_masks, mask_pattern
                           the options the maps depend on
    maps                   {error: float32 [n, S, S]}, the per-pixel mse and msgms maps of the held-out
                           images, not smoothed (each level smooths them with its own sigma)
    defaults, threshold    the scoring options main_train.py calibrated for, and their Threshold
Every other statistic (per-pixel mean/std, fusion scales, leave-one-out scores) is derived from the
maps, so any map recipe and quantile can be scored from a checkpoint without re-reading images.
"""
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from engine import collect_error_maps
from models_mae import AnomalyScorer, MaskedAutoencoderViT
from util.calibration import MIN_CALIBRATION_IMAGES, MapSpec, Threshold, fit_level, fit_threshold
from util.datasets import TestDataset, holdout_items
from util.smoothing import GaussianSmoothing

CALIBRATION_VERSION = 2  # 1 (never released) stored smoothed maps
MAP_OPTIONS = ("num_masks", "mask_pattern")  # what the stored held-out maps depend on


@dataclass(frozen=True)
class ScoringOptions:
    """How images are scored. The defaults were chosen by measurement (README, "Scoring")."""

    num_masks: int = 4
    mask_pattern: str = "stripes"
    sigma: float = 4.0
    image_sigma: float = 2.0
    score: str = "max"
    topk_fraction: float = 0.01
    pixel_map: str = "mse"
    image_map: str = "fusion-absz"
    image_quantile: float = 0.95
    pixel_quantile: float = 0.999

    @property
    def needs_calibration(self) -> bool:
        return MapSpec.parse(self.pixel_map).needs_calibration or MapSpec.parse(self.image_map).needs_calibration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_matches(calibration: dict[str, Any], options: ScoringOptions, input_size: int) -> bool:
    """Whether the stored held-out maps were made with these view/smoothing options at this size."""
    return calibration.get("version") == CALIBRATION_VERSION and int(calibration["input_size"]) == input_size \
        and all(calibration[k] == getattr(options, k) for k in MAP_OPTIONS)


def holdout_error_maps(model: MaskedAutoencoderViT, data_path: str | Path, names: list[str], options: ScoringOptions,
                       device: torch.device, amp_dtype: Optional[torch.dtype], batch_size: int = 8,
                       num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Per-pixel mse and msgms maps {error: [n, S, S]} of the held-out images data_path/train/good/<names>."""
    dataset = TestDataset(holdout_items(data_path, names), model.img_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scorer = AnomalyScorer(model, options.num_masks, options.mask_pattern).to(device)
    return collect_error_maps(scorer, loader, device, amp_dtype)


def make_calibration(maps: dict[str, torch.Tensor], holdout_files: list[str], input_size: int,
                     options: ScoringOptions) -> dict[str, Any]:
    """The checkpoint's `calibration` entry for held-out maps made with `options`."""
    _, threshold = fit_scoring(maps, options)
    return {"version": CALIBRATION_VERSION, "holdout_files": list(holdout_files), "input_size": int(input_size),
            **{k: getattr(options, k) for k in MAP_OPTIONS},
            "maps": {e: m.float().contiguous() for e, m in maps.items()},
            "defaults": options.to_dict(), "threshold": threshold.to_dict()}


def fit_scoring(maps: dict[str, torch.Tensor], options: ScoringOptions):
    """Statistics of both map recipes and the threshold, from held-out maps {error: [n, S, S]}.

    Returns ((pixel LevelStats, image LevelStats), Threshold).
    """
    n = min(m.shape[0] for m in maps.values())
    if n < MIN_CALIBRATION_IMAGES:
        raise ValueError(f"calibration needs at least {MIN_CALIBRATION_IMAGES} held-out images, got {n}")
    pixel_stats, pixel_loo = fit_level(smoothed(maps, options.sigma), MapSpec.parse(options.pixel_map))
    image_stats, image_loo = fit_level(smoothed(maps, options.image_sigma), MapSpec.parse(options.image_map))
    threshold = fit_threshold(image_loo, pixel_loo, options.score, options.topk_fraction,
                              options.image_quantile, options.pixel_quantile)
    return (pixel_stats, image_stats), threshold


def smoothed(maps: dict[str, torch.Tensor], sigma: float) -> dict[str, torch.Tensor]:
    """{error: [n, S, S]} smoothed by a Gaussian of sigma, as the scorer smooths (float32)."""
    smoothing = GaussianSmoothing(sigma)
    return {e: smoothing(m.float()) for e, m in maps.items()}


def build_scorer(model: MaskedAutoencoderViT, options: ScoringOptions,
                 maps: Optional[dict[str, torch.Tensor]]) -> tuple[AnomalyScorer, Optional[Threshold]]:
    """The scorer for `options`, calibrated on held-out maps when given (then with its Threshold).

    Raises ValueError when the options need calibration and there are no maps, or do not fit the model.
    """
    if maps is None:
        if options.needs_calibration:
            raise ValueError(f"--pixel_map {options.pixel_map} / --image_map {options.image_map} need "
                             f"held-out normal images")
        stats, threshold = (None, None), None
    else:
        stats, threshold = fit_scoring(maps, options)
    scorer = AnomalyScorer(model, num_masks=options.num_masks, mask_pattern=options.mask_pattern,
                           sigma=options.sigma, image_sigma=options.image_sigma, score=options.score,
                           topk_fraction=options.topk_fraction,
                           pixel_map=options.pixel_map, image_map=options.image_map,
                           pixel_stats=stats[0], image_stats=stats[1])
    return scorer, threshold


def options_from(values: dict[str, Any]) -> ScoringOptions:
    """ScoringOptions from a dict that may hold other keys (a parsed command line, say); None = default."""
    defaults = ScoringOptions()
    return ScoringOptions(**{f.name: values[f.name] if values.get(f.name) is not None else getattr(defaults, f.name)
                             for f in fields(ScoringOptions)})
