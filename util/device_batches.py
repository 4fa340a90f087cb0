"""Training batches cut from images resident on the training device: no DataLoader, no workers.

A category's training set is a few hundred images (219 at most in MVTec AD: 219 x 3 x 228 x 228
uint8 = 34 MB at 224 px), so it fits in GPU memory many times over. `DeviceBatches` keeps the
edge-padded uint8 images of a `TrainDataset` on the device and cuts each batch there: the same
indices and shifts as a DataLoader over the dataset with the same `JitteredSampler` (one plan
[n, 3] copied to the device per epoch), one gather kernel for the crops and the same
normalisation arithmetic. Nothing is read back to the host.
"""
import math
from typing import Iterator

import torch

from util.datasets import IMAGENET_MEAN, IMAGENET_STD, JitteredSampler, TrainDataset

# --data_on_device auto keeps the images on a GPU when they take at most this many bytes.
AUTO_BUDGET_BYTES = 2 << 30


def dataset_bytes(dataset: TrainDataset) -> int:
    return dataset.images.numel() * dataset.images.element_size()


def crop_batch(images: torch.Tensor, plan: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images [N, 3, S', S'] and a plan [B, 3] (index, top, left) -> float32 crops [B, 3, S, S]
    normalised with the ImageNet mean/std (util.datasets.TrainDataset's arithmetic).

    One gather (torch.take of flat indices): on the CPU 15x faster than 4-d advanced indexing."""
    index, top, left = plan.unbind(1)  # [B] each
    _, channels, height, width = images.shape
    span = torch.arange(size, device=images.device)
    rows = (top[:, None] + span) * width  # [B, S], offsets of the crop's rows
    cols = left[:, None] + span  # [B, S]
    planes = (index[:, None] * channels + torch.arange(channels, device=images.device)) * (height * width)  # [B, 3]
    flat = planes[:, :, None, None] + rows[:, None, :, None] + cols[:, None, None, :]  # [B, 3, S, S]
    crops = torch.take(images, flat)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (crops.to(torch.float32) / 255.0 - mean) / std


class DeviceBatches:
    """Iterates one epoch of float32 batches [B, 3, S, S] on `device`, like a DataLoader with
    `sampler` and `batch_size` (dropping a ragged last batch when `drop_last`); `sampler.set_epoch`
    picks the epoch, as for the DataLoader."""

    def __init__(self, dataset: TrainDataset, sampler: JitteredSampler, batch_size: int, drop_last: bool,
                 device: torch.device) -> None:
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.device = device
        self.images = dataset.images.to(device)  # [N, 3, S + 2m, S + 2m] uint8

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        plan = self.sampler.plan()  # [n, 3] int64 on the CPU
        if self.device.type == "cuda":
            plan = plan.pin_memory()  # so that the copy below does not wait for the device
        plan = plan.to(self.device, non_blocking=True)
        size = self.dataset.input_size
        for k in range(len(self)):
            yield crop_batch(self.images, plan[k * self.batch_size:(k + 1) * self.batch_size], size)
