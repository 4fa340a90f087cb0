"""Learning-rate schedule: per-iteration linear warmup, then a half-cycle cosine down to min_lr (MAE)."""
import math

import torch


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The learning rate at a fractional epoch (epoch + step / steps_per_epoch).

    [0, warmup_epochs): linear from 0 to base_lr. [warmup_epochs, epochs]: cosine from base_lr to
    min_lr; past `epochs` it stays at min_lr.
    """
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:  # no room for the cosine: warmup straight into the end of training
        return base_lr
    progress = min((epoch - warmup_epochs) / (epochs - warmup_epochs), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` into every parameter group (a group's optional `lr_scale` multiplies it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
