"""The quality table on which every scoring default is decided: each category trained once per
initialisation with the demo recipe, and every candidate scored from the same checkpoints.

    python scripts/quality_table.py --categories capsule=DATA/capsule,grass=PHOTO/grass,... \\
        --inits scratch,prior=weights/mae_vit_tiny_patch7_procedural_112.pth --output_dir OUT [--no_train]

For each (init, category): OUT/<init>_<category>/ holds main_train.py's run (the demo recipe, skipped
when checkpoint-last.pth exists) and maps_<pattern>.pt, the per-pixel error maps of the held-out
normal images, of synthetic defects on them, and of the test images, for each inference mask
pattern (computed once, then re-read). From those maps, with no retraining:
- original: the original method (stripes masks, raw mse max at sigma 4 for both levels);
- previous: the defaults before the per-category choice (stripes, image fusion-absz max at sigma 2,
  raw mse pixel map);
- each grid-mask candidate of util.recipe_choice, image and pixel level separately;
- auto: the per-category choice made from held-out normal images only (util.recipe_choice), the
  pixel map the synthetic defects prefer without the margin the choice demands, and the choice the test
  labels would have made among the same candidates (oracle), with what the difference cost.
Writes OUT/quality.json and OUT/quality.md (per category, per kind and the means).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine import collect_error_maps  # noqa: E402
from main_infer import build_model  # noqa: E402
from models_mae import AnomalyScorer  # noqa: E402
from scoring import HoldoutEvidence, ScoringOptions, holdout_evidence, smoothed  # noqa: E402
from util.calibration import MapSpec, fit_level, image_scores, level_map  # noqa: E402
from util.cli import OneLineArgumentParser, UserError, run_cli  # noqa: E402
from util.datasets import TestDataset, find_test_items  # noqa: E402
from util.metrics import aupro, auroc, pixel_auroc  # noqa: E402
from util.recipe_choice import IMAGE_CANDIDATES, PIXEL_CANDIDATES, TOLERANCE, ImageRecipe  # noqa: E402

# The demo recipe (Makefile, `make demo`); tests/test_quality_table.py checks that the two agree.
DEMO_RECIPE = {"model": "mae_vit_tiny_patch7", "input_size": 112, "epochs": 50, "batch_size": 8, "lr": 1.5e-3,
               "warmup_epochs": 4, "train_mask_ratio": 0.25}
PATTERNS = ("stripes", "grid")
ORIGINAL_IMAGE = ImageRecipe("mse", 4.0)
PREVIOUS_IMAGE = ImageRecipe("fusion-absz", 2.0)
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser("quality_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--categories", required=True,
                   help="comma-separated NAME=PATH (category roots with train/good and test/)")
    p.add_argument("--inits", default="scratch",
                   help="comma-separated initialisations: scratch, or NAME=WEIGHTS for main_train.py --pretrained")
    p.add_argument("--output_dir", required=True, help="runs and tables go here")
    p.add_argument("--no_train", action="store_true", help="only score runs whose checkpoint exists")
    p.add_argument("--device", default="cpu")
    return p


def kind_of(root: Path) -> tuple[str, bool]:
    """(texture or object, whether it is a real-photo category), from the generators' marker file
    (.synthetic_mvtec.json); an object and not a photo without one."""
    marker = root / ".synthetic_mvtec.json"
    if not marker.is_file():
        return "object", False
    meta = json.loads(marker.read_text())
    return ("texture" if meta.get("kind") == "texture" else "object"), meta.get("generator", "").endswith(
        "make_photo_mvtec.py")


def train(root: Path, run_dir: Path, pretrained: str | None) -> None:
    """main_train.py with the demo recipe (a subprocess, so a failure names its log)."""
    cmd = [sys.executable, str(REPO / "main_train.py"), "--data_path", str(root), "--output_dir", str(run_dir),
           *[a for k, v in DEMO_RECIPE.items() for a in (f"--{k}", str(v))],
           "--save_every", "0", "--num_workers", "0", "--print_freq", "100", "--device", "cpu"]
    if pretrained:
        cmd += ["--pretrained", pretrained]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_suffix(".log"), "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise UserError(f"training failed; see {run_dir.with_suffix('.log')}")


def collect_maps(checkpoint: Path, root: Path, pattern: str, device: torch.device) -> dict[str, Any]:
    """Unsmoothed error maps of the held-out images, of synthetic defects on them (what the choice is
    made from) and of the test images, for one mask pattern."""
    model, train_args, _ = build_model(str(checkpoint))
    model.to(device)
    options = ScoringOptions(mask_pattern=pattern)
    evidence = holdout_evidence(model, train_args["data_path"], train_args["holdout_files"], options, device, None,
                                seed=int(train_args.get("seed", 0)))
    dataset = TestDataset(find_test_items(root), model.img_size)
    scorer = AnomalyScorer(model, options.num_masks, pattern).to(device)
    test = collect_error_maps(scorer, DataLoader(dataset, batch_size=8), device, None)
    return {"normal": evidence.normal, "defective": evidence.defective, "source": evidence.source,
            "defect_masks": evidence.defect_masks, "test": test,
            "labels": torch.tensor([it.label for it in dataset.items]), "masks": dataset.masks}


def cached_maps(run_dir: Path, root: Path, pattern: str, device: torch.device) -> dict[str, Any]:
    path = run_dir / f"maps_{pattern}.pt"
    if path.is_file():
        maps = torch.load(path, weights_only=True)
        if "defective" in maps:  # files from before the evidence was cached are recomputed
            return maps
    maps = collect_maps(run_dir / "checkpoint-last.pth", root, pattern, device)
    torch.save(maps, path)
    return maps


def level_maps(maps: dict[str, Any], recipe: str, sigma: float) -> np.ndarray:
    """The recipe's maps of the test images [N, S, S], statistics from all held-out images."""
    normal, test = smoothed(maps["normal"], sigma), smoothed(maps["test"], sigma)
    spec = MapSpec.parse(recipe)
    stats, _ = fit_level(normal, spec)
    return level_map({e: test[e].double() for e in spec.errors}, spec, stats).float().numpy()


def image_metric(maps: dict[str, Any], recipe: ImageRecipe) -> float:
    scores = image_scores(torch.from_numpy(level_maps(maps, recipe.image_map, recipe.image_sigma)), recipe.score,
                          recipe.topk_fraction).numpy()
    return auroc(scores, maps["labels"].numpy())


def pixel_metrics(maps: dict[str, Any], recipe: str, sigma: float = 4.0) -> tuple[float, float]:
    anomaly_maps, masks = level_maps(maps, recipe, sigma), maps["masks"].numpy()
    return pixel_auroc(anomaly_maps, masks), aupro(anomaly_maps, masks)


def score_run(by_pattern: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every candidate's metrics on one checkpoint (module docstring)."""
    stripes, grid = by_pattern["stripes"], by_pattern["grid"]
    original = (image_metric(stripes, ORIGINAL_IMAGE), *pixel_metrics(stripes, "mse"))
    previous = (image_metric(stripes, PREVIOUS_IMAGE), *pixel_metrics(stripes, "mse"))
    image = {c.name: image_metric(grid, c) for c in IMAGE_CANDIDATES}
    pixel = {r: pixel_metrics(grid, r) for r in PIXEL_CANDIDATES}
    evidence = HoldoutEvidence(grid["normal"], grid["defective"], grid["source"], grid["defect_masks"])
    choice = evidence.choose(ScoringOptions.sigma).to_dict()
    auto_image = ImageRecipe(choice["image_map"], choice["image_sigma"], choice["score"], choice["topk_fraction"]).name
    oracle_image = max(image, key=image.get)
    oracle_pixel = max(pixel, key=lambda r: sum(pixel[r]))  # by pixel AUROC + AUPRO, as the evidence
    # the pixel map the synthetic defects prefer, without util.recipe_choice's PIXEL_MARGIN
    held_out = {r: v for r, v in choice["evidence"]["pixel_auroc_aupro_mean"].items()
                if choice["evidence"]["per_pixel_eligible"] or MapSpec.parse(r).norm == "raw"}
    held_out_pixel = max(held_out, key=held_out.get)
    return {
        "original": dict(zip(METRICS, original)), "previous": dict(zip(METRICS, previous)),
        "grid_raw_mse": dict(zip(METRICS, (image[ORIGINAL_IMAGE.name], *pixel["mse"]))),
        "auto": dict(zip(METRICS, (image[auto_image], *pixel[choice["pixel_map"]]))),
        "oracle": dict(zip(METRICS, (image[oracle_image], *pixel[oracle_pixel]))),
        "held_out_pixel": dict(zip(METRICS, (image[auto_image], *pixel[held_out_pixel]))),
        "image_candidates": image, "pixel_candidates": {r: dict(zip(METRICS[1:], v)) for r, v in pixel.items()},
        "choice": {"image": auto_image, "pixel": choice["pixel_map"], "oracle_image": oracle_image,
                   "oracle_pixel": oracle_pixel, "held_out_pixel": held_out_pixel, "evidence": choice["evidence"]},
    }


ROWS = (("original", "original method (stripes, raw mse max)"), ("previous", "previous defaults (stripes, "
        "fusion-absz image map)"), ("grid_raw_mse", "grid masks, raw mse"), ("auto", "grid + per-category choice"),
        ("held_out_pixel", "as above, pixel map chosen without the margin (not used)"),
        ("oracle", "grid + the test labels' choice (not deployable)"))


def fmt(m: dict[str, float]) -> str:
    return " / ".join(f"{m[k]:.3f}" for k in METRICS)


def markdown(results: dict[str, dict[str, Any]], kinds: dict[str, str], photos: list[str]) -> str:
    """Per init: one row per recipe, one column per category, then the kinds' and photo means."""
    lines = []
    for init, runs in results.items():
        cats = list(runs)
        groups = {f"mean {k}": [c for c in cats if kinds[c] == k] for k in ("texture", "object")}
        groups["mean photo"] = [c for c in cats if c in photos] if len(set(cats) - set(photos)) else []
        lines += [f"### init: {init} (image AUROC / pixel AUROC / AUPRO)", "",
                  "| recipe | " + " | ".join(cats) + " | " + " | ".join(g for g, m in groups.items() if m) + " |",
                  "|---" * (1 + len(cats) + sum(1 for m in groups.values() if m)) + "|"]
        for key, title in ROWS:
            cells = [fmt(runs[c][key]) for c in cats]
            for members in groups.values():
                if members:
                    cells.append(fmt({k: float(np.mean([runs[c][key][k] for c in members])) for k in METRICS}))
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines += ["", "| category | kind | chosen image recipe (test labels' choice) | pixel map (without the margin; "
                  "test labels' choice) | cost: image AUROC / pixel AUROC / AUPRO | map consistency |",
                  "|---|---|---|---|---|---|"]
        for c in cats:
            ch, auto, oracle = runs[c]["choice"], runs[c]["auto"], runs[c]["oracle"]
            lines.append(f"| {c} | {kinds[c]} | {ch['image']} ({ch['oracle_image']}) | {ch['pixel']} "
                         f"({ch['held_out_pixel']}; {ch['oracle_pixel']}) | {fmt({k: oracle[k] - auto[k] for k in METRICS})} | "
                         f"{ch['evidence']['map_consistency']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def parse_pairs(text: str, what: str) -> dict[str, str]:
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep and name != "scratch":
            raise UserError(f"{what}: expected NAME=VALUE, got {part!r}")
        pairs[name] = value
    return pairs


def main(args: argparse.Namespace) -> int:
    categories = {n: Path(p) for n, p in parse_pairs(args.categories, "--categories").items()}
    inits = parse_pairs(args.inits, "--inits")
    out = Path(args.output_dir)
    device = torch.device(args.device)
    results: dict[str, dict[str, Any]] = {}
    for init, weights in inits.items():
        for name, root in categories.items():
            run_dir = out / f"{init}_{name}"
            if not (run_dir / "checkpoint-last.pth").is_file():
                if args.no_train:
                    print(f"skip {run_dir.name}: no checkpoint", flush=True)
                    continue
                print(f"training {run_dir.name}", flush=True)
                train(root, run_dir, weights or None)
            by_pattern = {p: cached_maps(run_dir, root, p, device) for p in PATTERNS}
            results.setdefault(init, {})[name] = run = score_run(by_pattern)
            print(f"{run_dir.name}: original {fmt(run['original'])}  auto {fmt(run['auto'])}", flush=True)
    markers = {n: kind_of(r) for n, r in categories.items()}  # name -> (kind, is_photo)
    kinds = {n: kind for n, (kind, _) in markers.items()}
    photos = [n for n, (_, is_photo) in markers.items() if is_photo]
    (out / "quality.json").write_text(json.dumps({"kinds": kinds, "photos": photos, "tolerance": TOLERANCE,
                                                  "results": results}, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(results, kinds, photos) + "\n")
    print(f"wrote {out / 'quality.md'} and quality.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
