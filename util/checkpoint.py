"""Reading checkpoints: official MAE weights (`--pretrained`) and this project's own checkpoints.

Official files (`mae_pretrain_vit_{base,large,huge}.pth`, `mae_visualize_vit_large.pth`, ...) are a
dict with key `model` holding encoder (and sometimes decoder) tensors made for 16x16 or 14x14 patches
at 224 px. Loading is loud: every tensor is either loaded, or skipped with a reason, and the model
tensors left at their initialisation are counted.
"""
import argparse
import contextlib
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_patch_embed
from torch import nn

from lora_utils import is_lora_name
from util.cli import UserError

PATCH_EMBED_INITS = ("random", "resample")
FIXED_BUFFERS = ("pos_embed", "decoder_pos_embed")  # sin-cos, rebuilt for the model's own grid

# Training options that define the architecture; a checkpoint's `args` must hold them so that
# inference can rebuild the model with no extra flags.
MODEL_ARG_KEYS = ("model", "input_size", "norm_pix_loss", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def model_kwargs_from_args(args: dict[str, Any]) -> dict[str, Any]:
    """`create_model` keyword arguments from a checkpoint's (or the command line's) options."""
    missing = [k for k in MODEL_ARG_KEYS if k not in args]
    if missing:
        raise UserError(f"checkpoint options lack {', '.join(missing)}: it was not written by main_train.py")
    return {
        "name": args["model"],
        "img_size": int(args["input_size"]),
        "norm_pix_loss": bool(args["norm_pix_loss"]),
        "lora_rank": int(args["lora_rank"]),
        "lora_alpha": args["lora_alpha"],
        "lora_dropout": float(args["lora_dropout"]),
        "lora_targets": tuple(args["lora_targets"]),
    }


_ZIP_MAGIC = b"PK\x03\x04"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
# Plain-data classes that safe loading may rebuild: checkpoints written by the official MAE training
# code (main_pretrain.py's checkpoint-*.pth) store their options as an argparse.Namespace.
_SAFE_GLOBALS = [argparse.Namespace]


def _allow_safe_globals():
    """torch.serialization.safe_globals(_SAFE_GLOBALS) where it exists (torch >= 2.5)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow(_SAFE_GLOBALS) if allow is not None else contextlib.nullcontext()


def _load_error(path: Path, head: bytes, e: BaseException) -> UserError:
    """A short, useful one-line reason for a failed torch.load (PyTorch's own text is pages long)."""
    text = " ".join(str(e).split())
    unsupported = _UNSUPPORTED_GLOBAL.search(text)
    if unsupported:
        return UserError(f"{path} holds a Python object ({unsupported.group(1)}) that safe loading "
                         f"(torch.load weights_only=True) refuses; if you trust the file, load it with "
                         f"weights_only=False in Python and re-save its tensors, e.g. "
                         f"torch.save({{'model': ckpt['model']}}, 'weights.pth')")
    if head.startswith(_ZIP_MAGIC):
        incomplete = "central directory" in text or "not a ZIP archive" in text
        if incomplete or isinstance(e, (EOFError, zipfile.BadZipFile)):
            return UserError(f"{path} looks truncated (incomplete zip archive): it was cut short while being "
                             f"written or copied; copy it again or use another checkpoint")
        return UserError(f"{path} is a zip archive but not a PyTorch checkpoint (no torch.save layout inside)")
    if isinstance(e, EOFError):
        return UserError(f"{path} looks truncated (the data ends while unpickling): it was cut short while "
                         f"being written or copied; copy it again or use another checkpoint")
    return UserError(f"{path} is not a PyTorch checkpoint (cannot unpickle); expected a file written by "
                     f"torch.save, e.g. main_train.py's checkpoint-*.pth or an official MAE .pth")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with one-line errors for a missing, truncated or foreign file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass a .pth file (e.g. {path / 'checkpoint-last.pth'})")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    if not head:
        raise UserError(f"{path} is empty (0 bytes), not a checkpoint: it was cut short while being written "
                        f"or copied; copy it again or use another checkpoint")
    try:
        with _allow_safe_globals(), warnings.catch_warnings():
            # A foreign pickle makes torch warn about its protocol before failing: one line is enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors: classified into one short line
        raise _load_error(path, head, e) from e
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def state_dict_of(checkpoint: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: its `model` entry, or the dict itself when it is a bare state dict."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no model state dict (expected a dict with key 'model' of tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    missing: list[str] = field(default_factory=list)  # model tensors left at their initialisation

    def format(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}, "
                 f"{len(self.missing)} model tensors keep their initialisation"]
        lines += [f"  skipped {k}: {reason}" for k, reason in self.skipped.items()]
        if self.missing:
            shown = ", ".join(self.missing[:6]) + (", ..." if len(self.missing) > 6 else "")
            lines.append(f"  initialised, not loaded: {shown}")
        return "\n".join(lines)


def _describe(state: dict[str, torch.Tensor]) -> str:
    """'embed dim 1024, 24 blocks, patch 16' from a state dict, for error messages."""
    dim = state["cls_token"].shape[-1] if "cls_token" in state else "?"
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    patch = state["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in state else "?"
    return f"embed dim {dim}, {depth} blocks, patch {patch}"


def load_pretrained(
    model: nn.Module, path: str | Path, patch_embed_init: str = "random", verbose: bool = True
) -> LoadReport:
    """Load official MAE (or this project's) weights into `model` wherever they fit.

    - pos_embed / decoder_pos_embed: never loaded; the model's sin-cos tables are made for its grid.
    - patch embedding of another patch size: re-initialised ('random', the original project's
      choice) or resampled to the model's patch size with timm's `resample_patch_embed`.
    - decoder_pred of another output size: re-initialised.
    - tensors the model does not have (a classifier head, ...): skipped.
    - any other shape mismatch means another model variant: an error naming both.
    Raises UserError when the file is not a checkpoint or matches no tensor at all.
    """
    if patch_embed_init not in PATCH_EMBED_INITS:
        raise ValueError(f"patch_embed_init must be one of {PATCH_EMBED_INITS}, got {patch_embed_init!r}")
    state = state_dict_of(read_checkpoint(path), path)
    own = model.state_dict()
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    mismatched = []
    proj = "patch_embed.proj.weight"
    patch = own[proj].shape[-1]
    other_patch = proj in state and state[proj].shape != own[proj].shape
    for key, value in state.items():
        if key in FIXED_BUFFERS:
            report.skipped[key] = "fixed sin-cos table, rebuilt for this model's patch grid"
        elif key not in own:
            report.skipped[key] = "not a tensor of this model"
        elif key == proj and other_patch:
            if patch_embed_init == "resample" and value.shape[:2] == own[key].shape[:2]:
                to_load[key] = resample_patch_embed(value.float(), [patch, patch]).to(own[key].dtype)
            else:
                report.skipped[key] = f"patch {value.shape[-1]}x{value.shape[-1]} != {patch}x{patch}: re-initialised"
        elif key == "patch_embed.proj.bias" and other_patch and patch_embed_init == "random":
            report.skipped[key] = "patch embedding re-initialised (--patch_embed_init random)"
        elif value.shape != own[key].shape:
            if key.startswith("decoder_pred."):
                report.skipped[key] = f"output size {tuple(value.shape)} != {tuple(own[key].shape)}: re-initialised"
            else:
                mismatched.append(key)
        else:
            to_load[key] = value
    if mismatched:
        key = mismatched[0]
        raise UserError(
            f"{path} is for another model variant ({_describe(state)}) than this one ({_describe(own)}): "
            f"{len(mismatched)} tensors differ in shape, e.g. {key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}; "
            f"pick the matching --model"
        )
    if not to_load:
        raise UserError(f"{path} matches no tensor of this model: is it an MAE checkpoint?")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load and k not in FIXED_BUFFERS and not is_lora_name(k))
    if verbose:
        print(f"pretrained weights from {path}:\n{report.format()}")
    return report
