"""Scoring set-up shared by main_train.py (calibration at the end of training) and main_infer.py:
the scoring options and their defaults, the held-out normal maps stored in checkpoints, and the
calibrated AnomalyScorer with its decision threshold built from them. See util/calibration.py for
the definitions.

A checkpoint's `calibration` entry (a plain dict, weights_only-loadable):
    version, holdout_files (names in train/good), input_size, num_masks, mask_pattern
                           the options the maps depend on
    maps                   {error: float32 [n, S, S]}, the per-pixel mse and msgms maps of the held-out
                           images, not smoothed (each level smooths them with its own sigma)
    choice                 (version >= 3) the category's recipes chosen from held-out normal images and
                           synthetic defects on them (util.recipe_choice), with the evidence (version
                           4: per defect strength) and a `warning` when the evidence decided nothing
    defaults, threshold    the scoring options main_train.py calibrated for (the choice applied), and
                           their Threshold; main_infer.py scores with `defaults` unless flags override
Every other statistic (per-pixel mean/std, fusion scales, leave-one-out scores) is derived from the
maps, so any map recipe and quantile can be scored from a checkpoint without re-reading images.
"""
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from engine import collect_error_maps, run_inference
from models_head import HeadScorer
from models_mae import AnomalyScorer, MaskedAutoencoderViT
from util.calibration import MIN_CALIBRATION_IMAGES, MapSpec, Threshold, fit_level, fit_threshold
from util.datasets import TestDataset, holdout_items, normalise
from util.defects import synthetic_defects
from util.recipe_choice import (EVIDENCE_STRENGTHS, DefectMaps, RecipeChoice, chance_level, check_strengths,
                                choice_from_dict, choose_recipes, image_value, pixel_value)
from util.smoothing import GaussianSmoothing

# 1 (never released) stored smoothed maps; 2 the maps and the global defaults; 3 adds the choice;
# 4 the choice made from defects at graded strengths (its evidence per strength)
CALIBRATION_VERSION = 4
MAP_OPTIONS = ("num_masks", "mask_pattern")  # what the stored held-out maps depend on
SCORING_VERSION = 3  # main_train.py records it in a checkpoint's args; older checkpoints score as before


@dataclass(frozen=True)
class ScoringOptions:
    """How images are scored. The defaults were chosen on the quality table (docs/QUALITY.md); a
    checkpoint's per-category choice (util.recipe_choice) replaces the recipe fields."""

    num_masks: int = 4
    mask_pattern: str = "grid"
    sigma: float = 4.0
    image_sigma: float = 4.0
    score: str = "max"
    topk_fraction: float = 0.01
    pixel_map: str = "mse"
    image_map: str = "mse"
    image_quantile: float = 0.95
    pixel_quantile: float = 0.999

    @property
    def needs_calibration(self) -> bool:
        return MapSpec.parse(self.pixel_map).needs_calibration or MapSpec.parse(self.image_map).needs_calibration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What checkpoints made before the per-category choice were scored with; they still are.
LEGACY_OPTIONS = ScoringOptions(mask_pattern="stripes", image_sigma=2.0, image_map="fusion-absz")


def calibration_matches(calibration: dict[str, Any], options: ScoringOptions, input_size: int) -> bool:
    """Whether the stored held-out maps were made with these view/smoothing options at this size."""
    return calibration.get("version") in (2, 3, CALIBRATION_VERSION) and int(calibration["input_size"]) == input_size \
        and all(calibration[k] == getattr(options, k) for k in MAP_OPTIONS)


def holdout_error_maps(model: MaskedAutoencoderViT, data_path: str | Path, names: list[str], options: ScoringOptions,
                       device: torch.device, amp_dtype: Optional[torch.dtype], batch_size: int = 8,
                       num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Per-pixel mse and msgms maps {error: [n, S, S]} of the held-out images data_path/train/good/<names>."""
    dataset = TestDataset(holdout_items(data_path, names), model.img_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scorer = AnomalyScorer(model, options.num_masks, options.mask_pattern).to(device)
    return collect_error_maps(scorer, loader, device, amp_dtype)


class HoldoutEvidence(NamedTuple):
    """What the recipe choice is made from: unsmoothed error maps {error: [n, S, S]} of the held-out
    normal images, and those of synthetic defects on them at each strength (util.recipe_choice.DefectMaps)."""

    normal: dict[str, torch.Tensor]
    defective: tuple[DefectMaps, ...]

    def choose(self, pixel_sigma: float) -> RecipeChoice:
        return choose_recipes(self.normal, self.defective, pixel_sigma)


def holdout_evidence(model: MaskedAutoencoderViT, data_path: str | Path, names: list[str], options: ScoringOptions,
                     device: torch.device, amp_dtype: Optional[torch.dtype], batch_size: int = 8, seed: int = 0,
                     strengths: tuple[float, ...] = EVIDENCE_STRENGTHS) -> HoldoutEvidence:
    """The held-out images' maps and those of the same synthetic defects (util.defects) blended into
    them at each strength, with `options`' views; no test image is read. ValueError for strengths
    outside (0, 1]."""
    dataset = TestDataset(holdout_items(data_path, names), model.img_size)
    scorer = AnomalyScorer(model, options.num_masks, options.mask_pattern).to(device)
    normal = collect_error_maps(scorer, DataLoader(dataset, batch_size=batch_size), device, amp_dtype)
    defective = []
    for d in evidence_defects(dataset.images, seed, strengths):
        loader = DataLoader([{"image": img} for img in d.images], batch_size=batch_size)
        maps = collect_error_maps(scorer, loader, device, amp_dtype)
        defective.append(DefectMaps(d.strength, maps, d.source, d.masks))
    return HoldoutEvidence(normal, tuple(defective))


class EvidenceDefects(NamedTuple):
    """The synthetic defects of one strength: images [m, 3, S, S] normalised as TestDataset's, the
    normal image each was made from [m] and their masks [m, S, S] bool."""

    strength: float
    images: torch.Tensor
    source: torch.Tensor
    masks: torch.Tensor


def evidence_defects(images: torch.Tensor, seed: int, strengths: tuple[float, ...] = EVIDENCE_STRENGTHS
                     ) -> list[EvidenceDefects]:
    """The synthetic defects (util.defects, its evidence kinds) blended into held-out images [n, 3, S, S]
    uint8 at each strength, strongest first; a defect too faint to change a pixel is left out. The
    recipe choice and the head's choice are made from these same images. ValueError for strengths
    outside (0, 1]."""
    found = []
    for strength in check_strengths(strengths):
        defects = synthetic_defects(images, seed, strength=strength)
        shown = defects.masks.flatten(1).any(dim=1)
        found.append(EvidenceDefects(strength, normalise(defects.images[shown]), defects.source[shown],
                                     defects.masks[shown]))
    return found


def collect_outputs(scorer: nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: Optional[torch.dtype],
                    batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [n], pixel-level maps [n, S, S], image-level maps [n, S, S]) of normalised images
    [n, 3, S, S], float32 on the CPU; `scorer` on `device` in the mode the caller wants."""
    loader = DataLoader([{"image": img} for img in images], batch_size=batch_size)
    parts = list(run_inference(scorer, loader, device, amp_dtype, with_reconstructions=False, with_image_maps=True))
    return (torch.cat([p.scores for p in parts]), torch.cat([p.anomaly_maps for p in parts]),
            torch.cat([p.image_maps for p in parts]))


def head_evidence(scorer: HeadScorer, images: torch.Tensor, seed: int, strengths: tuple[float, ...],
                  device: torch.device, amp_dtype: Optional[torch.dtype], batch_size: int = 8
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The head's graded evidence on held-out normal images [n, 3, S, S] uint8 and the evidence
    defects on them (evidence_defects: the recipe choice's images when seed and strengths are its),
    for util.recipe_choice.choose_head, and the head's maps of the normal images {"pixel", "image":
    [n, S, S]} (its threshold's source). `scorer` uses the head at both levels.

    Where the head's full-strength image AUROC is within chance (util.recipe_choice.chance_level), the
    head takes neither level whatever the fainter strengths say, so they are not measured (each costs
    as many MAE passes as the full strength): `strengths` then lists the full strength only and
    `stopped` says why."""
    normal_scores, normal_pixel, normal_image = collect_outputs(scorer, normalise(images), device, amp_dtype,
                                                                batch_size)
    n, by_strength, n_defective, stopped = images.shape[0], {}, 0, None
    for d in evidence_defects(images, seed, strengths):  # strongest first
        scores, pixel_maps, _ = collect_outputs(scorer, d.images, device, amp_dtype, batch_size)
        labels = np.r_[np.zeros(n), np.ones(len(scores))]
        masks = np.concatenate([np.zeros((n, *d.masks.shape[1:]), bool), d.masks.numpy()])
        value = {"image_auroc": image_value(torch.cat([normal_scores, scores]), labels),
                 "pixel_auroc_aupro_mean": pixel_value(torch.cat([normal_pixel, pixel_maps]), masks)}
        by_strength[f"{d.strength:g}"] = value
        n_defective += len(scores)
        level = chance_level(n, len(scores))
        if len(by_strength) == 1 and value["image_auroc"] < level:
            stopped = (f"the image AUROC at strength {d.strength:g} {value['image_auroc']:.2f} is within chance "
                       f"({level:.2f}); the fainter strengths were not measured")
            break
    evidence = {"statistic": "mean over strengths", "strengths": [float(s) for s in by_strength],
                **{k: float(np.mean([v[k] for v in by_strength.values()]))
                   for k in ("image_auroc", "pixel_auroc_aupro_mean")},
                "by_strength": by_strength, "seed": seed, "n_normal": n, "n_defective": n_defective,
                "stopped": stopped}
    return evidence, {"pixel": normal_pixel, "image": normal_image}


def holdout_choice(model: MaskedAutoencoderViT, data_path: str | Path, names: list[str], options: ScoringOptions,
                   device: torch.device, amp_dtype: Optional[torch.dtype], batch_size: int = 8, seed: int = 0
                   ) -> tuple[dict[str, torch.Tensor], RecipeChoice]:
    """The held-out normal maps {error: [n, S, S]} and the category's recipe choice (util.recipe_choice)."""
    evidence = holdout_evidence(model, data_path, names, options, device, amp_dtype, batch_size, seed)
    return evidence.normal, evidence.choose(options.sigma)


def apply_choice(options: ScoringOptions, choice: Optional[dict[str, Any]]) -> ScoringOptions:
    """`options` with a stored choice's recipe fields (util.recipe_choice.choice_from_dict)."""
    fields_set = choice_from_dict(choice)
    return replace(options, **fields_set) if fields_set else options


def make_calibration(maps: dict[str, torch.Tensor], holdout_files: list[str], input_size: int,
                     options: ScoringOptions, choice: Optional[RecipeChoice] = None) -> dict[str, Any]:
    """The checkpoint's `calibration` entry for held-out maps made with `options` (and the choice,
    whose recipes then become the stored defaults)."""
    stored_choice = choice.to_dict() if choice is not None else None
    options = apply_choice(options, stored_choice)
    _, threshold = fit_scoring(maps, options)
    return {"version": CALIBRATION_VERSION, "holdout_files": list(holdout_files), "input_size": int(input_size),
            **{k: getattr(options, k) for k in MAP_OPTIONS},
            "maps": {e: m.float().contiguous() for e, m in maps.items()},
            "choice": stored_choice, "defaults": options.to_dict(), "threshold": threshold.to_dict()}


def checkpoint_defaults(calibration: Optional[dict[str, Any]], train_args: dict[str, Any]
                        ) -> tuple[ScoringOptions, str]:
    """The options a checkpoint is scored with when no flag says otherwise, and where they come from:
    its stored per-category choice; for checkpoints made before the choice, what they were scored
    with then (LEGACY_OPTIONS, or the defaults stored with their calibration)."""
    if calibration is not None and calibration.get("choice"):
        source = "chosen for this category from its held-out normal images"
        if calibration.get("version", 0) < CALIBRATION_VERSION:
            source += (" (note: from full-strength synthetic defects only, before graded strengths; it is scored "
                       "as before; retrain for today's choice)")
        return options_from(calibration["defaults"]), source
    if int(train_args.get("scoring_version", 0)) >= SCORING_VERSION:
        return ScoringOptions(), "the global defaults"
    stored = (calibration or {}).get("defaults")
    return (options_from(stored, LEGACY_OPTIONS) if stored else LEGACY_OPTIONS,
            "note: this checkpoint predates the per-category recipe choice; it is scored as before "
            "(stripes masks, fusion-absz image map); retrain, or pass scoring flags, for today's defaults")


def fit_scoring(maps: dict[str, torch.Tensor], options: ScoringOptions,
                head_maps: Optional[dict[str, torch.Tensor]] = None):
    """Statistics of both map recipes and the threshold, from held-out maps {error: [n, S, S]}. Where
    the head gives a level, `head_maps` holds its maps of the same held-out images ({"pixel" and/or
    "image": [n, S, S]}, stored with the head) and that level's threshold comes from them (the image
    score: their maximum).

    Returns ((pixel LevelStats, image LevelStats), Threshold).
    """
    n = min(m.shape[0] for m in maps.values())
    if n < MIN_CALIBRATION_IMAGES:
        raise ValueError(f"calibration needs at least {MIN_CALIBRATION_IMAGES} held-out images, got {n}")
    pixel_stats, pixel_loo = fit_level(smoothed(maps, options.sigma), MapSpec.parse(options.pixel_map))
    image_stats, image_loo = fit_level(smoothed(maps, options.image_sigma), MapSpec.parse(options.image_map))
    head_maps = head_maps or {}
    pixel_loo = head_maps.get("pixel", pixel_loo)
    image_loo, score = (head_maps["image"], "max") if "image" in head_maps else (image_loo, options.score)
    threshold = fit_threshold(image_loo, pixel_loo, score, options.topk_fraction,
                              options.image_quantile, options.pixel_quantile)
    return (pixel_stats, image_stats), threshold


HEAD_MODES = ("auto", "on", "off")


def head_levels(entry: Optional[dict[str, Any]], mode: str) -> tuple[bool, bool, str]:
    """(head gives the pixel level, head gives the image level, why) for main_infer.py --head: `auto`
    follows the head's stored per-category choice (util.recipe_choice.choose_head), `on` takes the head
    at both levels, `off` neither. ValueError for `on` without a head."""
    if mode not in HEAD_MODES:
        raise ValueError(f"head mode {mode!r}: choose one of {', '.join(HEAD_MODES)}")
    if entry is None:
        if mode == "on":
            raise ValueError("the checkpoint has no discriminative head; train one with main_train_head.py "
                             "and score its checkpoint-head.pth")
        return False, False, ""
    if mode != "auto":
        return mode == "on", mode == "on", f"head {mode} (--head {mode})"
    choice = entry.get("choice") or {}
    return bool(choice.get("pixel")), bool(choice.get("image")), f"head chosen per level: {choice.get('reason')}"


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


def options_from(values: dict[str, Any], defaults: Optional[ScoringOptions] = None) -> ScoringOptions:
    """ScoringOptions from a dict that may hold other keys (a parsed command line, say); None or absent =
    the value in `defaults` (ScoringOptions() when not given)."""
    defaults = defaults or ScoringOptions()
    return ScoringOptions(**{f.name: values[f.name] if values.get(f.name) is not None else getattr(defaults, f.name)
                             for f in fields(ScoringOptions)})
