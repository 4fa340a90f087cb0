"""The quality table on which every scoring default is decided: each category trained once per
initialisation with the demo recipe, and every candidate scored from the same checkpoints.

    python scripts/quality_table.py --categories capsule=DATA/capsule,grass=PHOTO/grass,... \\
        --inits scratch,prior=weights/mae_vit_tiny_patch7_procedural_112.pth --output_dir OUT [--no_train] \\
        [--holdout_roots grass=PHOTO/grass_holdout,...]

For each (init, category): OUT/<init>_<category>/ holds main_train.py's run (the demo recipe, skipped
when checkpoint-last.pth exists; with --holdout_roots, `--holdout_root ROOT`) and maps_<pattern>.pt,
the per-pixel error maps of the held-out normal images, of the synthetic defects on them at each
evidence strength, and of the test images, for each inference mask pattern. The file is re-read only
while what the evidence depends on is unchanged (the checkpoint, the held-out images, the strengths,
the defect kinds, the seed and the defect library: its `key`), else recomputed. The held-out images
are read from --holdout_roots' ROOT, else the run's own `holdout_root`, else its `data_path`.
From those maps, with no retraining:
- original: the original method (stripes masks, raw mse max at sigma 4 for both levels);
- previous: the defaults before the per-category choice (stripes, image fusion-absz max at sigma 2,
  raw mse pixel map);
- each grid-mask candidate of util.recipe_choice, image and pixel level separately;
- auto: the per-category choice made from held-out normal images only (util.recipe_choice), the
  pixel map the synthetic defects prefer without the margin the choice demands, the image recipe
  they prefer without the warning's fallback, and the choice the test labels would have made among
  the same candidates (oracle), with what the difference cost; the evidence per strength, the
  choice's warning, and the test normals' false-alarm rate at the threshold the choice learnt
  (util.calibration.fit_threshold: the image_quantile quantile of the held-out leave-one-out scores;
  the promised rate is 1 - image_quantile).
Writes OUT/quality.json and OUT/quality.md (per category, per kind and the means).
"""
import argparse
import hashlib
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
from models_head import HeadScorer, head_from_entry  # noqa: E402
from models_mae import AnomalyScorer  # noqa: E402
from scoring import (HoldoutEvidence, ScoringOptions, apply_choice, collect_outputs, fit_scoring,  # noqa: E402
                     holdout_evidence, smoothed)
from util import defects  # noqa: E402
from util.calibration import MapSpec, fit_level, image_scores, level_map  # noqa: E402
from util.checkpoint import read_checkpoint  # noqa: E402
from util.cli import OneLineArgumentParser, UserError, run_cli  # noqa: E402
from util.datasets import TestDataset, find_test_items, holdout_root_names, normalise  # noqa: E402
from util.metrics import aupro, auroc, pixel_auroc  # noqa: E402
from util.recipe_choice import (EVIDENCE_STRENGTHS, IMAGE_CANDIDATES, ORIGINAL_IMAGE, PIXEL_CANDIDATES,  # noqa: E402
                                TOLERANCE, DefectMaps, ImageRecipe, check_strengths,
                                first_within_tolerance)

# The demo recipe (Makefile, `make demo`); tests/test_quality_table.py checks that the two agree.
DEMO_RECIPE = {"model": "mae_vit_tiny_patch7", "input_size": 112, "epochs": 50, "batch_size": 8, "lr": 1.5e-3,
               "warmup_epochs": 4, "train_mask_ratio": 0.25}
PATTERNS = ("stripes", "grid")
PREVIOUS_IMAGE = ImageRecipe("fusion-absz", 2.0)
METRICS = ("image_auroc", "pixel_auroc", "aupro")
HEAD_EVAL_EVERY = 25  # test metrics of the head every N steps, for its spread only (never for its weights)


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser("quality_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--categories", required=True,
                   help="comma-separated NAME=PATH (category roots with train/good and test/)")
    p.add_argument("--inits", default="scratch",
                   help="comma-separated initialisations: scratch, or NAME=WEIGHTS for main_train.py --pretrained")
    p.add_argument("--output_dir", required=True, help="runs and tables go here")
    p.add_argument("--no_train", action="store_true", help="only score runs whose checkpoint exists")
    p.add_argument("--holdout_roots", default="",
                   help="comma-separated NAME=ROOT: category NAME trains with main_train.py --holdout_root ROOT "
                        "(every image of ROOT/train/good held out) and its evidence reads them there")
    p.add_argument("--strengths", default=",".join(f"{v:g}" for v in EVIDENCE_STRENGTHS),
                   help="comma-separated defect strengths of the held-out evidence, each in (0, 1]")
    p.add_argument("--head", action="store_true",
                   help="also train the discriminative head on each run (main_train_head.py with its defaults and "
                        f"--eval_every {HEAD_EVAL_EVERY} for the step-to-step spread; skipped where "
                        "checkpoint-head.pth exists) and add its rows")
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


def train(root: Path, run_dir: Path, pretrained: str | None, holdout_root: Path | None = None) -> None:
    """main_train.py with the demo recipe (a subprocess, so a failure names its log)."""
    cmd = [sys.executable, str(REPO / "main_train.py"), "--data_path", str(root), "--output_dir", str(run_dir),
           *[a for k, v in DEMO_RECIPE.items() for a in (f"--{k}", str(v))],
           "--save_every", "0", "--num_workers", "0", "--print_freq", "100", "--device", "cpu"]
    if pretrained:
        cmd += ["--pretrained", pretrained]
    if holdout_root:
        cmd += ["--holdout_root", str(holdout_root)]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_suffix(".log"), "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise UserError(f"training failed; see {run_dir.with_suffix('.log')}")


def held_out(train_args: dict[str, Any], holdout_root: Path | None) -> tuple[str, list[str]]:
    """Where a run's held-out images are and their names: every image of --holdout_roots' ROOT/train/good
    (those of the run itself when it was trained with that --holdout_root), else the run's own."""
    own = train_args.get("holdout_root")
    if holdout_root is None or (own and Path(own).resolve() == holdout_root.resolve()):
        return str(own or train_args["data_path"]), list(train_args["holdout_files"])
    return str(holdout_root), holdout_root_names(holdout_root, train_args["data_path"])


def evidence_key(checkpoint: Path, root: str, names: list[str], seed: int, strengths: tuple[float, ...]
                 ) -> dict[str, Any]:
    """What a run's cached maps depend on: the checkpoint file, the held-out images, the evidence's
    strengths, defect kinds and seed, and the defect library's code."""
    stat = checkpoint.stat()
    return {"checkpoint": [int(stat.st_size), int(stat.st_mtime_ns)], "holdout_root": root, "holdout_files": names,
            "seed": seed, "strengths": list(strengths), "kinds": list(defects.EVIDENCE_KINDS),
            "defects": hashlib.sha256(Path(defects.__file__).read_bytes()).hexdigest()[:16]}


def collect_maps(checkpoint: Path, root: Path, holdout: tuple[str, list[str]], seed: int,
                 strengths: tuple[float, ...], pattern: str, device: torch.device) -> dict[str, Any]:
    """Unsmoothed error maps of the held-out images (holdout: their root and names), of the synthetic
    defects on them at each strength (what the choice is made from) and of the test images, for one
    mask pattern (weights_only-loadable)."""
    model, _, _ = build_model(str(checkpoint))
    model.to(device)
    options = ScoringOptions(mask_pattern=pattern)
    evidence = holdout_evidence(model, *holdout, options, device, None, seed=seed, strengths=strengths)
    dataset = TestDataset(find_test_items(root), model.img_size)
    scorer = AnomalyScorer(model, options.num_masks, pattern).to(device)
    test = collect_error_maps(scorer, DataLoader(dataset, batch_size=8), device, None)
    return {"normal": evidence.normal, "defective": [d._asdict() for d in evidence.defective], "test": test,
            "labels": torch.tensor([it.label for it in dataset.items]), "masks": dataset.masks}


def cached_maps(run_dir: Path, root: Path, holdout_root: Path | None, strengths: tuple[float, ...], pattern: str,
                device: torch.device) -> dict[str, Any]:
    """collect_maps' result, re-read from run_dir/maps_<pattern>.pt while its key matches (module docstring)."""
    checkpoint = run_dir / "checkpoint-last.pth"
    train_args = read_checkpoint(checkpoint)["args"]
    holdout, seed = held_out(train_args, holdout_root), int(train_args.get("seed", 0))
    key = evidence_key(checkpoint, *holdout, seed, strengths)
    path = run_dir / f"maps_{pattern}.pt"
    if path.is_file():
        maps = torch.load(path, weights_only=True)
        if maps.get("key") == key:
            return maps
    maps = {"key": key, **collect_maps(checkpoint, root, holdout, seed, strengths, pattern, device)}
    torch.save(maps, path)
    return maps


def level_maps(maps: dict[str, Any], recipe: str, sigma: float) -> np.ndarray:
    """The recipe's maps of the test images [N, S, S], statistics from all held-out images."""
    normal, test = smoothed(maps["normal"], sigma), smoothed(maps["test"], sigma)
    spec = MapSpec.parse(recipe)
    stats, _ = fit_level(normal, spec)
    return level_map({e: test[e].double() for e in spec.errors}, spec, stats).float().numpy()


def scores_of_test_images(maps: dict[str, Any], recipe: ImageRecipe) -> np.ndarray:
    """The recipe's image scores of the test images [N]."""
    level = torch.from_numpy(level_maps(maps, recipe.image_map, recipe.image_sigma))
    return image_scores(level, recipe.score, recipe.topk_fraction).numpy()


def image_metric(maps: dict[str, Any], recipe: ImageRecipe) -> float:
    return auroc(scores_of_test_images(maps, recipe), maps["labels"].numpy())


def pixel_metrics(maps: dict[str, Any], recipe: str, sigma: float = 4.0) -> tuple[float, float]:
    anomaly_maps, masks = level_maps(maps, recipe, sigma), maps["masks"].numpy()
    return pixel_auroc(anomaly_maps, masks), aupro(anomaly_maps, masks)


def false_alarms(maps: dict[str, Any], choice: dict[str, Any]) -> dict[str, float]:
    """The test normals' false-alarm rate at the image threshold the choice learnt from the held-out
    images (scoring.fit_scoring), and the rate it promises (1 - image_quantile)."""
    options = apply_choice(ScoringOptions(), choice)
    _, threshold = fit_scoring(maps["normal"], options)
    recipe = ImageRecipe(options.image_map, options.image_sigma, options.score, options.topk_fraction)
    normals = scores_of_test_images(maps, recipe)[maps["labels"].numpy() == 0]
    return {"threshold": threshold.image, "rate": float(np.mean(normals >= threshold.image)),
            "promised": 1.0 - options.image_quantile, "n_normal": int(normals.size)}


def score_run(by_pattern: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every candidate's metrics on one checkpoint (module docstring)."""
    stripes, grid = by_pattern["stripes"], by_pattern["grid"]
    original = (image_metric(stripes, ORIGINAL_IMAGE), *pixel_metrics(stripes, "mse"))
    previous = (image_metric(stripes, PREVIOUS_IMAGE), *pixel_metrics(stripes, "mse"))
    image = {c.name: image_metric(grid, c) for c in IMAGE_CANDIDATES}
    pixel = {r: pixel_metrics(grid, r) for r in PIXEL_CANDIDATES}
    evidence = HoldoutEvidence(grid["normal"], tuple(DefectMaps(**d) for d in grid["defective"]))
    choice = evidence.choose(ScoringOptions.sigma).to_dict()
    auto_image = ImageRecipe(choice["image_map"], choice["image_sigma"], choice["score"], choice["topk_fraction"]).name
    oracle_image = max(image, key=image.get)
    oracle_pixel = max(pixel, key=lambda r: sum(pixel[r]))  # by pixel AUROC + AUPRO, as the evidence
    # what the evidence prefers without util.recipe_choice's PIXEL_MARGIN, and without the warning's fallback
    per_pixel_ok = choice["evidence"]["per_pixel_eligible"]
    eligible_pixel = {r for r in PIXEL_CANDIDATES if per_pixel_ok or MapSpec.parse(r).norm == "raw"}
    held_out_pixel = first_within_tolerance(choice["evidence"]["pixel_auroc_aupro_mean"], eligible_pixel)
    eligible_image = {c.name for c in IMAGE_CANDIDATES if per_pixel_ok or MapSpec.parse(c.image_map).norm == "raw"}
    unwarned_image = first_within_tolerance(choice["evidence"]["image_auroc"], eligible_image)
    return {
        "original": dict(zip(METRICS, original)), "previous": dict(zip(METRICS, previous)),
        "grid_raw_mse": dict(zip(METRICS, (image[ORIGINAL_IMAGE.name], *pixel["mse"]))),
        "auto": dict(zip(METRICS, (image[auto_image], *pixel[choice["pixel_map"]]))),
        "oracle": dict(zip(METRICS, (image[oracle_image], *pixel[oracle_pixel]))),
        "held_out_pixel": dict(zip(METRICS, (image[auto_image], *pixel[held_out_pixel]))),
        "unwarned": dict(zip(METRICS, (image[unwarned_image], *pixel[choice["pixel_map"]]))),
        "image_candidates": image, "pixel_candidates": {r: dict(zip(METRICS[1:], v)) for r, v in pixel.items()},
        "choice": {"image": auto_image, "pixel": choice["pixel_map"], "oracle_image": oracle_image,
                   "oracle_pixel": oracle_pixel, "held_out_pixel": held_out_pixel, "unwarned_image": unwarned_image,
                   "warning": choice["warning"], "evidence": choice["evidence"]},
        "false_alarms": false_alarms(grid, choice),
    }


def train_head(run_dir: Path, root: Path) -> None:
    """main_train_head.py with its defaults on the run's checkpoint (a subprocess, so a failure names its log)."""
    cmd = [sys.executable, str(REPO / "main_train_head.py"), "--checkpoint", str(run_dir / "checkpoint-last.pth"),
           "--data_path", str(root), "--eval_every", str(HEAD_EVAL_EVERY), "--device", "cpu", "--overwrite"]
    with open(run_dir.with_name(run_dir.name + "_head.log"), "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise UserError(f"head training failed; see {log.name}")


def spread(history: list[dict[str, Any]], key: str) -> float:
    """max - min of `key` over the reports in the last quarter of the head's training steps."""
    last = max(r["step"] for r in history)
    values = [r[key] for r in history if key in r and r["step"] > 0.75 * last]
    return float(max(values) - min(values)) if values else float("nan")


def score_head(run_dir: Path, root: Path, run: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The head's test metrics at both levels, the per-level choice stored with it (and the test labels'
    choice between the head and the recipe `run` chose, per level), its spread over the last quarter of
    training, and the test normals' false alarms at its threshold where it gives the image level."""
    path = run_dir / "checkpoint-head.pth"
    if not path.is_file():
        print(f"training the head of {run_dir.name}", flush=True)
        train_head(run_dir, root)
    checkpoint = read_checkpoint(path)
    entry = checkpoint["head"]
    model, _, calibration = build_model(str(path), checkpoint=checkpoint)
    own = AnomalyScorer(model, entry["num_masks"], entry["mask_pattern"])
    scorer = HeadScorer(own, head_from_entry(entry), int(entry["image_kernel"])).to(device).eval()
    dataset = TestDataset(find_test_items(root), model.img_size)
    scores, anomaly_maps, _ = collect_outputs(scorer, normalise(dataset.images), device, None)
    labels, masks = np.array([it.label for it in dataset.items]), dataset.masks.numpy()
    head = dict(zip(METRICS, (auroc(scores.numpy(), labels), pixel_auroc(anomaly_maps.numpy(), masks),
                              aupro(anomaly_maps.numpy(), masks))))
    choice, recon = entry["choice"], run["auto"]
    chosen = {"image_auroc": head["image_auroc"] if choice["image"] else recon["image_auroc"],
              **{k: head[k] if choice["pixel"] else recon[k] for k in METRICS[1:]}}
    oracle = {"image": head["image_auroc"] > recon["image_auroc"],
              "pixel": head["pixel_auroc"] + head["aupro"] > recon["pixel_auroc"] + recon["aupro"]}
    best = {"image_auroc": max(head["image_auroc"], recon["image_auroc"]),
            **{k: head[k] if oracle["pixel"] else recon[k] for k in METRICS[1:]}}
    history = [json.loads(line) for line in (run_dir / "head_log.txt").read_text().splitlines()]
    result = {"head": head, "chosen": chosen, "oracle": best, "choice": {k: choice[k] for k in ("image", "pixel")},
              "oracle_choice": oracle, "reason": choice["reason"], "evidence": entry["evidence"],
              "spread": {k: spread(history, f"test_{k}") for k in METRICS},
              "train_seconds": entry["training"]["seconds"], "steps": entry["training"]["options"]["steps"]}
    if choice["image"]:
        options = apply_choice(ScoringOptions(), calibration["choice"])
        _, threshold = fit_scoring(calibration["maps"], options, {"image": entry["holdout_maps"]["image"]})
        normals = scores.numpy()[labels == 0]
        result["false_alarms"] = {"rate": float(np.mean(normals >= threshold.image)), "n_normal": int(normals.size),
                                  "promised": 1.0 - options.image_quantile}
    return result


ROWS = (("original", "original method (stripes, raw mse max)"), ("previous", "previous defaults (stripes, "
        "fusion-absz image map)"), ("grid_raw_mse", "grid masks, raw mse"), ("auto", "grid + per-category choice"),
        ("held_out_pixel", "as above, pixel map chosen without the margin (not used)"),
        ("unwarned", "as above, image recipe chosen without the warning's fallback (not used)"),
        ("oracle", "grid + the test labels' choice (not deployable)"))


def fmt(m: dict[str, float]) -> str:
    return " / ".join(f"{m[k]:.3f}" for k in METRICS)


def by_strength(evidence: dict[str, Any], level: str, name: str) -> str:
    """One candidate's evidence at each strength and their mean: 'v1/v2/... (mean)'."""
    values = "/".join(f"{v[level][name]:.2f}" for v in evidence["by_strength"].values())
    return f"{values} ({evidence[level][name]:.3f})"


def markdown(results: dict[str, dict[str, Any]], kinds: dict[str, str], photos: list[str]) -> str:
    """Per init: one row per recipe, one column per category, then the kinds' and photo means; the
    choices, their cost and false alarms; the evidence per strength."""
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
                  "test labels' choice) | cost: image AUROC / pixel AUROC / AUPRO | map consistency | "
                  "test normals' false alarms (promised) |", "|---|---|---|---|---|---|---|"]
        for c in cats:
            ch, auto, oracle, fa = runs[c]["choice"], runs[c]["auto"], runs[c]["oracle"], runs[c]["false_alarms"]
            cost = fmt({k: oracle[k] - auto[k] for k in METRICS})
            lines.append(f"| {c} | {kinds[c]} | {ch['image']} ({ch['oracle_image']}) | {ch['pixel']} "
                         f"({ch['held_out_pixel']}; {ch['oracle_pixel']}) | {cost} | "
                         f"{ch['evidence']['map_consistency']:.2f} | {fa['rate']:.2f} of {fa['n_normal']} "
                         f"({fa['promised']:.2f}) |")
        lines += head_markdown(runs, kinds)
        strengths = "/".join(f"{s:g}" for s in next(iter(runs.values()))["choice"]["evidence"]["strengths"])
        lines += ["", f"Held-out evidence at strengths {strengths} (mean): image AUROC, pixel (AUROC + AUPRO) / 2", "",
                  "| category | image: original | image: chosen | image: test labels' choice | pixel: mse | "
                  "pixel: without the margin | warning |", "|---|---|---|---|---|---|---|"]
        for c in cats:
            ch = runs[c]["choice"]
            ev = ch["evidence"]
            lines.append(f"| {c} | {by_strength(ev, 'image_auroc', ORIGINAL_IMAGE.name)} | "
                         f"{ch['image']}: {by_strength(ev, 'image_auroc', ch['image'])} | "
                         f"{ch['oracle_image']}: {by_strength(ev, 'image_auroc', ch['oracle_image'])} | "
                         f"{by_strength(ev, 'pixel_auroc_aupro_mean', 'mse')} | {ch['held_out_pixel']}: "
                         f"{by_strength(ev, 'pixel_auroc_aupro_mean', ch['held_out_pixel'])} | {ch['warning'] or ''} |")
        lines.append("")
    return "\n".join(lines)


def head_markdown(runs: dict[str, dict[str, Any]], kinds: dict[str, str]) -> list[str]:
    """The head's rows: alone, the per-level choice with it against the test labels' choice, the
    held-out evidence it was chosen on, its spread, false alarms and training time."""
    cats = [c for c in runs if "head" in runs[c]]
    if not cats:
        return []
    lines = ["", "Discriminative head (image AUROC / pixel AUROC / AUPRO)", "",
             "| category | kind | reconstruction (per-category choice) | head alone | chosen levels | with the head's "
             "choice | test labels' choice | cost | head evidence (image; pixel) | spread, last quarter | "
             "false alarms | training s |", "|---" * 12 + "|"]
    for c in cats:
        h = runs[c]["head"]
        levels = "+".join(lvl for lvl in ("image", "pixel") if h["choice"][lvl]) or "none"
        oracle = "+".join(lvl for lvl in ("image", "pixel") if h["oracle_choice"][lvl]) or "none"
        fa = h.get("false_alarms")
        alarms = f"{fa['rate']:.2f} of {fa['n_normal']}" if fa else ""
        lines.append(f"| {c} | {kinds[c]} | {fmt(runs[c]['auto'])} | {fmt(h['head'])} | {levels} | {fmt(h['chosen'])} "
                     f"| {oracle}: {fmt(h['oracle'])} | {fmt({k: h['oracle'][k] - h['chosen'][k] for k in METRICS})} | "
                     f"{h['evidence']['image_auroc']:.3f}; {h['evidence']['pixel_auroc_aupro_mean']:.3f}"
                     f"{' (strongest only)' if h['evidence'].get('stopped') else ''} | "
                     f"{fmt(h['spread'])} | {alarms} | "
                     f"{h['train_seconds']:.0f} |")
    return lines


def parse_pairs(text: str, what: str) -> dict[str, str]:
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep and name != "scratch":
            raise UserError(f"{what}: expected NAME=VALUE, got {part!r}")
        pairs[name] = value
    return pairs


def parse_strengths(text: str) -> tuple[float, ...]:
    """--strengths as floats, strongest first (util.recipe_choice.check_strengths); a UserError if not."""
    try:
        return check_strengths([float(v) for v in text.split(",") if v.strip()])
    except ValueError as e:
        raise UserError(f"--strengths {text}: {e}; e.g. --strengths 1,0.5,0.25,0.125") from None


def main(args: argparse.Namespace) -> int:
    categories = {n: Path(p) for n, p in parse_pairs(args.categories, "--categories").items()}
    inits = parse_pairs(args.inits, "--inits")
    holdout_roots = {n: Path(p) for n, p in parse_pairs(args.holdout_roots, "--holdout_roots").items()}
    unknown = sorted(set(holdout_roots) - set(categories))
    if unknown:
        raise UserError(f"--holdout_roots names {', '.join(unknown)}, not in --categories; use the categories' names")
    for name, root in holdout_roots.items():
        if not (root / "train" / "good").is_dir():
            raise UserError(f"--holdout_roots {name}={root}: no {root / 'train' / 'good'} folder; give a category root")
    strengths = parse_strengths(args.strengths)
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
                train(root, run_dir, weights or None, holdout_roots.get(name))
            by_pattern = {p: cached_maps(run_dir, root, holdout_roots.get(name), strengths, p, device)
                          for p in PATTERNS}
            results.setdefault(init, {})[name] = run = score_run(by_pattern)
            if args.head:
                run["head"] = score_head(run_dir, root, run, device)
            warning = run["choice"]["warning"]
            print(f"{run_dir.name}: original {fmt(run['original'])}  auto {fmt(run['auto'])}"
                  + (f"  warning: {warning}" if warning else ""), flush=True)
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
