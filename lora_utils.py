"""LoRA adapters (loralib) on the transformer linears: injection, freezing, merging, adapter files.

Base tensors keep their original keys (`blocks.0.attn.qkv.weight`), LoRA adds `...qkv.lora_A` and
`...qkv.lora_B`, so official MAE checkpoints load unchanged into a LoRA model. Layers are built with
loralib's implicit merge-on-eval switched off: merging is explicit (`merge_lora`, for inference only),
and `unmerged_state_dict` is what gets saved, so a checkpoint never double-counts the adapters.
"""
from functools import partial
from pathlib import Path

import loralib as lora
import torch
import torch.nn.functional as F
from torch import nn

from util.misc import save_atomic

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # attention in/out projections and the MLP linears
BLOCK_SCOPES = ("blocks", "decoder_blocks")


class LoRALinear(lora.Linear):
    """loralib's Linear (same tensors, same maths) with a forward that is cheaper under autocast.

    loralib computes `x W^T + b`, then `((x A^T) B^T) * scaling` and adds it in place: under autocast
    that casts x twice and makes two extra passes over the wide [..., out] result. Here x is cast
    once, the scaling is applied to the narrow [..., r] product and the sum is one addmm
    (about 6% off a bf16 mae_vit_large_patch7 training step on a CPU). Built by `inject_lora`, which
    never uses loralib's fan_in_fan_out.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            return F.linear(x, self.weight, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        result = F.linear(x, self.weight, self.bias)  # [..., out]
        update = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling  # [..., r]
        return torch.addmm(result.flatten(0, -2), update.flatten(0, -2), self.lora_B.t()).view_as(result)


def is_lora_name(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")


def inject_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: tuple[str, ...] = ("qkv", "proj"),
    scopes: tuple[str, ...] = BLOCK_SCOPES,
) -> list[str]:
    """Replace the `targets` linears inside the `scopes` block lists by `LoRALinear` layers (loralib), in place.

    alpha defaults to rank (scaling 1). The base weight and bias are copied and keep their
    requires_grad: freezing is `freeze_non_lora`'s decision, not a side effect of injection.
    Returns the names of the replaced modules.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(LORA_TARGETS)}")
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        if parent_name.split(".")[0] not in scopes:
            continue
        for child_name, child in list(parent.named_children()):
            if child_name not in targets or type(child) is not nn.Linear:
                continue
            layer = LoRALinear(
                child.in_features, child.out_features, r=rank, lora_alpha=alpha if alpha is not None else rank,
                lora_dropout=dropout, merge_weights=False, bias=child.bias is not None,
            ).to(device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(child.weight)
                if child.bias is not None:
                    layer.bias.copy_(child.bias)
            layer.weight.requires_grad_(child.weight.requires_grad)
            setattr(parent, child_name, layer)
            replaced.append(f"{parent_name}.{child_name}")
    return replaced


def lora_layers(model: nn.Module) -> dict[str, lora.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, lora.Linear) and m.r > 0}


def _delta(layer: lora.Linear) -> torch.Tensor:
    """The LoRA update B @ A * scaling, computed in fp32 and cast to the base weight's dtype."""
    return ((layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling).to(layer.weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (inference speed); returns how many were merged."""
    merged = 0
    for layer in lora_layers(model).values():
        if not layer.merged:
            layer.weight += _delta(layer)
            layer.merged = True
            merged += 1
    return merged


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> int:
    """Undo `merge_lora` (up to rounding); returns how many layers were unmerged."""
    unmerged = 0
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.weight -= _delta(layer)
            layer.merged = False
            unmerged += 1
    return unmerged


def unmerged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every base weight UNMERGED, whatever state the model is in."""
    state = model.state_dict()
    for name, layer in lora_layers(model).items():
        if layer.merged:
            key = f"{name}.weight"
            state[key] = (layer.weight - _delta(layer)).detach().to(state[key].dtype)
    return state


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16, keep_exact: bool = False) -> int:
    """Store the frozen weights and biases of every linear and convolution in `dtype`, in place.

    Only for a model that runs under autocast of that same dtype (bf16 training with a frozen base,
    or bf16 inference after `merge_lora` and `requires_grad_(False)`): autocast casts these tensors
    to `dtype` at every call anyway, so the numbers are the same and each step stops re-reading and
    re-casting every weight. Trainable tensors (LoRA, fp32 masters), norms and tokens are left alone.
    `state_dict` still returns every cast tensor under its own name in its original dtype:
    - keep_exact=False (inference): the rounded values, upcast; no extra memory.
    - keep_exact=True (training): the exact tensors as they were before the cast, kept aside on the
      host (4 bytes per cast fp32 value in CPU memory), so checkpoints hold the loaded weights bit for
      bit. `load_state_dict` (e.g. a resume) replaces those exact copies and rounds the compute copies.
    Merge LoRA before casting, not after. Returns how many tensors were cast.
    """
    cast = 0
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        original: dict[str, torch.dtype] = {}
        exact: dict[str, torch.Tensor] = {}
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if param is None or param.requires_grad or param.dtype == dtype or not param.is_floating_point():
                continue
            original[name] = param.dtype
            if keep_exact:  # on the CPU this keeps the old storage itself (no copy); from a GPU, a host copy
                exact[name] = param.detach().cpu()
            param.data = param.data.to(dtype)
            cast += 1
        if exact:
            module.register_state_dict_post_hook(partial(_exact_tensors, exact=exact))
            module.register_load_state_dict_pre_hook(partial(_replace_exact_tensors, exact=exact))
        elif original:
            module.register_state_dict_post_hook(partial(_restore_dtypes, original=original))
    return cast


def _restore_dtypes(module: nn.Module, state: dict, prefix: str, local_metadata: dict, original: dict) -> None:
    for name, dtype in original.items():
        key = prefix + name
        if key in state and state[key].dtype != dtype:
            state[key] = state[key].to(dtype)


def _exact_tensors(module: nn.Module, state: dict, prefix: str, local_metadata: dict,
                   exact: dict[str, torch.Tensor]) -> None:
    for name, tensor in exact.items():
        if prefix + name in state:
            state[prefix + name] = tensor


def _replace_exact_tensors(module: nn.Module, state: dict, prefix: str, local_metadata: dict, strict: bool,
                           missing_keys: list, unexpected_keys: list, error_msgs: list,
                           exact: dict[str, torch.Tensor]) -> None:
    for name, tensor in exact.items():
        value = state.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.shape == tensor.shape:  # a mismatch is load_state_dict's error
            exact[name] = value.detach().to("cpu", tensor.dtype, copy=True)


def freeze_non_lora(model: nn.Module, pretrained_keys: set[str]) -> None:
    """Freeze the non-LoRA parameters that were loaded from a pretrained checkpoint.

    LoRA tensors and everything that was randomly initialised (e.g. a 7x7 patch embedding, a
    decoder the checkpoint lacks) stay trainable, since freezing random weights would cripple them.
    """
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_name(name) or name not in pretrained_keys)


def parameter_table(model: nn.Module) -> str:
    """A short text table: trainable LoRA / trainable other / frozen parameter counts."""
    groups = {"trainable (LoRA)": 0, "trainable (other)": 0, "frozen": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            groups["frozen"] += param.numel()
        elif is_lora_name(name):
            groups["trainable (LoRA)"] += param.numel()
        else:
            groups["trainable (other)"] += param.numel()
    total = sum(groups.values())
    lines = [f"{'parameters':<20}{'count':>14}{'share':>8}"]
    for label, count in groups.items():
        lines.append(f"{label:<20}{count:>14,}{count / max(total, 1):>8.1%}")
    lines.append(f"{'total':<20}{total:>14,}")
    return "\n".join(lines)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable tensors (the adapters and whatever else was trained), unmerged."""
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return {k: v for k, v in unmerged_state_dict(model).items() if k in trainable}


def export_adapter(model: nn.Module, path: str | Path, args: dict | None = None, extra: dict | None = None) -> None:
    """Write an adapter file {'adapter': trainable tensors, 'args': training options, **extra}
    (`extra`: other entries of the training checkpoint that travel with it, e.g. its 'calibration')."""
    save_atomic({**(extra or {}), "adapter": adapter_state_dict(model), "args": dict(args or {})}, path)


def import_adapter(model: nn.Module, adapter: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into a model that already holds its base weights (unmerged).

    Every tensor must have a home of the same shape in the model: a mismatch means the adapter was
    trained for another model or LoRA configuration, and loading it partly would be silently wrong.
    """
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("import adapters into an unmerged model (call unmerge_lora first)")
    own = model.state_dict()
    unexpected = sorted(k for k in adapter if k not in own)
    mismatched = sorted(k for k in adapter if k in own and own[k].shape != adapter[k].shape)
    if unexpected or mismatched:
        raise ValueError(
            "adapter does not fit this model: "
            + (f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]}) " if unexpected else "")
            + (f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})" if mismatched else "")
        )
    model.load_state_dict(adapter, strict=False)
