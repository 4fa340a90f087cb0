"""Train a LoRA-adapted masked autoencoder on the normal images of one category.

    python main_train.py --data_path ROOT [options]
    torchrun --nproc_per_node N main_train.py --data_path ROOT [options]

Writes checkpoint-<epoch>.pth / checkpoint-last.pth, log.txt (one JSON object per epoch), args.json
and TensorBoard events to --output_dir (events: --log_dir). See README / INTERFACE.md.
"""
import argparse
import inspect
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from engine import PendingEpoch, evaluate, train_one_epoch
from lora_utils import (LORA_TARGETS, cast_frozen_weights, freeze_non_lora, is_lora_name, parameter_table,
                        unmerged_state_dict)
from models_mae import MODELS, AnomalyScorer, create_model
from scoring import SCORING_VERSION, ScoringOptions, holdout_choice, make_calibration
from util import distributed as dist_util
from util.checkpoint import MODEL_ARG_KEYS, PATCH_EMBED_INITS, load_pretrained, read_checkpoint, state_dict_of
from util.cli import DefaultsHelpFormatter, UserError, check_minimum, comma_subset, run_cli, warn
from util.datasets import (JitteredSampler, TestDataset, TrainDataset, find_test_items, holdout_names,
                           holdout_root_names)
from util.device_batches import AUTO_BUDGET_BYTES, DeviceBatches, dataset_bytes
from util.logger import RunLogger
from util.masks import make_inference_masks
from util.misc import AMP_CHOICES, resolve_amp, resolve_device, save_atomic

PATCH_SIZE = 7  # every registered model uses 7x7 patches
DEFAULT_HOLDOUT = 0.1  # --holdout when not given
EVAL_METRICS = ("image_auroc", "pixel_auroc", "aupro")
EVAL_NUM_MASKS = 4  # views of --eval_every's scoring (main_infer.py's default)
DATA_ON_DEVICE_CHOICES = ("auto", "on", "off")
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (the full usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Train a LoRA-adapted MAE for anomaly detection on one category (single process or torchrun).",
                formatter_class=DefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_path", required=True, help="category folder with train/good/ (and test/ for --eval_every)")
    g.add_argument("--input_size", default=224, type=int, help="image size in pixels; a multiple of 7 (the patch size)")
    g.add_argument("--no_jitter", action="store_true",
                   help="no training jiggle (by default each image is shifted at random by up to "
                        "1%% of its size each way (at least 1 px), at the test images' scale)")
    g.add_argument("--holdout", default=None, type=float, metavar="FRACTION",
                   help="fraction of train/good kept out of training (seeded by --seed; at least 5 images) to "
                        "calibrate the anomaly scores and the decision threshold on normal images; 0 = none "
                        "(then scoring is uncalibrated and has no threshold) (default: 0.1, or none with a warning "
                        "when train/good has fewer than 10 images; 0 with --holdout_root)")
    g.add_argument("--holdout_root", default=None, metavar="ROOT",
                   help="calibrate on every image of ROOT/train/good instead (at least 5): normal images that are "
                        "not training images, e.g. crops of another stretch of the same surface; then all of "
                        "--data_path's train/good trains and --holdout may only be 0. Use it when new normal "
                        "images score higher than a share of train/good (main_infer.py warns of false alarms)")
    g.add_argument("--num_workers", default=4, type=int, help="DataLoader worker processes per training process")
    g.add_argument("--data_on_device", default="auto", choices=DATA_ON_DEVICE_CHOICES,
                   help="keep the decoded training images on the training device and cut each batch there (no "
                        "DataLoader workers; the same images and shifts as the DataLoader); auto: on a CUDA GPU "
                        "when they take at most 2 GiB")
    g.add_argument("--pin_mem", action="store_true", help="pin CPU memory for faster GPU transfers (the default)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin memory")
    p.set_defaults(pin_mem=True)

    g = p.add_argument_group("model")
    g.add_argument("--model", default="mae_vit_large_patch7", choices=list(MODELS), metavar="NAME",
                   help=f"model variant: {', '.join(MODELS)}")
    g.add_argument("--norm_pix_loss", action="store_true", help="reconstruct per-patch normalised pixels (MAE option)")
    g.add_argument("--train_mask_ratio", default=0.75, type=float, help="fraction of patches hidden in training")
    g.add_argument("--lora_rank", default=8, type=int, help="LoRA rank (0: no adapters)")
    g.add_argument("--lora_alpha", default=None, type=float, help="LoRA alpha (scaling alpha/rank); default: the rank")
    g.add_argument("--lora_dropout", default=0.0, type=float, help="dropout on the LoRA input")
    g.add_argument("--lora_targets", default="qkv,proj",
                   help=f"comma-separated linears that get adapters, from {','.join(LORA_TARGETS)}")
    g.add_argument("--pretrained", default=None, help="official MAE (or our) weights to start from")
    g.add_argument("--patch_embed_init", default="random", choices=PATCH_EMBED_INITS,
                   help="pretrained patch embedding of another patch size: re-initialise or resample it to 7x7")
    g.add_argument("--freeze_non_lora", action="store_true",
                   help="freeze the tensors loaded from --pretrained (LoRA and re-initialised tensors train)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", default=4000, type=int, help="number of epochs")
    g.add_argument("--batch_size", default=32, type=int, help="images per step per process")
    g.add_argument("--accum_iter", default=1, type=int, help="accumulate gradients over this many steps per update")
    g.add_argument("--weight_decay", default=0.001, type=float, help="AdamW weight decay (not on biases, norms, tokens, LoRA)")
    g.add_argument("--lr", default=None, type=float, help="absolute learning rate; default blr * effective batch / 256")
    g.add_argument("--blr", default=1e-3, type=float, help="base learning rate per 256 images of effective batch")
    g.add_argument("--min_lr", default=0.0, type=float, help="learning rate at the end of the cosine schedule")
    g.add_argument("--warmup_epochs", default=40, type=float, help="linear warmup length in epochs")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = bf16 where supported (CUDA or CPU with AVX512-BF16/AMX), else none; "
                        "fp16 (CUDA) uses a gradient scaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    g.add_argument("--compile_mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile); reduce-overhead replays each fixed-shape step as "
                        "CUDA graphs (CUDA only)")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="output_dir",
                   help="checkpoints, log.txt and args.json go here (default: output_dir, in the current folder)")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder; default: --output_dir")
    g.add_argument("--resume", default="", help="checkpoint to continue from; 'auto' = OUTPUT_DIR/checkpoint-last.pth "
                                                "if it exists (default: start afresh)")
    g.add_argument("--start_epoch", default=0, type=int, help="first epoch (ignored with --resume)")
    g.add_argument("--save_every", default=200, type=int,
                   help="write checkpoint-<epoch>.pth every N epochs (and checkpoint-last.pth; always at the end); 0 = end only")
    g.add_argument("--eval_every", default=0, type=int, help="evaluate on the test split every N epochs (0 = off)")
    g.add_argument("--print_freq", default=20, type=int, help="report the running loss every N steps")
    g.add_argument("--wandb_name", default=None, help="also log to Weights & Biases under this run name "
                   "(WANDB_MODE=offline logs locally)")
    g.add_argument("--seed", default=0, type=int, help="random seed (each process adds its rank)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: GPU LOCAL_RANK)")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


# ---- options ----------------------------------------------------------------------------------
def parse_lora_targets(text: str) -> list[str]:
    return comma_subset("--lora_targets", text, LORA_TARGETS)


def validate_args(args: argparse.Namespace) -> None:
    """Cheap checks of the flags, before any data is read or a model is built."""
    check_minimum({"--batch_size": args.batch_size, "--accum_iter": args.accum_iter, "--epochs": args.epochs,
                   "--print_freq": args.print_freq, "--input_size": args.input_size}, 1)
    check_minimum({"--num_workers": args.num_workers, "--save_every": args.save_every, "--eval_every": args.eval_every,
                   "--lora_rank": args.lora_rank, "--start_epoch": args.start_epoch,
                   "--warmup_epochs": args.warmup_epochs, "--min_lr": args.min_lr,
                   "--weight_decay": args.weight_decay}, 0)
    if args.input_size % PATCH_SIZE:
        lo = max(PATCH_SIZE, args.input_size // PATCH_SIZE * PATCH_SIZE)
        raise UserError(f"--input_size {args.input_size} is not a multiple of the patch size {PATCH_SIZE}: "
                        f"use a multiple of 7, e.g. {lo} or {lo + PATCH_SIZE} (224 and 112 are the usual sizes)")
    if args.eval_every:
        try:  # --eval_every scores with the default views: the patch grid must split evenly
            make_inference_masks(args.input_size // PATCH_SIZE, EVAL_NUM_MASKS, ScoringOptions.mask_pattern)
        except ValueError as e:
            raise UserError(f"--eval_every with --input_size {args.input_size}: {e}; use an --input_size whose "
                            f"grid side (input_size/7) is even, e.g. 56, 112 or 224, or --eval_every 0") from e
    if args.holdout is not None and not 0.0 <= args.holdout < 0.5:
        raise UserError(f"--holdout {args.holdout}: must be in [0, 0.5) (a fraction of train/good; 0 = none)")
    if args.holdout_root and args.holdout:
        # Images kept out of training would go unused, and calibrating on them as well would bring back
        # the low scores of images that overlap the training ones.
        raise UserError(f"--holdout {args.holdout} with --holdout_root: the calibration images come from "
                        f"--holdout_root and all of train/good trains; drop --holdout")
    if not 0.0 < args.train_mask_ratio < 1.0:
        raise UserError(f"--train_mask_ratio {args.train_mask_ratio}: must be between 0 and 1 (MAE uses 0.75)")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UserError(f"--lora_dropout {args.lora_dropout}: must be in [0, 1)")
    for flag, value in {"--lr": args.lr, "--blr": args.blr}.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag} {value}: must be a positive number")
    parse_lora_targets(args.lora_targets)


def resolve_options(args: argparse.Namespace, world_size: int, amp_dtype: Optional[torch.dtype],
                    device: torch.device) -> dict[str, Any]:
    """The training options as a plain dict with every default resolved: args.json and the
    checkpoint's `args` (enough for main_infer.py to rebuild the model, weights_only-loadable)."""
    options = dict(vars(args))
    eff_batch_size = args.batch_size * args.accum_iter * world_size
    holdout = args.holdout if args.holdout is not None else 0.0 if args.holdout_root else DEFAULT_HOLDOUT
    options.update(
        lr=args.lr if args.lr is not None else args.blr * eff_batch_size / 256,
        eff_batch_size=eff_batch_size,
        world_size=world_size,
        lora_alpha=float(args.lora_alpha if args.lora_alpha is not None else args.lora_rank),
        lora_targets=parse_lora_targets(args.lora_targets),
        log_dir=args.log_dir or args.output_dir,
        amp_dtype={torch.bfloat16: "bf16", torch.float16: "fp16", None: "none"}[amp_dtype],
        device_type=device.type,
        # The held-out normal images, by name in (holdout_root or data_path)/train/good: inference
        # calibrates on them; training never sees them.
        holdout=holdout,
        holdout_files=(holdout_root_names(args.holdout_root, args.data_path) if args.holdout_root
                       else holdout_names(args.data_path, holdout, args.seed, strict=args.holdout is not None)),
        # main_infer.py scores checkpoints made under older scoring defaults as they were scored then.
        scoring_version=SCORING_VERSION,
    )
    return options


# ---- building blocks --------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_data_on_device(choice: str, device: torch.device, dataset_bytes: int) -> bool:
    """--data_on_device: 'auto' keeps the training images on a CUDA device when they fit the budget."""
    if choice == "auto":
        return device.type == "cuda" and dataset_bytes <= AUTO_BUDGET_BYTES
    return choice == "on"


def build_data(data_path: str, input_size: int, jitter: bool, batch_size: int, num_workers: int,
               pin_memory: bool, rank: int, world_size: int, seed: int, holdout_files: list[str],
               data_on_device: str = "off", device: torch.device = torch.device("cpu"),
               ) -> tuple[JitteredSampler, DataLoader | DeviceBatches]:
    """Training images (all of train/good but the names in `holdout_files`) and their batches: a DataLoader, or
    with `data_on_device` the images resident on `device` (util.device_batches: same batches). The
    sampler shuffles with (seed, epoch), the same on every rank, gives each rank an equal share (so
    DDP ranks run the same number of steps) and draws each image's shift (util.datasets.jitter_offsets)."""
    dataset = TrainDataset(data_path, input_size, jitter=jitter, exclude=holdout_files)
    sampler = JitteredSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
    per_rank = len(sampler)
    if per_rank < batch_size:
        warn(f"{len(dataset)} training images give {per_rank} per process, fewer than --batch_size {batch_size}: "
             f"every step uses all of them")
    drop_last = per_rank >= batch_size  # MAE drops the ragged last batch, unless it is the only one
    if resolve_data_on_device(data_on_device, device, dataset_bytes(dataset)):
        return sampler, DeviceBatches(dataset, sampler, batch_size, drop_last, device)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        drop_last=drop_last, persistent_workers=num_workers > 0,
    )
    return sampler, loader


def build_eval_loader(data_path: str, input_size: int, batch_size: int, num_workers: int) -> Optional[DataLoader]:
    """The labelled test split for --eval_every, or None (with one warning) when there is none."""
    try:
        dataset = TestDataset(find_test_items(data_path), input_size)
    except UserError as e:
        warn(f"--eval_every: no usable test split, evaluation skipped ({e})")
        return None
    # Scoring runs 4 views of each image with 3/4 of the patches visible: ~12x a training sample.
    return DataLoader(dataset, batch_size=max(1, batch_size // 4), shuffle=False, num_workers=num_workers)


def build_model(model_name: str, input_size: int, norm_pix_loss: bool, lora_rank: int, lora_alpha: float,
                lora_dropout: float, lora_targets: list[str], pretrained: Optional[str], patch_embed_init: str,
                freeze: bool, verbose: bool, amp_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The MAE with LoRA adapters, pretrained weights loaded and (optionally) frozen, on the CPU.

    With a frozen base and autocast (`amp_dtype`), the frozen linears are stored once in that dtype
    for compute (autocast would round them at every step anyway: same numbers, no per-step casts);
    their exact loaded tensors stay in host memory for the checkpoints (lora_utils.cast_frozen_weights).
    """
    model = create_model(model_name, img_size=input_size, norm_pix_loss=norm_pix_loss, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=tuple(lora_targets))
    loaded: set[str] = set()
    if pretrained:
        loaded = set(load_pretrained(model, pretrained, patch_embed_init, verbose=verbose).loaded)
    if freeze:
        if not pretrained:
            warn("--freeze_non_lora without --pretrained freezes nothing: every tensor is randomly initialised")
        freeze_non_lora(model, loaded)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("no trainable parameters: use --lora_rank > 0 or drop --freeze_non_lora")
    if freeze and amp_dtype is not None:
        cast_frozen_weights(model, amp_dtype, keep_exact=True)
    if verbose:
        print(parameter_table(model))
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only, none on biases, norms (all 1-D tensors),
    the cls/mask tokens or the LoRA tensors; frozen tensors are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name in ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed") or is_lora_name(name)
        (no_decay if skip else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors; on CUDA the step counts stay on the device, so the
    step reads nothing back) on CUDA and on the CPU, where it measured 5-7x faster than the default
    (foreach) kernel (docs/GPU.md); other devices get the default."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95),
                             fused=device.type in FUSED_ADAMW_DEVICES)


def build_scaler(amp_dtype: Optional[torch.dtype], device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A gradient scaler for fp16 only; bf16 and fp32 have the range to do without."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def wrap_model(model: nn.Module, device: torch.device, distributed: bool, compile_model: bool,
               compile_mode: Optional[str] = None) -> nn.Module:
    """The module the loop calls: DDP (when distributed) then torch.compile (when asked, or when a
    `compile_mode` is given). `model` itself stays unwrapped, for checkpoints and evaluation."""
    wrapped = model
    if distributed:
        # The sin-cos position tables are fixed buffers: no need to broadcast them every step
        # (newer torch spells this forward_sync_buffers and deprecates broadcast_buffers).
        ddp = nn.parallel.DistributedDataParallel
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                          else {"broadcast_buffers": False})
        wrapped = ddp(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=False, **no_buffer_sync)
    if compile_model or compile_mode:
        wrapped = torch.compile(wrapped, mode=None if compile_mode in (None, "default") else compile_mode)
    return wrapped


# ---- checkpoints ------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors / lists of ints (weights_only-loadable, unlike numpy's)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def make_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                    epoch: int, options: dict[str, Any], rng: list[dict[str, Any]],
                    calibration: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The training state; `calibration` (scoring.make_calibration) is added to the final checkpoint."""
    return {
        "model": unmerged_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "args": options,
        "rng": rng,  # one entry per rank
        **({"calibration": calibration} if calibration is not None else {}),
    }


def calibrate(model: nn.Module, data_path: str, holdout_files: list[str], device: torch.device,
              amp_dtype: Optional[torch.dtype], batch_size: int, seed: int) -> dict[str, Any]:
    """Held-out normal maps, the category's recipe choice (scoring.holdout_choice) and the threshold
    for it, on the (unwrapped) model; the model is back in train mode after."""
    start = time.perf_counter()
    options = ScoringOptions()
    try:
        maps, choice = holdout_choice(model, data_path, holdout_files, options, device, amp_dtype,
                                      batch_size=max(1, batch_size // 4), seed=seed)
    finally:
        model.train(True)
    calibration = make_calibration(maps, holdout_files, model.img_size, options, choice)
    threshold = calibration["threshold"]
    print(f"calibrated on {len(holdout_files)} held-out images (and {choice.n_defective} synthetic defects on "
          f"them) in {time.perf_counter() - start:.1f}s: {choice.describe()}; image threshold "
          f"{threshold['image']:.4g}, pixel threshold {threshold['pixel']:.4g}"
          + (f"\nwarning: {choice.warning}" if choice.warning else ""))
    return calibration


def find_resume(resume: str, output_dir: str, verbose: bool) -> Optional[Path]:
    """The checkpoint to resume from: --resume PATH, or for 'auto' OUTPUT_DIR/checkpoint-last.pth if present."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output_dir) / "checkpoint-last.pth"
        if last.is_file():
            return last
        if verbose:
            print(f"--resume auto: no {last} yet, starting a fresh run")
        return None
    return Path(resume)


def read_resume_checkpoint(path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Read a main_train.py checkpoint and check that it belongs to this model configuration."""
    checkpoint = read_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "epoch", "args") if k not in checkpoint]
    if missing:
        raise UserError(f"--resume {path} has no {'/'.join(missing)}: it holds weights only (e.g. an official MAE "
                        f"checkpoint), not a training state; start from it with --pretrained {path} instead")
    theirs = checkpoint["args"]
    if not isinstance(theirs, dict):  # e.g. facebookresearch/mae's main_pretrain.py: an argparse.Namespace
        raise UserError(f"--resume {path} was written by another training program (its options are a "
                        f"{type(theirs).__name__}, not main_train.py's dict): it cannot continue this run; "
                        f"start from its weights with --pretrained {path} instead")
    differ = [k for k in MODEL_ARG_KEYS if _norm(theirs.get(k)) != _norm(options[k])]
    if differ:
        def describe(o):
            return ", ".join(f"{k}={_norm(o.get(k))}" for k in differ)
        raise UserError(f"--resume {path} is for another model ({describe(theirs)}) than this run ({describe(options)}): "
                        f"pass the same --model/--input_size/--lora_* options, or use another --output_dir")
    if _root(theirs.get("holdout_root")) != _root(options["holdout_root"]):
        raise UserError(f"--resume {path} calibrates on --holdout_root {theirs.get('holdout_root') or '(none)'}, "
                        f"this run on {options['holdout_root'] or '(none)'}: pass the same --holdout_root, or "
                        f"another --output_dir")
    if sorted(theirs.get("holdout_files", [])) != sorted(options["holdout_files"]):
        raise UserError(f"--resume {path} held out other images (--holdout/--seed/data changed): continuing would "
                        f"train on images it calibrates with; pass the same --holdout and --seed, or another --output_dir")
    return checkpoint


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _root(path: Optional[str]) -> Optional[Path]:
    return Path(path).resolve() if path else None


# save_atomic writes `.<name>.<random>.tmp` next to <name>, then renames it over <name>.
STALE_TEMP_GLOB = ".checkpoint-*.pth.*.tmp"


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Delete half-written checkpoints left by a run killed while saving (they never replaced a
    checkpoint: the rename is atomic) and return them. Only the main process calls this."""
    stale = sorted(output_dir.glob(STALE_TEMP_GLOB))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        warn(f"removed {len(stale)} half-written checkpoint file(s) left in {output_dir} by an interrupted run "
             f"(e.g. {stale[0].name}); the complete checkpoints are untouched")
    return stale


def trim_log(log_path: Path, start_epoch: int) -> int:
    """Keep the log.txt records of epochs before `start_epoch` (the ones the resumed checkpoint
    holds); a run killed after logging an epoch but before saving it would otherwise log it twice.
    Returns the number of lines dropped (unreadable lines, e.g. cut by a kill, are dropped too)."""
    if not log_path.is_file():
        return 0
    kept, dropped = [], 0
    for line in log_path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["epoch"]) < start_epoch
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = log_path.with_name(f".{log_path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(log_path)
    return dropped


def restore_training_state(checkpoint: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: Optional[torch.amp.GradScaler], rank: int, world_size: int) -> int:
    """Load model (strict), optimizer, scaler and this rank's RNG state; returns the next epoch."""
    try:
        model.load_state_dict(state_dict_of(checkpoint, path), strict=True)
    except RuntimeError as e:
        raise UserError(f"--resume {path}: its model tensors do not fit this model ({str(e).splitlines()[0]})") from e
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"--resume {path}: its optimizer state does not fit this run's trainable tensors; resume with "
                        f"the same --pretrained/--freeze_non_lora/--lora_* options as the original run") from e
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint.get("rng") or []
    if len(rng) == world_size:
        set_rng_state(rng[rank])
    else:
        warn(f"--resume {path}: RNG states were saved for {len(rng)} process(es), this run has {world_size}; "
             f"random streams restart from the seed, so the run will not repeat bit for bit")
    return int(checkpoint["epoch"]) + 1


# ---- evaluation -------------------------------------------------------------------------------
def epoch_record(pending: PendingEpoch) -> dict[str, float]:
    """log.txt's numbers of a trained epoch (waits for its loss; raises if it diverged)."""
    stats = pending.result()
    return {k: stats[k] for k in ("train_loss", "lr", "images_per_s")}


def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device,
                   amp_dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """Anomaly metrics of the (unwrapped) model on the test split; the model is back in train mode after."""
    scorer = AnomalyScorer(model, EVAL_NUM_MASKS, ScoringOptions.mask_pattern, ScoringOptions.sigma).to(device)
    try:
        metrics = evaluate(scorer, loader, device, amp_dtype)
    finally:
        model.train(True)
    return {k: metrics.get(k) for k in EVAL_METRICS}


# ---- main -------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    validate_args(args)
    info, device = dist_util.init_distributed(resolve_device(args.device))
    try:
        return train(args, info, device)
    finally:
        dist_util.cleanup()


def train(args: argparse.Namespace, info: dist_util.DistInfo, device: torch.device) -> int:
    """main's body inside the process group: wires the build_* helpers and runs the epochs."""
    amp_dtype = resolve_amp(args.amp, device)
    if args.compile_mode in ("reduce-overhead", "max-autotune") and device.type != "cuda":
        raise UserError(f"--compile_mode {args.compile_mode} records CUDA graphs: it needs a CUDA device; "
                        f"on {device.type} use --compile (or --compile_mode default)")
    options = resolve_options(args, info.world_size, amp_dtype, device)
    is_main, out = info.is_main, Path(options["output_dir"])
    seed_everything(args.seed + info.rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    sampler, loader = build_data(args.data_path, args.input_size, not args.no_jitter, args.batch_size,
                                 args.num_workers, args.pin_mem and device.type == "cuda", info.rank,
                                 info.world_size, args.seed, [] if args.holdout_root else options["holdout_files"],
                                 args.data_on_device, device)
    resume_path = find_resume(args.resume, options["output_dir"], is_main)
    checkpoint = read_resume_checkpoint(resume_path, options) if resume_path else None
    model = build_model(args.model, args.input_size, args.norm_pix_loss, args.lora_rank, options["lora_alpha"],
                        args.lora_dropout, options["lora_targets"], args.pretrained, args.patch_embed_init,
                        args.freeze_non_lora, verbose=is_main, amp_dtype=amp_dtype).to(device)
    optimizer = build_optimizer(model, options["lr"], args.weight_decay, device)
    scaler = build_scaler(amp_dtype, device)
    start_epoch = args.start_epoch
    if checkpoint is not None:
        start_epoch = restore_training_state(checkpoint, resume_path, model, optimizer, scaler, info.rank, info.world_size)
        if is_main:
            print(f"resumed from {resume_path} (epoch {start_epoch - 1} done)")
        del checkpoint
    if start_epoch >= args.epochs:
        if is_main:
            print(f"nothing to do: epoch {start_epoch} >= --epochs {args.epochs} (raise --epochs to continue)")
        return 0
    train_model = wrap_model(model, device, info.enabled, args.compile, args.compile_mode)
    eval_loader = None
    if args.eval_every and is_main:
        eval_loader = build_eval_loader(args.data_path, args.input_size, args.batch_size, args.num_workers)

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        if resume_path is not None and trim_log(out / "log.txt", start_epoch):
            print(f"log.txt: dropped the records of epochs {start_epoch}+ written after {resume_path.name} was saved")
        (out / "args.json").write_text(json.dumps(options, indent=2) + "\n")
        n_held = len(options["holdout_files"])
        held = f"{n_held} held out for calibration" if not args.holdout_root else \
            f"calibration on the {n_held} images in {Path(args.holdout_root) / 'train' / 'good'}"
        where = "resident on the device" if isinstance(loader, DeviceBatches) else f"{args.num_workers} loader workers"
        print(f"training {args.model} on {len(loader.dataset)} images ({held}; {where}), "
              f"{info.world_size} process(es) on {device}, amp {options['amp_dtype']}, lr {options['lr']:.3e} "
              f"(effective batch {options['eff_batch_size']}), epochs {start_epoch}..{args.epochs - 1}")
    logger = RunLogger(out, options["log_dir"], enabled=is_main, wandb_name=args.wandb_name, config=options)
    start = time.perf_counter()
    waiting = None  # (epoch, PendingEpoch) whose record is logged once the next epoch is queued
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            pending = train_one_epoch(
                train_model, loader, optimizer, device=device, epoch=epoch, epochs=args.epochs,
                base_lr=options["lr"], min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
                mask_ratio=args.train_mask_ratio, accum_iter=args.accum_iter, amp_dtype=amp_dtype, scaler=scaler,
                print_freq=args.print_freq, show_progress=is_main, defer_read=True)
            if waiting is not None:  # read while the device runs this epoch: no stall between epochs
                logger.log_epoch(waiting[0], epoch_record(waiting[1]))
            last = epoch + 1 == args.epochs
            evaluate_now = bool(args.eval_every) and ((epoch + 1) % args.eval_every == 0 or last)
            numbered = args.save_every > 0 and epoch % args.save_every == 0
            waiting = None if evaluate_now or numbered or last else (epoch, pending)
            if waiting is not None:
                continue
            record = epoch_record(pending)  # a checkpoint or an evaluation waits for this epoch's loss check
            if evaluate_now:
                if eval_loader is not None:  # rank 0 only
                    record.update(evaluate_model(model, eval_loader, device, amp_dtype))
                dist_util.barrier()  # the other ranks wait for rank 0's evaluation
            logger.log_epoch(epoch, record)
            if numbered or last:
                rng = dist_util.all_gather_objects(rng_state())  # every rank's streams, for an exact resume
                if is_main:
                    calibration = calibrate(model, args.holdout_root or args.data_path, options["holdout_files"],
                                            device, amp_dtype,
                                            args.batch_size, args.seed) if last and options["holdout_files"] else None
                    ckpt = make_checkpoint(model, optimizer, scaler, epoch, options, rng, calibration)
                    if numbered:
                        save_atomic(ckpt, out / f"checkpoint-{epoch}.pth")
                    save_atomic(ckpt, out / "checkpoint-last.pth")
    finally:
        logger.close()
    if info.enabled:
        fingerprint = dist_util.check_replicas_in_sync(model)
        if is_main:
            print(f"replica check: all {info.world_size} processes hold identical parameters (fingerprint {fingerprint})")
    if is_main:
        print(f"done in {time.perf_counter() - start:.1f}s; checkpoints in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
