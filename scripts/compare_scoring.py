"""Compare scoring recipes on one trained checkpoint: every pixel-map and image-map recipe from the
same reconstructions, so a choice of default is measured, never guessed.

    python scripts/compare_scoring.py --checkpoint CKPT --data_path ROOT --output results.json

The test images are reconstructed once (both errors); the held-out normal maps come from the
checkpoint's calibration, or are recomputed from ROOT/train/good/<held-out names>. Per pixel recipe:
pixel AUROC, AUPRO, pixel F1 at its held-out pixel threshold; per image recipe: image AUROC, and
precision/recall/F1 at each image quantile's held-out threshold. Pixel and image metrics depend only
on their own recipe, so the two tables combine freely.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import collect_error_maps  # noqa: E402
from main_infer import build_model  # noqa: E402
from models_mae import AnomalyScorer  # noqa: E402
from scoring import ScoringOptions, calibration_matches, holdout_error_maps, smoothed  # noqa: E402
from util import calibration  # noqa: E402
from util.calibration import MAP_CHOICES, MapSpec, fit_level, fit_threshold, image_scores, level_map  # noqa: E402
from util.cli import DefaultsHelpFormatter, OneLineArgumentParser, UserError, run_cli  # noqa: E402
from util.datasets import TestDataset, find_test_items  # noqa: E402
from util.metrics import aupro, auroc, pixel_auroc, threshold_metrics  # noqa: E402
from util.misc import AMP_CHOICES, resolve_amp, resolve_device  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser("compare_scoring.py", description=__doc__.split("\n\n")[0],
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a main_train.py checkpoint with held-out images")
    p.add_argument("--data_path", required=True, help="the category root it was trained on (test split scored)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--maps", default=",".join(MAP_CHOICES), help="comma-separated recipes (default: all)")
    p.add_argument("--image_quantiles", default="0.9,0.95,0.99,1.0", help="threshold quantiles to report")
    p.add_argument("--pixel_quantile", type=float, default=ScoringOptions.pixel_quantile)
    p.add_argument("--std_floors", default=str(calibration.STD_FLOOR),
                   help="comma-separated floors of the per-pixel std (fractions of its mean) to compare")
    p.add_argument("--sigma", type=float, default=ScoringOptions.sigma, help="pixel-level smoothing")
    p.add_argument("--image_sigma", type=float, default=ScoringOptions.image_sigma, help="image-level smoothing")
    p.add_argument("--num_masks", type=int, default=ScoringOptions.num_masks)
    p.add_argument("--mask_pattern", default=ScoringOptions.mask_pattern)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="as main_infer.py's --amp")
    p.add_argument("--debug", action="store_true")
    return p


def error_maps_of(model, dataset: TestDataset, options: ScoringOptions, device, amp_dtype) -> dict[str, torch.Tensor]:
    """Per-pixel (unsmoothed) error maps of the dataset's images."""
    scorer = AnomalyScorer(model, options.num_masks, options.mask_pattern).to(device)
    return collect_error_maps(scorer, DataLoader(dataset, batch_size=8), device, amp_dtype)


def _level(holdout: dict[str, torch.Tensor], test: dict[str, torch.Tensor], spec: MapSpec
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's maps of the test images [N, H, W] and of the held-out ones (leave-one-out)."""
    stats, loo = fit_level(holdout, spec)
    return level_map({e: test[e].double() for e in spec.errors}, spec, stats).float(), loo


def compare(holdout: dict[str, torch.Tensor], test: dict[str, torch.Tensor], labels: np.ndarray,
            masks: np.ndarray, recipes: list[str], sigma: float, image_sigma: float, image_quantiles: list[float],
            pixel_quantile: float) -> dict:
    """Metrics of every recipe at both levels from per-pixel (unsmoothed) error maps {error: [n, H, W]}."""
    results = {"pixel": {}, "image": {}}
    pixel_holdout, pixel_test = smoothed(holdout, sigma), smoothed(test, sigma)
    image_holdout, image_test = smoothed(holdout, image_sigma), smoothed(test, image_sigma)
    for recipe in recipes:
        spec = MapSpec.parse(recipe)
        maps, loo = _level(pixel_holdout, pixel_test, spec)
        threshold = fit_threshold(loo, loo, "max", 0.01, 1.0, pixel_quantile)
        results["pixel"][recipe] = {
            "pixel_auroc": pixel_auroc(maps.numpy(), masks), "aupro": aupro(maps.numpy(), masks),
            "pixel_f1_at_threshold": threshold_metrics(maps.numpy().ravel(), masks.ravel(), threshold.pixel)["f1"]}
        maps, loo = _level(image_holdout, image_test, spec)
        scores = image_scores(maps).numpy()
        image = {"image_auroc": auroc(scores, labels), "normal_median": float(np.median(scores[labels == 0]))}
        for q in image_quantiles:
            t = fit_threshold(loo, loo, "max", 0.01, q, pixel_quantile).image
            image[f"q{q:g}"] = threshold_metrics(scores, labels, t)
        results["image"][recipe] = image
    return results


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    options = ScoringOptions(num_masks=args.num_masks, mask_pattern=args.mask_pattern)
    model, train_args, stored = build_model(args.checkpoint)
    model.to(device)
    if stored and calibration_matches(stored, options, model.img_size):
        holdout = stored["maps"]
    elif train_args.get("holdout_files"):
        holdout = holdout_error_maps(model, args.data_path, train_args["holdout_files"], options, device, amp_dtype)
    else:
        raise UserError(f"{args.checkpoint} has no held-out images (trained with --holdout 0?)")
    dataset = TestDataset(find_test_items(args.data_path), model.img_size)
    test = error_maps_of(model, dataset, options, device, amp_dtype)
    labels = np.array([it.label for it in dataset.items])
    masks = dataset.masks.numpy()
    recipes = [r.strip() for r in args.maps.split(",") if r.strip()]
    quantiles = [float(q) for q in args.image_quantiles.split(",")]
    results = {"checkpoint": str(args.checkpoint), "data_path": str(args.data_path), "sigma": args.sigma,
               "image_sigma": args.image_sigma, "std_floor": {}}
    for floor in [float(f) for f in args.std_floors.split(",")]:
        calibration.STD_FLOOR = floor  # read at call time by the statistics
        by_floor = results["std_floor"][f"{floor:g}"] = compare(holdout, test, labels, masks, recipes, args.sigma,
                                                                 args.image_sigma, quantiles, args.pixel_quantile)
        print(f"std floor {floor:g}\n{'recipe':14s} {'img AUROC':>9s} {'pix AUROC':>9s} {'AUPRO':>7s} " +
              " ".join(f"F1@q{q:g}" for q in quantiles))
        for r in recipes:
            i, p = by_floor["image"][r], by_floor["pixel"][r]
            print(f"{r:14s} {i['image_auroc']:9.4f} {p['pixel_auroc']:9.4f} {p['aupro']:7.4f} " +
                  " ".join(f"{i[f'q{q:g}']['f1']:7.3f}" for q in quantiles))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
