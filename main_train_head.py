"""Train the discriminative head (models_head) on a finished MAE checkpoint, the MAE frozen.

    python main_train_head.py --checkpoint RUN/checkpoint-last.pth --data_path ROOT [--output_dir OUT]

The head learns to find simulated anomalies (util.anomaly_simulation: the defects of util.defects and
texture pastes of procedural images, drawn fresh at every step) on the training images of ROOT, from the
image, the MAE's reconstruction and its error maps (4 grid views, as main_infer.py scores). Its weights
are an EMA, chosen at the step that finds simulated anomalies best on the checkpoint's held-out normal
images (never trained on); no test image is read for that (--eval_every only reports test metrics).

Writes to --output_dir (default: the checkpoint's folder): checkpoint-head.pth, everything the MAE
checkpoint holds plus a `head` entry (models_head's docstring), head_log.txt (one JSON object per
checked step) and head_args.json (the resolved options).
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from engine import HeadEvalSet, head_inputs, head_metrics, train_head
from lora_utils import cast_frozen_weights
from main_infer import build_model
from models_head import HEAD_VERSION, HEADS, HeadScorer, create_head, default_image_kernel
from models_mae import AnomalyScorer
from scoring import ScoringOptions, head_evidence
from scripts.make_procedural import render
from util.anomaly_simulation import SimulatedBatch, SimulationConfig, simulate
from util.checkpoint import read_checkpoint
from util.cli import (DefaultsHelpFormatter, OneLineArgumentParser, UserError, check_minimum, comma_subset,
                      run_cli, warn)
from util.datasets import TestDataset, TrainDataset, find_test_items, holdout_items
from util.defects import DEFECT_MAKERS, EVIDENCE_KINDS
from util.misc import AMP_CHOICES, resolve_amp, resolve_device, save_atomic
from util.recipe_choice import EVIDENCE_STRENGTHS, HEAD_MARGINS, choose_head

OUTPUTS = ("checkpoint-head.pth", "head_log.txt", "head_args.json")
HEAD_NUM_MASKS = ScoringOptions.num_masks  # the head reads the maps main_infer.py scores with
HEAD_MASK_PATTERN = ScoringOptions.mask_pattern


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description="Train the discriminative head on a finished MAE checkpoint "
                                          "(the MAE frozen) with simulated anomalies.",
                              formatter_class=DefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--checkpoint", required=True, help="the MAE checkpoint (main_train.py's checkpoint-last.pth)")
    g.add_argument("--data_path", required=True, help="the category root the MAE was trained on (train/good)")
    g.add_argument("--output_dir", default=None,
                   help="where checkpoint-head.pth goes (default: the checkpoint's folder)")
    g.add_argument("--overwrite", action="store_true", help="replace this script's earlier outputs in --output_dir")

    g = p.add_argument_group("head")
    g.add_argument("--head", default="head_unet_tiny", choices=list(HEADS), metavar="NAME",
                   help=f"head variant: {', '.join(HEADS)}")
    g.add_argument("--image_kernel", default=None, type=int,
                   help="image score = max of the map mean-filtered over this many pixels across, odd "
                        "(default: about 8%% of the input size, 9 at 112 px)")

    g = p.add_argument_group("simulated anomalies")
    g.add_argument("--kinds", default="texture_paste",
                   help="comma-separated defect kinds of util.defects to simulate (default: DRAEM's texture pastes "
                        "only, so the defects the per-category choice judges the head on are all new to it; with "
                        "any of those kinds the head is used only when asked for, main_infer.py --head on)")
    g.add_argument("--normal_share", default=0.5, type=float, help="share of the samples left normal")
    g.add_argument("--min_strength", default=0.1, type=float, help="lowest opacity of a simulated defect")
    g.add_argument("--max_strength", default=1.0, type=float, help="highest opacity of a simulated defect")
    g.add_argument("--num_textures", default=64, type=int,
                   help="procedural images (scripts/make_procedural.py) made once as texture_paste's textures")
    g.add_argument("--holdout_copies", default=3, type=int,
                   help="simulated anomalies per held-out normal image in the selection evidence")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", default=300, type=int, help="training steps")
    g.add_argument("--batch_size", default=8, type=int, help="samples per step")
    g.add_argument("--fresh_per_step", default=2, type=int,
                   help="new simulated samples per step (each needs an MAE pass); the batch is drawn from the "
                        "last --buffer_size of them")
    g.add_argument("--buffer_size", default=64, type=int, help="recent samples the batches are drawn from")
    g.add_argument("--crop_size", default=None, type=int,
                   help="each sample is cropped to this many pixels across for its step (0 = whole images; "
                        "default: half the input size, a multiple of 8)")
    g.add_argument("--lr", default=1e-3, type=float, help="peak AdamW learning rate")
    g.add_argument("--min_lr", default=1e-5, type=float, help="learning rate at the end of the cosine")
    g.add_argument("--warmup_steps", default=20, type=int, help="linear warmup length")
    g.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    g.add_argument("--ema_decay", default=0.99, type=float, help="decay of the weights' moving average")
    g.add_argument("--focal_gamma", default=2.0, type=float, help="focal loss exponent (0 = cross-entropy)")
    g.add_argument("--select_every", default=20, type=int,
                   help="check the averaged weights on the held-out evidence every N steps (and at the last)")

    g = p.add_argument_group("run")
    g.add_argument("--eval_every", default=0, type=int,
                   help="also compute test metrics every N steps, for reports only: they never choose the "
                        "weights (0 = off)")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="mixed precision (auto: bf16 where fast)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", default=0, type=int, help="random seed (simulation, batches, initialisation)")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


# ---- options ----------------------------------------------------------------------------------
def parse_kinds(text: str) -> tuple[str, ...]:
    return tuple(comma_subset("--kinds", text, tuple(DEFECT_MAKERS)))


def validate_args(args: argparse.Namespace) -> None:
    """Cheap checks of the flags, before anything is read."""
    check_minimum({"--steps": args.steps, "--batch_size": args.batch_size, "--fresh_per_step": args.fresh_per_step,
                   "--buffer_size": args.buffer_size, "--select_every": args.select_every,
                   "--holdout_copies": args.holdout_copies, "--num_textures": args.num_textures}, 1)
    check_minimum({"--warmup_steps": args.warmup_steps, "--eval_every": args.eval_every,
                   "--weight_decay": args.weight_decay, "--focal_gamma": args.focal_gamma,
                   "--min_lr": args.min_lr}, 0)
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr}: must be a positive number")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema_decay {args.ema_decay}: must be in [0, 1)")
    if args.image_kernel is not None and (args.image_kernel < 1 or args.image_kernel % 2 == 0):
        raise UserError(f"--image_kernel {args.image_kernel}: must be an odd number of pixels, e.g. 9")
    if args.crop_size is not None and args.crop_size < 0:
        raise UserError(f"--crop_size {args.crop_size}: must be 0 (whole images) or more")
    try:
        simulation_config(args)
    except ValueError as e:
        raise UserError(f"--normal_share/--min_strength/--max_strength: {e}") from e


def simulation_config(args: argparse.Namespace) -> SimulationConfig:
    return SimulationConfig(parse_kinds(args.kinds), args.normal_share, args.min_strength, args.max_strength)


def default_crop_size(input_size: int) -> int:
    """Half the input size, rounded down to a multiple of 8 (the head's U-Net halves it 3 times)."""
    return max(8, input_size // 2 // 8 * 8)


def check_output_dir(out: Path, overwrite: bool) -> None:
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"--output_dir {out} already holds {', '.join(existing)}; pass --overwrite to replace "
                        f"them, or another --output_dir")


# ---- data -------------------------------------------------------------------------------------
def holdout_source(train_args: dict[str, Any], calibration: Optional[dict[str, Any]], data_path: str,
                   checkpoint: str) -> tuple[str, list[str]]:
    """The checkpoint's held-out normal images: (root whose train/good holds them, file names)."""
    names = list((calibration or {}).get("holdout_files") or train_args.get("holdout_files") or [])
    if not names:
        raise UserError(f"{checkpoint} has no held-out normal images to choose the head's weights on: retrain "
                        f"the MAE with main_train.py --holdout 0.1 (the default)")
    return train_args.get("holdout_root") or data_path, names


def procedural_textures(count: int, size: int, seed: int) -> list[np.ndarray]:
    """texture_paste's source: `count` procedural images uint8 [size, size, 3] (scripts/make_procedural.py)."""
    return [render(i, size, seed) for i in range(count)]


def make_sampler(dataset: TrainDataset, textures: list[np.ndarray], config: SimulationConfig,
                 rng: np.random.Generator):
    """simulate_batch(n) for engine.train_head: n training images drawn at random, each shifted as
    main_train.py shifts them (up to the dataset's margin), then util.anomaly_simulation.simulate."""
    size, margin = dataset.input_size, dataset.margin

    def simulate_batch(n: int) -> SimulatedBatch:
        index = rng.integers(len(dataset), size=n)
        offsets = rng.integers(2 * margin + 1, size=(n, 2))
        images = torch.stack([dataset.images[i, :, y:y + size, x:x + size] for i, (y, x) in zip(index, offsets)])
        return simulate(images, textures, config, rng)
    return simulate_batch


def holdout_eval_set(scorer: AnomalyScorer, images: torch.Tensor, textures: list[np.ndarray],
                     config: SimulationConfig, copies: int, seed: int, device: torch.device,
                     amp_dtype: Optional[torch.dtype]) -> HeadEvalSet:
    """The selection evidence: the held-out normal images [n, 3, S, S] uint8 and `copies` simulated
    anomalies on each (config's kinds and strengths, from their own random stream; one so faint that
    no pixel changed is left out)."""
    rng = np.random.default_rng([seed, 1])
    anomalous = simulate(images.repeat(copies, 1, 1, 1), textures, replace(config, normal_share=0.0), rng)
    seen = anomalous.masks.flatten(1).any(dim=1)
    n, m = images.shape[0], int(seen.sum())
    all_images = torch.cat([images, anomalous.images[seen]])
    masks = torch.cat([torch.zeros((n, *images.shape[-2:]), dtype=torch.bool), anomalous.masks[seen]]).numpy()
    kinds = [k for k, s in zip(anomalous.kinds, seen.tolist()) if s]
    labels = np.r_[np.zeros(n), np.ones(m)].astype(np.int64)
    return HeadEvalSet(head_inputs(scorer, all_images, device, amp_dtype), labels, masks, ["good"] * n + kinds)


def test_eval_set(scorer: AnomalyScorer, data_path: str, input_size: int, device: torch.device,
                  amp_dtype: Optional[torch.dtype]) -> HeadEvalSet:
    """The labelled test split with its head inputs (for --eval_every's reports only)."""
    dataset = TestDataset(find_test_items(data_path), input_size)
    labels = np.array([item.label for item in dataset.items], dtype=np.int64)
    return HeadEvalSet(head_inputs(scorer, dataset.images, device, amp_dtype), labels, dataset.masks.numpy(),
                       [item.defect for item in dataset.items])


def choose_levels(scorer: AnomalyScorer, head: torch.nn.Module, image_kernel: int, images: torch.Tensor,
                  calibration: Optional[dict[str, Any]], seed: int, kinds: tuple[str, ...], device: torch.device,
                  amp_dtype: Optional[torch.dtype]) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The head's graded evidence on the held-out images [n, 3, S, S] uint8 and the recipe choice's
    defects on them (scoring.head_evidence), the per-level choice (util.recipe_choice.choose_head) and
    the head's held-out maps {"pixel", "image"} (the threshold's source)."""
    choice = (calibration or {}).get("choice")
    strengths = tuple((choice or {}).get("evidence", {}).get("strengths") or EVIDENCE_STRENGTHS)
    head_scorer = HeadScorer(scorer, head, image_kernel).eval()
    evidence, holdout_maps = head_evidence(head_scorer, images, seed, strengths, device, amp_dtype)
    seen = sorted(set(kinds) & set(EVIDENCE_KINDS))
    if seen:
        levels = {"pixel": False, "image": False, "margin": dict(HEAD_MARGINS), "reconstruction": None,
                  "reason": f"the head was trained on {', '.join(seen)}, kinds the held-out evidence is made of, so "
                            f"the evidence cannot judge it; it is used only when asked for (main_infer.py --head on)"}
    else:
        levels = choose_head(evidence, choice)
    return evidence, levels, holdout_maps


# ---- main -------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    validate_args(args)
    start, start_cpu = time.perf_counter(), time.process_time()
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    out = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).parent
    check_output_dir(out, args.overwrite)
    torch.manual_seed(args.seed)
    checkpoint = read_checkpoint(args.checkpoint)
    if "head" in checkpoint:
        warn(f"{args.checkpoint} already holds a head; the new checkpoint replaces it")
    model, train_args, calibration = build_model(args.checkpoint)
    model.to(device)
    if amp_dtype is not None:
        # Autocast would cast every (merged, frozen) weight at every call; store them cast once.
        cast_frozen_weights(model, amp_dtype)
    size = model.img_size
    config = simulation_config(args)
    image_kernel = args.image_kernel or default_image_kernel(size)
    crop_size = default_crop_size(size) if args.crop_size is None else args.crop_size
    holdout_root, holdout_files = holdout_source(train_args, calibration, args.data_path, args.checkpoint)
    exclude = holdout_files if Path(holdout_root).resolve() == Path(args.data_path).resolve() else []
    dataset = TrainDataset(args.data_path, size, jitter=True, exclude=exclude)
    scorer = AnomalyScorer(model, HEAD_NUM_MASKS, HEAD_MASK_PATTERN).to(device).eval()
    textures = procedural_textures(args.num_textures, size, args.seed)
    holdout_images = TestDataset(holdout_items(holdout_root, holdout_files), size).images
    holdout = holdout_eval_set(scorer, holdout_images, textures, config, args.holdout_copies, args.seed, device,
                               amp_dtype)
    report_fn = None
    if args.eval_every:
        test = test_eval_set(scorer, args.data_path, size, device, amp_dtype)

        def report_fn(step: int, head: torch.nn.Module) -> dict[str, Any]:
            metrics = head_metrics(head, test, image_kernel, device, amp_dtype)
            return {f"test_{k}": metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    print(f"training {args.head} on simulated anomalies ({', '.join(config.kinds)}; {config.normal_share:.0%} "
          f"normal) on {len(dataset)} training images of {args.data_path}; weights chosen on {len(holdout_files)} "
          f"held-out images with {int(holdout.labels.sum())} simulated anomalies on them; {device}, amp "
          f"{'none' if amp_dtype is None else str(amp_dtype).removeprefix('torch.')}", flush=True)
    head = create_head(args.head).to(device)
    result = train_head(
        head, scorer, make_sampler(dataset, textures, config, np.random.default_rng([args.seed, 0])), holdout,
        steps=args.steps, batch_size=args.batch_size, fresh_per_step=args.fresh_per_step,
        buffer_size=args.buffer_size, crop_size=crop_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
        focal_gamma=args.focal_gamma, image_kernel=image_kernel, select_every=args.select_every, device=device,
        amp_dtype=amp_dtype, seed=args.seed, report_fn=report_fn, report_every=args.eval_every,
        show_progress=sys.stdout.isatty())
    head.load_state_dict(result.state_dict)
    evidence, levels, holdout_maps = choose_levels(scorer, head, image_kernel, holdout_images, calibration,
                                                   int(train_args.get("seed", 0)), config.kinds, device, amp_dtype)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    selected = next(r for r in result.history if r["step"] == result.selected_step)
    options = {**vars(args), "image_kernel": image_kernel, "crop_size": crop_size, "output_dir": str(out)}
    entry = {
        "version": HEAD_VERSION, "name": args.head, "state_dict": result.state_dict,
        "input_size": size, "num_masks": HEAD_NUM_MASKS, "mask_pattern": HEAD_MASK_PATTERN,
        "image_kernel": image_kernel,
        "training": {"options": options, "simulation": config.to_dict(), "seconds": seconds,
                     "cpu_seconds": cpu_seconds, "train_seconds": result.seconds,
                     "samples_simulated": result.samples_simulated, "n_train_images": len(dataset),
                     "final_loss": result.history[-1]["loss"]},
        "selection": {"criterion": "mean of image AUROC, pixel AUROC and AUPRO (engine.selection_score) on the "
                                   "held-out normal images and simulated anomalies on them",
                      "selected_step": result.selected_step, "holdout_root": str(holdout_root),
                      "holdout_files": list(holdout_files), "n_normal": int((holdout.labels == 0).sum()),
                      "n_anomalous": int(holdout.labels.sum()),
                      "history": [{k: v for k, v in r.items() if not k.startswith("test_")}
                                  for r in result.history if "holdout_score" in r]},
        "evidence": evidence, "choice": levels,
        "holdout_maps": {level: m.float().contiguous() for level, m in holdout_maps.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_atomic({**checkpoint, "head": entry}, out / "checkpoint-head.pth")
    (out / "head_log.txt").write_text("".join(json.dumps(r) + "\n" for r in result.history))
    (out / "head_args.json").write_text(json.dumps(options, indent=2) + "\n")
    print(f"done in {seconds:.1f}s ({cpu_seconds:.0f} CPU s; {result.samples_simulated} simulated samples through "
          f"the MAE); weights of step {result.selected_step}: held-out image AUROC "
          f"{selected['holdout_image_auroc']:.3f}, pixel AUROC {selected['holdout_pixel_auroc']:.3f}, AUPRO "
          f"{selected['holdout_aupro']:.3f}; {out / OUTPUTS[0]}\nper-category choice: {levels['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
