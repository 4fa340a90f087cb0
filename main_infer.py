"""Anomaly maps, image scores, metrics and pictures from a trained MAE-AD checkpoint.

    python main_infer.py --checkpoint CKPT --data_path ROOT --output_dir OUT    # labelled test split
    python main_infer.py --checkpoint CKPT --images PATH --output_dir OUT       # a folder or one image

The checkpoint alone rebuilds the model (its `args` hold the architecture); LoRA adapters are merged
into the base weights once, before scoring. Outputs (see INTERFACE.md): anomaly_maps/*.npy,
overlays/*.png, scores.csv, skipped.csv (files found but not scored, with the reason), report.html,
metrics.json + roc.png + summary.png (labelled data), args.json, and with --save_tiff the maps at each
image's own size in MVTec AD's evaluation layout. One run per OUT: a non-empty OUT needs --overwrite,
which deletes this script's outputs there (OUTPUTS) and nothing else. See docs/REPORT.md.
"""
import argparse
import csv
import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine import ScoreCollector, run_inference
from lora_utils import cast_frozen_weights, import_adapter, is_lora_name, merge_lora
from models_head import HeadScorer, head_from_entry
from models_mae import MODELS, AnomalyScorer, MaskedAutoencoderViT, create_model
from scoring import HEAD_MODES, ScoringOptions, build_scorer as build_calibrated_scorer, calibration_matches, \
    checkpoint_defaults, fit_scoring, head_levels, holdout_error_maps, options_from
from util.calibration import (MAP_CHOICES, SCORE_METHODS, Threshold, ThresholdCheck, check_false_alarms,
                              normalized_scores, predicted_labels)
from util.checkpoint import _describe, load_pretrained, model_kwargs_from_args, read_checkpoint, state_dict_of
from util.cli import OneLineArgumentParser, UserError, run_cli, warn
from util.datasets import TestDataset, TestItem, find_test_items, load_mask, raw_layout_stem, unlabelled_items
from util.files import check_output_dir, output_stem, prepare_output_dir, write_atomic
from util.images import is_image_file, not_image_reason, other_files, squash_note, visible_files
from util.masks import MASK_PATTERNS
from util.metrics import format_metrics_table, threshold_metrics
from util.misc import AMP_CHOICES, resolve_amp, resolve_device
from util.report import REPORT_NAME, ScoredImage, Skipped, console_lines, count_line, render_report, skipped_csv, \
    threshold_text, verdict_word
from util.visualize import HeatPanel, denormalize, save_overlay, save_roc, save_summary

EVAL_SIZES = ("input", "full")
# Overlays share one colour scale: this percentile of all map values (of the whole run). The maximum
# would let one very bright image wash out every other heatmap.
VMAX_PERCENTILE = 99.9
_VMAX_SAMPLE = 4_000_000  # map values the percentile is estimated from (a regular sub-grid)
SUMMARY_PER_GROUP = 8
# What this script writes into --output_dir: all that --overwrite deletes there (with --save_tiff's
# folders when they are inside it).
OUTPUTS = ("anomaly_maps", "overlays", "masks", "scores.csv", "skipped.csv", "metrics.json", "roc.png",
           "summary.png", "args.json", REPORT_NAME)


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        "main_infer.py",
        description="Score images with a trained MAE-AD checkpoint: anomaly maps (.npy), overlays, "
                    "scores.csv, skipped.csv, report.html, and metrics.json / roc.png / summary.png for a "
                    "labelled test split. docs/REPORT.md explains the outputs and the verdict.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="checkpoint written by main_train.py (checkpoint-<epoch>.pth, checkpoint-last.pth) "
                             "or an adapter file {'adapter', 'args'}; its options rebuild the model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_path", metavar="ROOT",
                        help="category root (raw or prepared MVTec layout): scores ROOT/<split>/<good|defect>/ "
                             "and computes metrics; masks from ROOT/ground_truth/ when present")
    source.add_argument("--images", metavar="PATH",
                        help="a folder (searched recursively) or one image file, without labels: maps, "
                             "overlays and scores.csv, no metrics")
    parser.add_argument("--output_dir", required=True, metavar="OUT",
                        help="folder for the outputs (created); one that is not empty needs --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output_dir: first delete this script's earlier outputs "
                             "there (anomaly_maps/, overlays/, masks/, scores.csv, skipped.csv, metrics.json, "
                             "roc.png, summary.png, args.json, report.html; the --save_tiff folders); other files "
                             "are kept")
    parser.add_argument("--split", default="test",
                        help="sub-folder of --data_path to score (default: test)")
    g = parser.add_argument_group(
        "scoring (default: the recipe stored in the checkpoint, chosen for its category from held-out normal "
        "images; docs/QUALITY.md); a flag given here overrides that one setting")
    d = ScoringOptions()
    g.add_argument("--num_masks", type=int,
                   help="number of deterministic views; each hides 1/num_masks of the patches and "
                        f"together they hide every patch once (global default: {d.num_masks})")
    g.add_argument("--mask_pattern", choices=MASK_PATTERNS,
                   help="how the views split the patch grid: grid (needs a square num_masks; every hidden patch "
                        "keeps its 8 neighbours visible), stripes (columns, the original project's choice), "
                        f"checkerboard (num_masks 2) (global default: {d.mask_pattern})")
    g.add_argument("--sigma", type=float,
                   help=f"std of the Gaussian that smooths the pixel-level map, in pixels; 0 = none (global default: "
                        f"{d.sigma:g})")
    g.add_argument("--image_sigma", type=float,
                   help=f"std of the Gaussian that smooths the image-level map (global default: {d.image_sigma:g})")
    g.add_argument("--pixel_map", choices=MAP_CHOICES, metavar="RECIPE",
                   help="the anomaly map (localisation, anomaly_maps/*.npy, pixel metrics): ERROR[-NORM], ERROR "
                        "mse | msgms | fusion (both, each scaled by its held-out quantile), NORM raw (omitted) | z "
                        "| absz (per-pixel standardised against held-out normal maps, |z|: both directions); "
                        f"choices: {', '.join(MAP_CHOICES)} (global default: {d.pixel_map})")
    g.add_argument("--image_map", choices=MAP_CHOICES, metavar="RECIPE",
                   help=f"the map the image score is taken from, same recipes (global default: {d.image_map})")
    g.add_argument("--score", choices=SCORE_METHODS,
                   help="image score: max of the image map, or topk = mean of its top --topk_fraction pixels "
                        f"(global default: {d.score})")
    g.add_argument("--topk_fraction", type=float,
                   help=f"fraction of pixels averaged by --score topk, in (0, 1] (global default: {d.topk_fraction:g})")
    g.add_argument("--image_quantile", type=float,
                   help="image threshold = this quantile of the held-out normal images' scores (leave-one-out); "
                        f"pred_label is 1 at or above it (default: {d.image_quantile:g})")
    g.add_argument("--pixel_quantile", type=float,
                   help="pixel threshold (--save_masks) = this quantile of the held-out normal pixel-map values "
                        f"(default: {d.pixel_quantile:g})")
    g.add_argument("--head", choices=HEAD_MODES, default="auto",
                   help="the discriminative head of a checkpoint-head.pth (main_train_head.py): auto = at the levels "
                        "its held-out evidence chose for this category, on = its maps at both levels, off = "
                        "reconstruction scoring only (default: auto; checkpoints without a head score as before)")
    g.add_argument("--holdout_root", metavar="ROOT",
                   help="category root holding the checkpoint's held-out images (train/good/<name>), used when the "
                        "checkpoint's stored calibration does not fit the scoring options (default: the checkpoint's "
                        "main_train.py --holdout_root when it had one, else --data_path, else the training "
                        "--data_path stored in the checkpoint)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="images per forward pass; each becomes num_masks sequences (default: 8)")
    parser.add_argument("--device", default="auto",
                        help="auto (first CUDA GPU, else CPU), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                        help="mixed precision: auto = bf16 where it is fast (recent GPUs, AVX-512-BF16/AMX "
                             "CPUs), else fp32; fp16 needs a GPU; none = fp32 (default: auto)")
    parser.add_argument("--num_workers", type=int, default=2,
                        help="DataLoader worker processes (images are decoded once, up front) (default: 2)")
    parser.add_argument("--save_masks", action="store_true",
                        help="also write masks/<path>.png: the pixels at or above the pixel threshold (255), "
                             "needs a calibrated checkpoint")
    parser.add_argument("--no_overlays", action="store_true",
                        help="skip overlays/*.png (the slowest output; also saves the memory that holds "
                             "reconstructions until the colour scale is known)")
    parser.add_argument("--eval_size", default="input", choices=EVAL_SIZES,
                        help="resolution of the pixel metrics: input = maps and masks at the model's input "
                             "size; full = maps upsampled (bilinear) to each mask's own resolution, masks "
                             "at native size (slower, more memory) (default: input)")
    parser.add_argument("--save_tiff", nargs="?", const="", default=None, metavar="DIR",
                        help="also write each map as a float32 TIFF at its image's original size, as "
                             "DIR/<category>/<split>/<defect>/<image id>.tiff, the layout of MVTec AD's "
                             "evaluate_experiment.py (category: the --data_path folder's name; defect and id "
                             "as in the raw layout, also for prepared data); DIR defaults to --output_dir; "
                             "needs --data_path")
    parser.add_argument("--pretrained", metavar="PATH",
                        help="base weights for an adapter-file checkpoint (default: the 'pretrained' "
                             "option stored in the adapter file)")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    return parser


# ---- model ------------------------------------------------------------------------------------
def _matching_variant(state: dict[str, torch.Tensor], img_size: int) -> Optional[str]:
    """The registered model whose (non-LoRA) tensor shapes match `state`, built on the meta device."""
    for name, factory in MODELS.items():
        with torch.device("meta"):
            own = factory(img_size=img_size).state_dict()
        keys = [k for k in state if not is_lora_name(k)]
        if keys and all(k in own and own[k].shape == state[k].shape for k in keys):
            return name
    return None


def _load_full_checkpoint(model: MaskedAutoencoderViT, state: dict[str, torch.Tensor], path: str,
                          name: str, img_size: int) -> None:
    """load_state_dict(strict=True), with a one-line explanation when the tensors do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state, strict=True)
        return
    base_ok = not any(not is_lora_name(k) for k in missing + unexpected + mismatched)
    if base_ok:  # only the LoRA tensors differ: same variant, another adapter configuration
        raise UserError(f"{path}: its LoRA tensors do not fit the LoRA options stored with it "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} of "
                        f"another shape); the checkpoint is inconsistent")
    variant = _matching_variant(state, img_size)
    found = variant or f"weights with {_describe(state)}"
    raise UserError(f"{path} holds {found}, but its options say {name} ({_describe(own)}) at "
                    f"{img_size} px: another model variant; the file is inconsistent or was edited")


def _load_adapter_checkpoint(model: MaskedAutoencoderViT, checkpoint: dict[str, Any], path: str,
                             train_args: dict[str, Any], pretrained: Optional[str]) -> None:
    """Base weights from --pretrained (or the adapter's own options), then the adapter tensors."""
    adapter = checkpoint["adapter"]
    if not isinstance(adapter, dict) or not all(isinstance(v, torch.Tensor) for v in adapter.values()):
        raise UserError(f"{path}: its 'adapter' entry is not a dict of tensors")
    base = pretrained or train_args.get("pretrained")
    if not base:
        raise UserError(f"{path} is an adapter file and names no base weights; pass --pretrained PATH "
                        f"(the weights it was trained on)")
    if not Path(base).is_file():
        origin = "--pretrained" if pretrained else "the adapter's training options"
        raise UserError(f"{path} is an adapter file; its base weights {base} (from {origin}) do not "
                        f"exist; pass --pretrained PATH")
    report = load_pretrained(model, base, patch_embed_init=train_args.get("patch_embed_init", "random"),
                             verbose=False)
    try:
        import_adapter(model, adapter)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from e
    untrained = [k for k in report.missing if k not in adapter]
    if untrained:
        warn(f"{len(untrained)} tensors are in neither {base} nor the adapter and keep their random "
             f"initialisation (e.g. {untrained[0]})")


def build_model(checkpoint_path: str, pretrained: Optional[str] = None, checkpoint: Optional[dict[str, Any]] = None
                ) -> tuple[MaskedAutoencoderViT, dict[str, Any], Optional[dict[str, Any]]]:
    """Rebuild the trained model from a checkpoint (the file, or its contents `checkpoint` when already
    read): LoRA merged, eval mode, no gradients.

    Returns (model on the CPU, the checkpoint's training options, its `calibration` entry or None).
    """
    path = str(checkpoint_path)
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    train_args = checkpoint.get("args")
    if not isinstance(train_args, dict):
        if "adapter" in checkpoint or "model" in checkpoint or all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise UserError(f"{path} holds model weights but no training options ('args'): that's pretrained "
                            f"weights (e.g. an official MAE file), not a trained MAE-AD checkpoint; give it to "
                            f"main_train.py --pretrained and score the checkpoint-*.pth that writes")
        raise UserError(f"{path} is not an MAE-AD checkpoint: expected keys 'model' and 'args' "
                        f"(main_train.py) or 'adapter' and 'args', found {sorted(map(str, checkpoint))[:6]}")
    kwargs = model_kwargs_from_args(train_args)
    try:
        model = create_model(**kwargs)
    except ValueError as e:
        raise UserError(f"{path}: cannot rebuild its model: {e}") from e
    if "adapter" in checkpoint:
        _load_adapter_checkpoint(model, checkpoint, path, train_args, pretrained)
    else:
        _load_full_checkpoint(model, state_dict_of(checkpoint, path), path, kwargs["name"], kwargs["img_size"])
    merge_lora(model)  # fold the adapters into the base weights once: plain linears from here on
    model.eval()
    model.requires_grad_(False)
    calibration = checkpoint.get("calibration")
    return model, train_args, calibration if isinstance(calibration, dict) else None


def holdout_root_for(train_args: dict[str, Any], holdout_root: Optional[str], data_path: Optional[str]
                     ) -> Optional[str]:
    """The category root whose train/good holds a checkpoint's held-out images: --holdout_root; else the
    root it was calibrated on by main_train.py --holdout_root (then never --data_path, whose train/good
    holds training images, maybe of the same names); else --data_path, else the training --data_path."""
    return holdout_root or train_args.get("holdout_root") or data_path or train_args.get("data_path")


def holdout_maps_for(model: MaskedAutoencoderViT, train_args: dict[str, Any], calibration: Optional[dict[str, Any]],
                     options: ScoringOptions, holdout_root: Optional[str], device: torch.device,
                     amp_dtype: Optional[torch.dtype], data_path: Optional[str] = None
                     ) -> tuple[Optional[dict[str, torch.Tensor]], str]:
    """The held-out normal maps for `options` and a line saying where they came from: the checkpoint's
    stored calibration when it fits, else recomputed from the held-out images (in
    holdout_root_for(train_args, holdout_root, data_path)), else None."""
    if calibration is not None and calibration_matches(calibration, options, model.img_size):
        n = len(calibration["holdout_files"])
        return calibration["maps"], f"calibration: stored in the checkpoint ({n} held-out normal images)"
    names = list(train_args.get("holdout_files") or [])
    if not names:
        return None, "the checkpoint has no held-out images (trained before --holdout existed, or with --holdout 0)"
    root = holdout_root_for(train_args, holdout_root, data_path)
    try:
        maps = holdout_error_maps(model, root, names, options, device, amp_dtype)
    except UserError as e:
        return None, f"its {len(names)} held-out images cannot be read ({e}); pass --holdout_root ROOT"
    why = "the stored maps were made with other --num_masks/--mask_pattern" if calibration else \
        "the checkpoint stores none"
    return maps, f"calibration: recomputed on the {len(names)} held-out images in {Path(root) / 'train' / 'good'} ({why})"


def load_scoring(checkpoint_path: str, pretrained: Optional[str] = None, holdout_root: Optional[str] = None,
                 device: torch.device = torch.device("cpu"), amp_dtype: Optional[torch.dtype] = None,
                 data_path: Optional[str] = None, head: str = "auto", **scoring_options: Any
                 ) -> tuple[AnomalyScorer | HeadScorer, Optional[Threshold], dict[str, Any], dict[str, Any]]:
    """The checkpoint's model inside a scorer for the scoring options (ScoringOptions' names; None or
    absent = the checkpoint's own: scoring.checkpoint_defaults), calibrated on its held-out normal
    images (read, when they must be, from holdout_root_for(..., holdout_root, data_path)), and the
    decision Threshold.

    Returns (scorer in eval mode on `device`, Threshold or None, the checkpoint's training options, the
    scoring record: the options used, where they came from, the stored choice and its evidence).
    Checkpoints without held-out images score uncalibrated (raw mse maps, no threshold) unless a
    calibrated recipe was asked for explicitly, which is a UserError. Prints where calibration and
    the recipe came from.
    """
    checkpoint = read_checkpoint(str(checkpoint_path))
    model, train_args, calibration = build_model(checkpoint_path, pretrained, checkpoint)
    model.to(device)
    defaults, recipe_source = checkpoint_defaults(calibration, train_args)
    options = options_from(scoring_options, defaults)
    entry = checkpoint.get("head")
    head_record = resolve_head(entry, head, checkpoint_path, model.img_size)
    if head_record["pixel"] or head_record["image"]:
        options = head_views(options, entry, scoring_options, head)
    overridden = sorted(k for k, v in scoring_options.items() if v is not None and v != getattr(defaults, k))
    maps, source = holdout_maps_for(model, train_args, calibration, options, holdout_root, device, amp_dtype,
                                    data_path)
    if maps is None and options.needs_calibration:
        explicit = [f"--{k} {scoring_options[k]}" for k in ("pixel_map", "image_map") if scoring_options.get(k)]
        if explicit:
            raise UserError(f"{' '.join(explicit)} needs calibration on held-out normal images, but {source}; "
                            f"score uncalibrated with --pixel_map mse --image_map mse, or retrain with --holdout")
        options = replace(options, pixel_map="mse", image_map="mse", image_sigma=options.sigma)
        source = (f"note: {source}: scoring uncalibrated as before (raw mse map smoothed by --sigma, image score = "
                  f"its {options.score}), no threshold")
    print(source, flush=True)
    try:
        scorer, threshold = build_calibrated_scorer(model, options, maps)
    except ValueError as e:
        flags = " ".join(f"--{k} {v}" for k, v in options.to_dict().items() if k not in ("image_quantile", "pixel_quantile"))
        raise UserError(f"{flags} do not fit this model ({model.img_size} px, "
                        f"{model.grid_size}x{model.grid_size} patch grid): {e}") from e
    if head_record["pixel"] or head_record["image"]:
        scorer, threshold = with_head(scorer, entry, head_record, options, maps)
    if threshold is not None:
        threshold.source = "holdout"
    choice = (calibration or {}).get("choice")
    image_text = "the head's" if head_record["image"] else \
        f"{options.image_map} ({options.score}, sigma {options.image_sigma:g})"
    pixel_text = "the head's" if head_record["pixel"] else f"{options.pixel_map} (sigma {options.sigma:g})"
    print(f"scoring: image map {image_text}, pixel map {pixel_text}, {options.num_masks} {options.mask_pattern} "
          f"masks: {recipe_source}" + (f"; overridden by flags: {', '.join(overridden)}" if overridden else "")
          + (f"; {head_record['source']}" if head_record["source"] else ""), flush=True)
    record = {"options": options.to_dict(), "source": recipe_source, "overridden_by_flags": overridden,
              "choice": choice, "head": head_record}
    return scorer.to(device).eval(), threshold, train_args, record


def resolve_head(entry: Optional[dict[str, Any]], mode: str, path: str, input_size: int) -> dict[str, Any]:
    """Where the checkpoint's head scores under --head `mode` (scoring.head_levels): {"pixel", "image":
    whether the head gives that level, "source": why}; UserError for a head that cannot serve."""
    try:
        head_pixel, head_image, source = head_levels(entry, mode)
        if head_pixel or head_image:
            head_from_entry(entry)  # its version and weights, checked before anything slow
    except ValueError as e:
        raise UserError(f"--head {mode}: {path}: {e}" + ("; retrain the head with main_train_head.py"
                                                         if entry is not None else "")) from e
    if (head_pixel or head_image) and int(entry["input_size"]) != input_size:
        raise UserError(f"--head {mode}: the head of {path} was trained for {entry['input_size']} px inputs, the "
                        f"model takes {input_size} px; retrain the head with main_train_head.py")
    return {"pixel": head_pixel, "image": head_image, "source": source}


def head_views(options: ScoringOptions, entry: dict[str, Any], flags: dict[str, Any], mode: str) -> ScoringOptions:
    """`options` with the views the head was trained on; UserError when flags ask for other views."""
    views = {k: entry[k] for k in ("num_masks", "mask_pattern")}
    asked = {k: flags[k] for k in views if flags.get(k) is not None and flags[k] != views[k]}
    if asked:
        raise UserError(f"--head {mode}: the head reads maps of {views['num_masks']} {views['mask_pattern']} "
                        f"masks, not {' '.join(f'--{k} {v}' for k, v in asked.items())}; drop those flags or pass "
                        f"--head off")
    return replace(options, **views)


def with_head(scorer: AnomalyScorer, entry: dict[str, Any], record: dict[str, Any], options: ScoringOptions,
              maps: Optional[dict[str, torch.Tensor]]) -> tuple[HeadScorer, Optional[Threshold]]:
    """The reconstruction scorer with the checkpoint's head at the levels of `record` (resolve_head) and
    the threshold refitted on the head's held-out maps for those levels (None without held-out maps)."""
    scorer = HeadScorer(scorer, head_from_entry(entry), int(entry["image_kernel"]), record["pixel"], record["image"])
    if maps is None:
        return scorer, None
    held_out = {level: entry["holdout_maps"][level] for level in ("pixel", "image") if record[level]}
    return scorer, fit_scoring(maps, options, held_out)[1]


# ---- data -------------------------------------------------------------------------------------
def unread_files(base: Path, items: list[TestItem], out: Path) -> list[Skipped]:
    """The files under `base` that are no item, with the reason: listed as not scored rather than
    passed over in silence. Files inside --output_dir are this script's outputs, not inputs."""
    taken = {Path(it.path).resolve() for it in items}
    skipped = []
    for path in visible_files(base):
        resolved = path.resolve()
        if resolved in taken or out in resolved.parents:
            continue
        reason = "an image outside the layout read here (<split>/<good|defect>/<name>)" if is_image_file(path) \
            else not_image_reason(path)
        skipped.append(Skipped(path.relative_to(base).as_posix(), reason))
    return skipped


def build_items(data_path: Optional[str], images: Optional[str], split: str, output_dir: str
                ) -> tuple[list[TestItem], list[Skipped]]:
    """The images to score and the files found but not to be scored (with the reason)."""
    items = find_test_items(data_path, split) if data_path is not None else unlabelled_items(images)
    out = Path(output_dir).resolve()
    # `--images DIR --output_dir DIR/out` must not score its own overlays on a rerun.
    inside = [out in Path(it.path).resolve().parents for it in items]
    if any(inside):
        warn(f"ignoring {sum(inside)} image(s) inside --output_dir {output_dir} (this script's outputs)")
        items = [it for it, skip in zip(items, inside) if not skip]
        if not items:
            raise UserError(f"every image found is inside --output_dir {output_dir}; nothing to score")
    if data_path is not None:
        skipped = [Skipped(f"{split}/{s.path}", s.reason) for s in unread_files(Path(data_path) / split, items, out)]
    else:
        skipped = [Skipped(rel, not_image_reason(p)) for p, rel in other_files(images)
                   if out not in p.resolve().parents]
    stems = Counter(output_stem(it.rel_path) for it in items)
    clash = [s for s, n in stems.items() if n > 1]
    if clash:
        names = [it.rel_path for it in items if output_stem(it.rel_path) == clash[0]]
        raise UserError(f"{' and '.join(names)} would share the output name {clash[0]}.npy; rename one "
                        f"({len(clash)} such clash(es))")
    return items, skipped


def build_loader(dataset: TestDataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {num_workers}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=False)


# ---- writing ----------------------------------------------------------------------------------
def save_map(path: Path, anomaly_map: np.ndarray) -> None:
    write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(anomaly_map, dtype=np.float32)))


def save_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def scores_csv(collector: ScoreCollector, threshold: Optional[Threshold]) -> str:
    """path,label,defect,score,score_normalized,pred_label; the last two empty without a threshold."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "defect", "score", "score_normalized", "pred_label"])
    normalized = normalized_scores(collector.scores, threshold) if threshold else [""] * collector.count
    predicted = predicted_labels(collector.scores, threshold) if threshold else [""] * collector.count
    for rel_path, label, defect, score, norm, pred in zip(collector.rel_paths, collector.labels, collector.defects,
                                                          collector.scores, normalized, predicted):
        writer.writerow([rel_path, "" if label < 0 else int(label), defect, repr(float(score)),
                         "" if norm == "" else f"{float(norm):.6f}", "" if pred == "" else int(pred)])
    return buf.getvalue()


def scored_images(collector: ScoreCollector, threshold: Optional[Threshold], overlays: bool) -> list[ScoredImage]:
    """The report's and the console's view of each scored image."""
    normalized = normalized_scores(collector.scores, threshold) if threshold else [None] * collector.count
    predicted = predicted_labels(collector.scores, threshold) if threshold else [None] * collector.count
    return [ScoredImage(rel, float(score), None if norm is None else float(norm), None if pred is None else int(pred),
                        None if label < 0 else int(label), defect,
                        f"overlays/{output_stem(rel)}.png" if overlays else None)
            for rel, score, norm, pred, label, defect in zip(collector.rel_paths, collector.scores, normalized,
                                                             predicted, collector.labels, collector.defects)]


def save_masks(out: Path, collector: ScoreCollector, pixel_threshold: float) -> None:
    """masks/<stem>.png: 255 where the pixel map is at or above the pixel threshold, else 0."""
    for rel_path, anomaly_map in zip(collector.rel_paths, collector.maps):
        mask = Image.fromarray(np.where(anomaly_map >= pixel_threshold, 255, 0).astype(np.uint8))
        write_atomic(out / "masks" / f"{output_stem(rel_path)}.png", lambda f, m=mask: m.save(f, format="PNG"))


# ---- the pass ---------------------------------------------------------------------------------
def same_maps(scorer: AnomalyScorer | HeadScorer) -> bool:
    """Whether the image-level map (the verdict's) is the pixel-level map: same recipe, same smoothing."""
    pixel_name, image_name = scorer.map_names()
    return pixel_name == image_name


def score_dataset(scorer: AnomalyScorer, loader: DataLoader, device: torch.device,
                  amp_dtype: Optional[torch.dtype], out: Path, keep_reconstructions: bool, keep_image_maps: bool
                  ) -> tuple[ScoreCollector, Optional[np.ndarray], Optional[np.ndarray]]:
    """One pass over the data: writes each map as soon as its batch is back, keeps scores and maps
    (float32) and, for the pictures, reconstructions as uint8 [N, S, S, 3] and the image-level maps
    [N, S, S] (float32) when asked."""
    n = len(loader.dataset)
    collector = ScoreCollector(n)
    recon_u8 = image_maps = None
    with tqdm(total=n, unit="img", desc="scoring", dynamic_ncols=True) as bar:
        for result in run_inference(scorer, loader, device, amp_dtype, with_reconstructions=keep_reconstructions,
                                    with_image_maps=keep_image_maps):
            lo = collector.count
            collector.add(result)
            for j, rel_path in enumerate(result.meta["rel_path"]):
                save_map(out / "anomaly_maps" / f"{output_stem(rel_path)}.npy", result.anomaly_maps[j].numpy())
            s = result.anomaly_maps.shape[-1]
            if keep_image_maps:
                if image_maps is None:
                    image_maps = np.empty((n, s, s), dtype=np.float32)
                image_maps[lo:collector.count] = result.image_maps.numpy()
            if keep_reconstructions:
                if recon_u8 is None:
                    recon_u8 = np.empty((n, s, s, 3), dtype=np.uint8)
                for j in range(result.scores.shape[0]):
                    recon_u8[lo + j] = denormalize(result.reconstructions[j])
            bar.update(result.scores.shape[0])
    return collector, recon_u8, image_maps


def colour_scale(maps: np.ndarray) -> Optional[float]:
    """The run's heatmap top: VMAX_PERCENTILE of all map values (on a regular sub-grid when large)."""
    if maps.size == 0:
        return None
    step = max(1, int(np.ceil(np.sqrt(maps.size / _VMAX_SAMPLE))))
    vmax = float(np.percentile(maps[:, ::step, ::step], VMAX_PERCENTILE))
    return vmax if vmax > 0 else None


@dataclass
class Heat:
    """How the pictures draw one map of a run: its name, its colour scale, its threshold."""

    maps: np.ndarray  # [N, S, S]
    name: str
    vmax: Optional[float]  # one scale for the whole run
    threshold: Optional[float]


def heat_scales(scorer: AnomalyScorer, collector: ScoreCollector, image_maps: Optional[np.ndarray],
                threshold: Optional[Threshold]) -> tuple[Heat, Optional[Heat]]:
    """The verdict's map (the image-level map) and, when it is another map, the pixel-level map.

    Calibrated: each on 0 .. 2x its threshold (the threshold mid-scale, as score_normalized puts it at
    0.5), the same for every image; otherwise one scale for the whole run from all its maps."""
    def top(maps: np.ndarray, t: Optional[float]) -> Optional[float]:
        return 2 * t if t is not None and t > 0 else colour_scale(maps)

    pixel_name, image_name = scorer.map_names()
    if image_maps is None:  # the same map: one panel, judged by the image threshold
        return Heat(collector.maps, f"map {image_name} (verdict)", top(collector.maps, threshold and threshold.image),
                    threshold and threshold.image), None
    image = Heat(image_maps, f"image map {image_name} (verdict)",
                 top(image_maps, threshold and threshold.image), threshold and threshold.image)
    pixel = Heat(collector.maps, f"pixel map {pixel_name} (localisation)",
                 top(collector.maps, threshold and threshold.pixel), threshold and threshold.pixel)
    return image, pixel


def write_overlays(out: Path, dataset: TestDataset, collector: ScoreCollector, recon_u8: np.ndarray,
                   images: list[ScoredImage], image: Heat, pixel: Optional[Heat]) -> None:
    with tqdm(total=collector.count, unit="img", desc="overlays", dynamic_ncols=True) as bar:
        for k, index in enumerate(collector.indices):
            item = dataset[int(index)]
            gt = item["mask"] if item["label"] == 1 and item["has_mask"] else None
            second = HeatPanel(pixel.maps[k], pixel.name, pixel.vmax, pixel.threshold) if pixel else None
            save_overlay(out / images[k].overlay, item["image"], recon_u8[k], image.maps[k], images[k].score,
                         gt_mask=gt, vmax=image.vmax, title=item["rel_path"],
                         verdict=verdict_word(images[k].pred_label) if images[k].pred_label is not None else None,
                         normalized=images[k].score_normalized, map_name=image.name, threshold=image.threshold,
                         pixel_panel=second)
            bar.update(1)


def write_summary(path: Path, dataset: TestDataset, collector: ScoreCollector, image: Heat) -> None:
    """The likely failures: highest-scoring good and lowest-scoring anomalous images, on the verdict's map."""
    order = np.argsort(collector.scores, kind="stable")
    good = [k for k in order[::-1] if collector.labels[k] == 0][:SUMMARY_PER_GROUP]
    bad = [k for k in order if collector.labels[k] == 1][:SUMMARY_PER_GROUP]
    items = [{"image": denormalize(dataset[int(collector.indices[k])]["image"]), "anomaly_map": image.maps[k],
              "score": float(collector.scores[k]), "label": int(collector.labels[k]),
              "rel_path": collector.rel_paths[k]} for k in good + bad]
    save_summary(path, items, max_per_group=SUMMARY_PER_GROUP, vmax=image.vmax, threshold=image.threshold,
                 map_name=image.name.split(" (")[0])


def upsample_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map [S, S] resized (bilinear) to [height, width], float32."""
    small = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]  # [1, 1, S, S]
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def tiff_paths(items: list[TestItem], category_dir: Path) -> list[Path]:
    """Where --save_tiff writes each item's map: CATEGORY_DIR/<split>/<defect>/<image id>.tiff."""
    paths = [category_dir / f"{raw_layout_stem(it.rel_path)}.tiff" for it in items]
    seen: dict[Path, str] = {}
    for path, item in zip(paths, items):
        if path in seen:
            raise UserError(f"--save_tiff: {seen[path]} and {item.rel_path} would both be written to {path}; "
                            f"rename one")
        seen[path] = item.rel_path
    return paths


def save_tiff(path: Path, anomaly_map: np.ndarray) -> None:
    """A float32 single-channel TIFF (Pillow mode 'F': 32-bit IEEE samples, read back exactly)."""
    image = Image.fromarray(np.ascontiguousarray(anomaly_map, dtype=np.float32))
    write_atomic(path, lambda f: image.save(f, format="TIFF"))


def write_tiffs(dataset: TestDataset, collector: ScoreCollector, paths: list[Path]) -> None:
    """Each collected map, upsampled to its image's original size, as a float32 TIFF."""
    with tqdm(total=collector.count, unit="img", desc="tiff maps", dynamic_ncols=True) as bar:
        for k, index in enumerate(collector.indices):
            with Image.open(dataset.items[int(index)].path) as im:
                width, height = im.size
            save_tiff(paths[int(index)], upsample_map(collector.maps[k], height, width))
            bar.update(1)


def full_resolution_arrays(dataset: TestDataset, collector: ScoreCollector) -> tuple[np.ndarray, np.ndarray]:
    """Maps upsampled (bilinear) to each mask's native resolution, and the native masks.

    Every evaluated image must share one resolution (metrics take [N, H, W]); images without a mask
    file are good (all-zero mask at the image's own size) or excluded from pixel metrics. Filled one
    image at a time into preallocated float32 / bool arrays, so the peak is the two arrays.
    """
    sizes: list[Optional[tuple[int, int]]] = []  # (H, W) per collected image; None = excluded
    for k, index in enumerate(collector.indices):
        item = dataset.items[int(index)]
        if collector.labels[k] == 1 and collector.has_mask[k]:
            with Image.open(item.mask_path) as m:
                sizes.append((m.height, m.width))
        elif collector.labels[k] == 0:
            with Image.open(item.path) as im:
                sizes.append((im.height, im.width))
        else:
            sizes.append(None)
    found = Counter(s for s in sizes if s is not None)
    if len(found) > 1:
        shown = ", ".join(f"{w}x{h} ({n} images)" for (h, w), n in found.most_common(3))
        raise UserError(f"--eval_size full needs one resolution for all evaluated images and masks; found "
                        f"{shown}: use --eval_size input")
    h, w = next(iter(found)) if found else collector.maps.shape[1:]
    maps = np.zeros((collector.count, h, w), dtype=np.float32)
    masks = np.zeros((collector.count, h, w), dtype=bool)
    for k, index in enumerate(collector.indices):
        if sizes[k] is None:
            continue
        maps[k] = upsample_map(collector.maps[k], h, w)
        if collector.labels[k] == 1:
            masks[k] = load_mask(dataset.items[int(index)].mask_path)
    return maps, masks


def report_pixel_notes(metrics: dict[str, Any], data_path: str) -> list[str]:
    n_bad, n_without = metrics.get("n_anomalous", 0), metrics.get("n_images_without_mask", 0)
    if n_bad and n_without == n_bad:
        return [f"note: no ground-truth masks under {Path(data_path) / 'ground_truth'}: pixel metrics "
                f"(pixel AUROC, AUPRO, pixel F1) skipped; image metrics only"]
    if n_without:
        return [f"note: {n_without} of {n_bad} anomalous images have no mask and are left out of the pixel metrics"]
    return []


# ---- main -------------------------------------------------------------------------------------
def amp_name(amp_dtype: Optional[torch.dtype]) -> str:
    return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


def resolved_options(args: argparse.Namespace, device: torch.device, amp_dtype: Optional[torch.dtype],
                     train_args: dict[str, Any], n_images: int) -> dict[str, Any]:
    options = dict(vars(args))
    options.update(device=str(device), amp=amp_name(amp_dtype), device_requested=args.device, amp_requested=args.amp,
                   model=train_args.get("model"), input_size=train_args.get("input_size"),
                   n_images=n_images, checkpoint_args=train_args)
    return options


# metrics.json's explanations of the keys a reader could take for something else.
METRIC_NOTES = {
    "threshold": "the decision threshold: learnt from held-out normal images only (threshold.image on the image "
                 "score, threshold.pixel on the pixel map); pred_label and the image_precision/recall/f1 keys use "
                 "it. Deploy this one.",
    "image_f1_threshold": "the image-score threshold with the best F1 on THESE test labels (image_f1_max): an "
                          "oracle that has seen the answers, for comparison with published numbers only; never "
                          "deploy it.",
    "per_defect": "image AUROC of each defect type against all good images (also per_defect_image_auroc).",
    "threshold_check": "the learnt image threshold on the good test images: false_alarm_rate (share with score >= "
                       "threshold.image) against promised_rate (1 - image_quantile); warning set when the rate is "
                       "above warn_above: more than 3x the promise and a count chance reaches at most 1 run in "
                       "100 (binomial tail over n_normal). A warning: calibrate on separate normal images "
                       "(main_train.py --holdout_root).",
    "warnings": "every warning of this run, as the console and report.html show them.",
}


def write_metrics(out: Path, dataset: TestDataset, collector: ScoreCollector, data_path: str, eval_size: str,
                  image: Heat, threshold: Optional[Threshold], scoring: dict[str, Any],
                  seconds_per_image: float, threshold_check: Optional[ThresholdCheck] = None,
                  warnings: Sequence[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """metrics.json, roc.png and summary.png of a labelled run; returns the metrics and the console lines
    (the warnings are printed by the caller)."""
    if eval_size == "full":
        maps_full, masks_full = full_resolution_arrays(dataset, collector)
        metrics = collector.metrics(maps_full, masks_full)
        del maps_full, masks_full
    else:
        metrics = collector.metrics()
    metrics["per_defect_image_auroc"] = metrics["per_defect"]
    metrics["eval_size"] = eval_size
    metrics["scoring"] = scoring
    metrics["score_seconds_per_image"] = seconds_per_image  # the scoring pass (model, maps written)
    if threshold is not None:
        at = threshold_metrics(collector.scores, collector.labels, threshold.image)
        metrics.update({f"image_{k}": v for k, v in at.items()})
        metrics["threshold"] = threshold.to_dict()
    metrics["threshold_check"] = threshold_check.to_dict() if threshold_check is not None else None
    metrics["warnings"] = list(warnings)
    metrics["notes"] = {k: v for k, v in METRIC_NOTES.items() if k in metrics}
    save_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    lines = ["", format_metrics_table(metrics)] + report_pixel_notes(metrics, data_path)
    if threshold is not None:
        lines.append(f"at the learnt threshold {threshold.image:.4g} (quantile {threshold.image_quantile:g} of "
                     f"{threshold.n_images} held-out normal images): precision {metrics['image_precision']:.3f}, "
                     f"recall {metrics['image_recall']:.3f}, F1 {metrics['image_f1']:.3f}")
    if threshold_check is not None:
        lines.append(threshold_check.describe())
    if metrics["image_auroc"] is not None:
        save_roc(out / "roc.png", collector.scores, collector.labels, metrics["image_auroc"])
    else:
        lines.append("note: the split has only one class: no ROC curve (roc.png not written)")
    write_summary(out / "summary.png", dataset, collector, image)
    return metrics, lines


def output_lines(out: Path, labelled: bool, overlays: bool, image: Heat, masks: bool,
                 tiff_dir: Optional[Path]) -> list[str]:
    lines = ["", f"report:       {out / REPORT_NAME}", f"anomaly maps: {out / 'anomaly_maps'}",
             f"scores:       {out / 'scores.csv'}", f"not scored:   {out / 'skipped.csv'}"]
    if masks:
        lines.append(f"masks:        {out / 'masks'}")
    if tiff_dir is not None:
        lines.append(f"tiff maps:    {tiff_dir}")
    if labelled:
        lines += [f"metrics:      {out / 'metrics.json'}", f"summary:      {out / 'summary.png'}"]
    if overlays:
        lines.append(f"overlays:     {out / 'overlays'}" +
                     (f" (colour scale 0 - {image.vmax:.3g} for every image)" if image.vmax else ""))
    return lines


def output_names(out: Path, tiff_files: Optional[list[Path]]) -> list[str]:
    """What --overwrite may delete in OUT: OUTPUTS and the top folders of --save_tiff's files inside OUT."""
    names = list(OUTPUTS)
    root = out.resolve()
    for path in tiff_files or []:
        resolved = path.resolve()
        if root in resolved.parents:
            top = resolved.relative_to(root).parts[0]
            if top not in names:
                names.append(top)
    return names


def tiff_category_dir(save_tiff: Optional[str], data_path: Optional[str], output_dir: str) -> Optional[Path]:
    """--save_tiff's DIR/<category> (None without --save_tiff)."""
    if save_tiff is None:
        return None
    if data_path is None:
        raise UserError("--save_tiff needs --data_path: the MVTec evaluation layout is per category "
                        "(<category>/test/<defect>/<id>.tiff)")
    return Path(save_tiff or output_dir) / Path(data_path).absolute().name


def scoring_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's scoring options by ScoringOptions' names (None = not given)."""
    return {k: getattr(args, k) for k in ScoringOptions().to_dict()}


def run_warnings(choice: Optional[dict[str, Any]], check: Optional[ThresholdCheck]) -> list[str]:
    """The run's warnings, in the words the console, metrics.json and report.html all show: the stored
    recipe choice's own (when the held-out evidence could not tell the candidates apart), then the
    threshold check's."""
    found = [(choice or {}).get("warning"), check.warning if check is not None else None]
    return [text for text in found if text]


def threshold_line(threshold: Optional[Threshold]) -> str:
    return threshold_text(threshold and threshold.image, threshold and threshold.n_images,
                          threshold and threshold.image_quantile)


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    items, skipped = build_items(args.data_path, args.images, args.split, args.output_dir)
    tiff_dir = tiff_category_dir(args.save_tiff, args.data_path, args.output_dir)
    tiff_files = tiff_paths(items, tiff_dir) if tiff_dir is not None else None
    check_output_dir(args.output_dir, args.overwrite)  # before the slow model and data
    scorer, threshold, train_args, scoring_record = load_scoring(
        args.checkpoint, args.pretrained, args.holdout_root, device, amp_dtype, args.data_path, args.head,
        **scoring_flags(args))
    if args.save_masks and threshold is None:
        raise UserError("--save_masks needs a pixel threshold, which comes from held-out normal images; this "
                        "checkpoint has none (retrain with --holdout)")
    if amp_dtype is not None:
        # Autocast would cast every (merged, frozen) weight at every call; store them cast once.
        cast_frozen_weights(scorer.model, amp_dtype)
    dataset = TestDataset(items, scorer.model.img_size)
    skipped = sorted(skipped + [Skipped(item.rel_path, reason) for item, reason in dataset.unreadable],
                     key=lambda s: s.path)
    if dataset.non_square:
        warn(squash_note(dataset.non_square, len(dataset), scorer.model.img_size))
    loader = build_loader(dataset, args.batch_size, args.num_workers, device)
    out = prepare_output_dir(args.output_dir, args.overwrite, output_names(Path(args.output_dir), tiff_files))
    options = resolved_options(args, device, amp_dtype, train_args, len(dataset))
    used = scoring_record["options"]
    scoring = dict(zip(("pixel_map", "image_map"), scorer.map_recipes()), head=scoring_record["head"])
    options.update(used, **scoring, threshold=threshold.to_dict() if threshold else None)
    save_text(out / "args.json", json.dumps(options, indent=2, default=str) + "\n")

    labelled = args.data_path is not None
    start = time.perf_counter()
    collector, recon_u8, image_maps = score_dataset(
        scorer, loader, device, amp_dtype, out, keep_reconstructions=not args.no_overlays,
        keep_image_maps=(labelled or not args.no_overlays) and not same_maps(scorer))
    elapsed = time.perf_counter() - start
    save_text(out / "scores.csv", scores_csv(collector, threshold))
    save_text(out / "skipped.csv", skipped_csv(skipped))
    if args.save_masks:
        save_masks(out, collector, threshold.pixel)
    images = scored_images(collector, threshold, overlays=recon_u8 is not None)
    lines = [f"scored {collector.count} images in {elapsed:.1f} s ({elapsed / collector.count:.3f} s/image) "
             f"on {device}, amp {amp_name(amp_dtype)}"]
    image, pixel = heat_scales(scorer, collector, image_maps, threshold)
    if tiff_files is not None:
        # dataset.items drops unreadable images; their TIFF names are looked up by path
        by_path = {it.path: f for it, f in zip(items, tiff_files)}
        write_tiffs(dataset, collector, [by_path[it.path] for it in dataset.items])
    metrics = None
    check = check_false_alarms(collector.scores[collector.labels == 0], threshold.image, threshold.image_quantile) \
        if labelled and threshold is not None else None
    warnings = run_warnings(scoring_record["choice"], check)
    if labelled:
        metrics, metric_lines = write_metrics(
            out, dataset, collector, args.data_path, args.eval_size, image, threshold,
            {**{k: used[k] for k in ("score", "topk_fraction", "sigma", "image_sigma", "num_masks", "mask_pattern")},
             **scoring, "recipe_source": scoring_record["source"],
             "overridden_by_flags": scoring_record["overridden_by_flags"], "choice": scoring_record["choice"]},
            elapsed / collector.count, check, warnings)
        lines += metric_lines + ["", f"threshold: {threshold_line(threshold)}"]
    else:
        lines += [""] + console_lines(images, threshold_line(threshold))
    if recon_u8 is not None:
        write_overlays(out, dataset, collector, recon_u8, images, image, pixel)
    pictures = [name for name in ("summary.png", "roc.png") if labelled and (out / name).is_file()]
    save_text(out / REPORT_NAME, render_report(
        "MAE-AD report", f"{'--data_path' if labelled else '--images'} {args.data_path or args.images}; checkpoint "
        f"{args.checkpoint}; image map {scoring['image_map']}, pixel map {scoring['pixel_map']} "
        f"({scoring_record['source'].removeprefix('note: ')})",
        images, skipped, threshold_line(threshold), metrics, pictures,
        ["scores.csv", "skipped.csv"] + (["metrics.json"] if labelled else []),
        notes=[check.describe()] if check is not None else [], warnings=warnings))
    lines.append(count_line(images, skipped, out / "skipped.csv"))
    print("\n".join(lines + output_lines(out, labelled, recon_u8 is not None, image, args.save_masks, tiff_dir)),
          flush=True)
    for text in warnings:  # last, where they are seen
        warn(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
