"""The loops: one training epoch (`train_one_epoch`) and batched anomaly scoring (`run_inference`,
`evaluate`). They take named values, never the command line's `args`."""
import contextlib
import time
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from util import distributed as dist_util
from util.cli import UserError
from util.host_reads import HostRead
from util.logger import Progress
from util.lr_sched import lr_at, set_lr
from util.metrics import compute_metrics
from util.misc import autocast


# ---- training ---------------------------------------------------------------------------------
def _accumulation_groups(num_steps: int, accum_iter: int) -> list[int]:
    """For each step of an epoch, the size of its gradient-accumulation group.

    Groups are accum_iter steps long; the last one takes whatever is left, so a partial group still
    makes one optimizer step on the mean of its losses instead of being dropped.
    """
    return [min(accum_iter, num_steps - (i // accum_iter) * accum_iter) for i in range(num_steps)]


_NO_BAD_STEP = 2**62  # exact in float64


def _queue_stats(loss_sum: torch.Tensor, count: int, first_bad: torch.Tensor) -> HostRead:
    """Every rank's loss sum and step count so far and the first non-finite step, reduced on the
    device and queued for the host ([loss_sum, count, first_bad] float64): no host sync here.

    Called on every rank at the same steps, so a divergence seen by any rank stops all of them.
    """
    totals = dist_util.all_reduce_(torch.stack([loss_sum.double(), torch.full_like(loss_sum, count, dtype=torch.float64)]))
    bad = dist_util.all_reduce_(first_bad.clone(), op="min")
    return HostRead(torch.cat([totals, bad.double().reshape(1)]))


def _read_stats(read: HostRead) -> tuple[float, int]:
    """(mean loss, first non-finite step or -1) of a `_queue_stats` read; waits for it."""
    total_loss, total_count, bad_step = read.get().tolist()
    return total_loss / max(total_count, 1.0), (-1 if int(bad_step) == _NO_BAD_STEP else int(bad_step))


class PendingEpoch:
    """An epoch's statistics on their way from the device: `result()` waits for them, raises on a
    non-finite loss and returns {'train_loss', 'lr', 'images_per_s', 'steps'}.

    Reading them one epoch later (main_train does) keeps the device busy across the epoch boundary.
    """

    def __init__(self, read: HostRead, epoch: int, num_steps: int, lr: float, images_per_s: float,
                 progress: Progress) -> None:
        self._read, self.epoch, self.num_steps = read, epoch, num_steps
        self.lr, self.images_per_s, self._progress = lr, images_per_s, progress
        self._result: Optional[dict[str, float]] = None

    def result(self) -> dict[str, float]:
        if self._result is None:
            mean_loss, bad_step = _read_stats(self._read)
            _raise_if_diverged(bad_step, self.epoch, self.num_steps)
            self._progress.report(self.num_steps, mean_loss, self.lr, self.images_per_s)
            self._result = {"train_loss": mean_loss, "lr": self.lr, "images_per_s": self.images_per_s,
                            "steps": self.num_steps}
        return self._result


def _raise_if_diverged(bad_step: int, epoch: int, num_steps: int) -> None:
    if bad_step >= 0:
        raise UserError(f"training diverged: non-finite loss at epoch {epoch}, step {bad_step} "
                        f"(of {num_steps}); try a lower --blr/--lr, more --warmup_epochs or --amp none. "
                        f"checkpoint-last.pth still holds the last good epoch", exit_code=1)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    epochs: int,
    base_lr: float,
    min_lr: float,
    warmup_epochs: float,
    mask_ratio: float,
    accum_iter: int = 1,
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    print_freq: int = 20,
    show_progress: bool = True,
    defer_read: bool = False,
) -> Union[dict[str, float], PendingEpoch]:
    """One epoch of MAE training; returns {'train_loss', 'lr', 'images_per_s', 'steps'}, or with
    `defer_read` a `PendingEpoch` whose result() gives them (the loss is then read later, while the
    device runs the next epoch).

    `model` may be wrapped (DDP, torch.compile); it is called as model(imgs, mask_ratio=...) and must
    return (loss, pred, mask). The learning rate follows `lr_at` per iteration (updated at the start
    of each accumulation group). With accum_iter > 1 gradients of accum_iter steps are summed
    (each loss divided by its group size) and DDP skips the all-reduce on the steps in between.
    `scaler` (fp16 only) scales the loss; None steps the optimizer directly.

    No step reads the device: the loss is summed and a non-finite one noted on the device; every
    print_freq steps these are queued for the host (util.host_reads) and the previous print point's
    values are read and reported, so the progress lags one print interval. A non-finite loss raises
    UserError(exit_code=1) naming the epoch and step when its values are read (at the latest by
    result()). (An fp16 `scaler` reads its overflow flag at every update: bf16 needs none.)
    """
    model.train(True)
    num_steps = len(loader)
    if num_steps == 0:
        raise UserError("the training loader yields no batch: fewer images than --batch_size per process?")
    groups = _accumulation_groups(num_steps, accum_iter)
    world_size = max(1, torch.distributed.get_world_size() if dist_util.is_initialized() else 1)
    progress = Progress(epoch, epochs, num_steps, enabled=show_progress)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    first_bad = torch.full((), _NO_BAD_STEP, device=device, dtype=torch.int64)
    lr = optimizer.param_groups[0]["lr"]
    images = 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    queued: Optional[tuple[int, float, float, HostRead]] = None  # the last print point: step, lr, img/s, values
    try:
        group_start = 0
        for step, imgs in enumerate(loader):
            if step == group_start:  # first step of an accumulation group: set this group's lr
                lr = lr_at(epoch + step / num_steps, base_lr, min_lr, warmup_epochs, epochs)
                set_lr(optimizer, lr)
            group_size = groups[step]
            is_update = step + 1 == group_start + group_size
            imgs = imgs.to(device, non_blocking=True)
            # DDP: all-reduce gradients only on the step that updates the weights.
            sync = contextlib.nullcontext() if is_update or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(device, amp_dtype):
                    loss, _, _ = model(imgs, mask_ratio=mask_ratio)
                loss_value = loss.detach().float()
                loss_sum += loss_value
                first_bad = torch.where(torch.isfinite(loss_value) | (first_bad != _NO_BAD_STEP), first_bad,
                                        torch.full_like(first_bad, step))
                loss = loss / group_size
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            if is_update:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                group_start = step + 1
            images += imgs.shape[0]
            progress.step()
            done = step + 1
            if done % print_freq == 0 or done == num_steps:
                images_per_s = images * world_size / max(time.perf_counter() - start, 1e-9)
                if queued is not None:  # the previous print point's values: long computed by now
                    mean_loss, bad_step = _read_stats(queued[3])
                    _raise_if_diverged(bad_step, epoch, num_steps)
                    progress.report(queued[0], mean_loss, queued[1], queued[2])
                queued = (done, lr, images_per_s, _queue_stats(loss_sum, done, first_bad))
        pending = PendingEpoch(queued[3], epoch, num_steps, lr, queued[2], progress)
        return pending if defer_read else pending.result()
    finally:
        progress.close()


# ---- inference --------------------------------------------------------------------------------
MASK_THRESHOLD = 0.5  # TestDataset masks are 0/1 floats; a pixel above this is anomalous


class InferenceBatch(NamedTuple):
    """The results of one batch, on the CPU."""
    scores: torch.Tensor  # [B] float32
    anomaly_maps: torch.Tensor  # [B, H, W] float32, smoothed
    reconstructions: Optional[torch.Tensor]  # [B, 3, H, W] float32 (normalised input space), or None
    meta: dict[str, Any]  # the loader's batch as it came: image, label, mask, has_mask, defect, rel_path, index
    image_maps: Optional[torch.Tensor] = None  # [B, H, W] float32, the map the scores come from, or None


def run_inference(
    scorer: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    with_reconstructions: bool = True,
    with_image_maps: bool = False,
) -> Iterator[InferenceBatch]:
    """Score every batch of `loader` (TestDataset dicts) and yield its results on the CPU.

    `scorer` (an AnomalyScorer) must already be on `device` and in the mode the caller wants: this
    generator changes no module state (`evaluate` switches to eval mode). Each batch makes exactly
    one device->host copy: scores, maps and (optionally) the image-level maps and reconstructions are
    packed into one float32 tensor on the device and split on the CPU. The copy is queued
    (util.host_reads: pinned memory, non_blocking) and a batch's results are yielded once the next
    batch is queued, so the device scores batch k+1 while the caller handles batch k and no batch
    makes a host sync. Inference mode is entered per batch and never held across a `yield`, so the
    caller's code runs outside it.
    """
    pending: Optional[tuple[HostRead, int, int, dict]] = None  # the queued batch: copy, H, W, meta
    for batch in loader:
        images = batch["image"]
        if device.type == "cuda" and not images.is_pinned():
            images = images.pin_memory()  # a pageable source would make the copy below synchronous
        imgs = images.to(device, non_blocking=True)  # [B, 3, S, S]
        with torch.inference_mode():
            with autocast(device, amp_dtype):
                out = scorer(imgs)
            n, h, w = out.anomaly_maps.shape
            parts = [out.scores.float().reshape(n, 1), out.anomaly_maps.float().reshape(n, h * w)]
            if with_image_maps:
                parts.append(out.image_maps.float().reshape(n, h * w))
            if with_reconstructions:
                parts.append(out.reconstructions.float().reshape(n, -1))
            # [B, 1 + H*W (+ H*W) (+ 3*H*W)], the one transfer
            queued = (HostRead(torch.cat(parts, dim=1)), h, w, batch)
        if pending is not None:
            yield _unpack(*pending, with_image_maps, with_reconstructions)
        pending = queued
    if pending is not None:
        yield _unpack(*pending, with_image_maps, with_reconstructions)


def _unpack(read: HostRead, h: int, w: int, meta: dict, with_image_maps: bool,
            with_reconstructions: bool) -> InferenceBatch:
    packed = read.get()  # [B, 1 + H*W (+ H*W) (+ 3*H*W)]
    n = packed.shape[0]
    scores = packed[:, 0].contiguous()
    maps = packed[:, 1:1 + h * w].reshape(n, h, w).contiguous()
    lo = 1 + h * w
    image_maps = packed[:, lo:lo + h * w].reshape(n, h, w).contiguous() if with_image_maps else None
    lo += h * w if with_image_maps else 0
    recon = packed[:, lo:].reshape(n, -1, h, w).contiguous() if with_reconstructions else None
    return InferenceBatch(scores, maps, recon, meta, image_maps)


class ScoreCollector:
    """Scores, labels, defect names and (optionally) maps and masks of a whole pass.

    Arrays are preallocated for `capacity` images when the first batch shows the map size, filled
    batch by batch and read back trimmed to the images seen; maps stay float32 ([N, H, W], 4 bytes
    a pixel), masks bool.
    """

    def __init__(self, capacity: int, keep_maps: bool = True) -> None:
        self.capacity = int(capacity)
        self.keep_maps = keep_maps
        self.count = 0
        self._scores = np.empty(self.capacity, dtype=np.float32)
        self._labels = np.empty(self.capacity, dtype=np.int64)
        self._has_mask = np.empty(self.capacity, dtype=bool)
        self._indices = np.empty(self.capacity, dtype=np.int64)
        self.defects: list[str] = []
        self.rel_paths: list[str] = []
        self._maps: Optional[np.ndarray] = None  # [capacity, H, W] float32
        self._masks: Optional[np.ndarray] = None  # [capacity, H, W] bool

    def add(self, result: InferenceBatch) -> None:
        n = result.scores.shape[0]
        lo, hi = self.count, self.count + n
        if hi > self.capacity:
            raise ValueError(f"more images than the {self.capacity} this collector was made for")
        meta = result.meta
        if self.keep_maps and self._maps is None:
            shape = (self.capacity, *result.anomaly_maps.shape[1:])
            self._maps = np.empty(shape, dtype=np.float32)
            self._masks = np.zeros(shape, dtype=bool)
        self._scores[lo:hi] = result.scores.numpy()
        self._labels[lo:hi] = np.asarray(meta["label"], dtype=np.int64)
        self._has_mask[lo:hi] = np.asarray(meta["has_mask"], dtype=bool)
        self._indices[lo:hi] = np.asarray(meta["index"], dtype=np.int64)
        self.defects.extend(str(d) for d in meta["defect"])
        self.rel_paths.extend(str(p) for p in meta["rel_path"])
        if self.keep_maps:
            self._maps[lo:hi] = result.anomaly_maps.numpy()
            self._masks[lo:hi] = np.asarray(meta["mask"]) > MASK_THRESHOLD
        self.count = hi

    @property
    def scores(self) -> np.ndarray:
        return self._scores[:self.count]

    @property
    def labels(self) -> np.ndarray:
        return self._labels[:self.count]

    @property
    def has_mask(self) -> np.ndarray:
        return self._has_mask[:self.count]

    @property
    def indices(self) -> np.ndarray:
        """Each image's index in the dataset (TestDataset's `index`)."""
        return self._indices[:self.count]

    @property
    def maps(self) -> Optional[np.ndarray]:
        return None if self._maps is None else self._maps[:self.count]

    @property
    def masks(self) -> Optional[np.ndarray]:
        return None if self._masks is None else self._masks[:self.count]

    @property
    def labelled(self) -> bool:
        return self.count > 0 and bool((self.labels >= 0).all())

    def metrics(self, anomaly_maps: Optional[np.ndarray] = None, masks: Optional[np.ndarray] = None) -> dict[str, Any]:
        """`compute_metrics` of what was collected; maps/masks default to the collected ones
        (pass others, e.g. at full resolution, to evaluate those instead)."""
        if not self.labelled:
            raise ValueError("metrics need labelled images (label 0 or 1); got unknown labels")
        maps = self.maps if anomaly_maps is None else anomaly_maps
        gts = self.masks if masks is None else masks
        return compute_metrics(self.scores, self.labels, self.defects, anomaly_maps=maps, masks=gts,
                               has_mask=self.has_mask)


def collect_error_maps(scorer: nn.Module, loader: Iterable, device: torch.device,
                       amp_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Per-pixel error maps {error: [n, H, W] float32, on the CPU, not smoothed} of every image of `loader`
    (TestDataset dicts), in loader order: the raw material of calibration (AnomalyScorer.error_maps).
    The maps stay on the device until the pass ends (a few hundred held-out images), then one copy each.

    Eval mode for the pass, every submodule's previous mode restored afterwards (as `evaluate`).
    """
    modes = {m: m.training for m in scorer.modules()}
    scorer.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in loader:
            imgs = batch["image"].to(device, non_blocking=True)
            with torch.inference_mode(), autocast(device, amp_dtype):
                maps, _ = scorer.error_maps(imgs)
            for error, m in maps.items():
                chunks.setdefault(error, []).append(m.float())  # on the device: no sync per batch
    finally:
        for module, mode in modes.items():
            module.training = mode
    return {error: torch.cat(parts).cpu() for error, parts in chunks.items()}


def _dataset_size(loader: Iterable) -> int:
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise TypeError("evaluate needs a DataLoader (its .dataset gives the number of images)")
    return len(dataset)


def evaluate(
    scorer: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
) -> dict[str, Any]:
    """Score a labelled test loader and return `compute_metrics`' dict (pixel metrics at map size).

    Puts the scorer (and the model inside it) in eval mode for the pass and restores every
    submodule's previous mode afterwards, so training can call it mid-run. Maps are kept in one
    preallocated float32 array; reconstructions are not transferred.
    """
    modes = {m: m.training for m in scorer.modules()}
    scorer.eval()
    try:
        collector = ScoreCollector(_dataset_size(loader))
        for result in run_inference(scorer, loader, device, amp_dtype, with_reconstructions=False):
            collector.add(result)
        return collector.metrics()
    finally:
        for module, mode in modes.items():
            module.training = mode
