"""The loops: one training epoch (`train_one_epoch`), batched anomaly scoring (`run_inference`,
`evaluate`) and the discriminative head's training on simulated anomalies (`train_head`). They take
named values, never the command line's `args`."""
import contextlib
import math
import time
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models_head import HEAD_INPUTS, head_maps
from util import distributed as dist_util
from util.cli import UserError
from util.datasets import IMAGENET_MEAN, IMAGENET_STD
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


# ---- the discriminative head (models_head) ----------------------------------------------------
class HeadInputs(NamedTuple):
    """What the head reads, for n images, on one device, float32 (models_head)."""
    images: torch.Tensor  # [n, 3, H, W], normalised
    reconstructions: torch.Tensor  # [n, 3, H, W]
    error_maps: dict[str, torch.Tensor]  # {error: [n, H, W]}, unsmoothed

    def select(self, index: Union[torch.Tensor, slice]) -> "HeadInputs":
        return HeadInputs(self.images[index], self.reconstructions[index],
                          {e: m[index] for e, m in self.error_maps.items()})


def head_inputs(scorer: nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: Optional[torch.dtype],
                batch_size: int = 16) -> HeadInputs:
    """The head's inputs for uint8 images [n, 3, H, W] (normalised as util.datasets does): the MAE's
    reconstructions and error maps from `scorer.error_maps` (an AnomalyScorer; models_head.HEAD_INPUTS),
    in batches of batch_size, without gradients, on `device`."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    parts = []
    for lo in range(0, images.shape[0], batch_size):
        imgs = (images[lo:lo + batch_size].to(device).float() / 255.0 - mean) / std
        with torch.no_grad(), autocast(device, amp_dtype):
            maps, reconstructions = scorer.error_maps(imgs, HEAD_INPUTS)
        parts.append(HeadInputs(imgs, reconstructions.float(), {e: m.float() for e, m in maps.items()}))
    return HeadInputs(torch.cat([p.images for p in parts]), torch.cat([p.reconstructions for p in parts]),
                      {e: torch.cat([p.error_maps[e] for p in parts]) for e in parts[0].error_maps})


class HeadEvalSet(NamedTuple):
    """Images with known anomalies and their head inputs, computed once (the MAE is frozen)."""
    inputs: HeadInputs
    labels: np.ndarray  # [n] 0/1
    masks: np.ndarray  # [n, H, W] bool
    defects: list[str]  # [n]


def head_metrics(head: nn.Module, eval_set: HeadEvalSet, image_kernel: int, device: torch.device,
                 amp_dtype: Optional[torch.dtype], batch_size: int = 16) -> dict[str, Any]:
    """`compute_metrics` of the head's maps and scores (models_head.head_maps) on an eval set; the
    head's mode is restored afterwards."""
    was_training = head.training
    head.eval()
    maps, scores = [], []
    try:
        for lo in range(0, len(eval_set.labels), batch_size):
            part = eval_set.inputs.select(slice(lo, lo + batch_size))
            with torch.no_grad(), autocast(device, amp_dtype):
                anomaly_maps, _, image_scores = head_maps(head(*part), image_kernel)
            maps.append(anomaly_maps.cpu())
            scores.append(image_scores.cpu())
    finally:
        head.train(was_training)
    return compute_metrics(torch.cat(scores).numpy(), eval_set.labels, eval_set.defects,
                           anomaly_maps=torch.cat(maps).numpy(), masks=eval_set.masks)


SELECTION_METRICS = ("image_auroc", "pixel_auroc", "aupro")


def selection_score(metrics: dict[str, Any]) -> float:
    """The held-out selection criterion: the mean of SELECTION_METRICS (a missing one counts 0)."""
    return float(np.mean([metrics.get(k) or 0.0 for k in SELECTION_METRICS]))


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Binary focal loss with soft targets t in [0, 1], mean over pixels:
    |t - sigmoid(z)|^gamma * BCE(z, t) (gamma 0: BCE; with hard targets the focal loss of Lin et al.)."""
    logits = logits.float()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return ((targets - torch.sigmoid(logits)).abs() ** gamma * bce).mean()


class SampleBuffer:
    """The most recent `capacity` simulated samples (head inputs and targets) on the device; each step
    replaces the oldest ones with fresh samples and draws its batch uniformly from those held."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.next = 0
        self.inputs: Optional[HeadInputs] = None
        self.targets: Optional[torch.Tensor] = None  # [capacity, H, W]

    def add(self, inputs: HeadInputs, targets: torch.Tensor) -> None:
        if self.inputs is None:
            def empty(t):
                return t.new_zeros((self.capacity, *t.shape[1:]))
            self.inputs = HeadInputs(empty(inputs.images), empty(inputs.reconstructions),
                                     {e: empty(m) for e, m in inputs.error_maps.items()})
            self.targets = empty(targets)
        n = targets.shape[0]
        index = (self.next + torch.arange(n, device=targets.device)) % self.capacity
        self.inputs.images[index] = inputs.images
        self.inputs.reconstructions[index] = inputs.reconstructions
        for e, m in inputs.error_maps.items():
            self.inputs.error_maps[e][index] = m
        self.targets[index] = targets
        self.next = (self.next + n) % self.capacity
        self.count = min(self.capacity, self.count + n)

    def draw(self, n: int, generator: torch.Generator) -> tuple[HeadInputs, torch.Tensor]:
        index = torch.randint(self.count, (n,), generator=generator).to(self.targets.device)
        return self.inputs.select(index), self.targets[index]


def random_crops(inputs: HeadInputs, targets: torch.Tensor, size: int, generator: torch.Generator
                 ) -> tuple[HeadInputs, torch.Tensor]:
    """One size x size window of each sample: around a random anomalous pixel (anywhere in the window)
    when the sample has one, else anywhere. size 0 or the full side: the samples as they are."""
    n, h, w = targets.shape
    if size <= 0 or size >= min(h, w):
        return inputs, targets
    tops, lefts = [], []
    for i in range(n):
        anomalous = torch.nonzero(targets[i] > 0).cpu()
        if len(anomalous):
            y, x = anomalous[torch.randint(len(anomalous), (1,), generator=generator)][0].tolist()
            dy, dx = torch.randint(size, (2,), generator=generator).tolist()
            tops.append(min(max(y - dy, 0), h - size))
            lefts.append(min(max(x - dx, 0), w - size))
        else:
            tops.append(int(torch.randint(h - size + 1, (1,), generator=generator)))
            lefts.append(int(torch.randint(w - size + 1, (1,), generator=generator)))

    def crop(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t[i, ..., y:y + size, x:x + size] for i, (y, x) in enumerate(zip(tops, lefts))])
    return HeadInputs(crop(inputs.images), crop(inputs.reconstructions),
                      {e: crop(m) for e, m in inputs.error_maps.items()}), crop(targets)


class HeadTraining(NamedTuple):
    """The result of `train_head`: the selected weights and the evidence."""
    state_dict: dict[str, torch.Tensor]  # the EMA weights at the selected step, on the CPU
    selected_step: int
    history: list[dict[str, Any]]  # one record per checked step: held-out metrics, loss, lr (and report_fn's)
    seconds: float
    samples_simulated: int


def ema_average(decay: float):
    """AveragedModel's avg_fn: the plain mean of the first 1/(1 - decay) steps, then an exponential
    moving average with `decay` (so the initial weights fade out as fast as a mean allows)."""
    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        weight = max(1.0 - decay, 1.0 / (float(num_averaged) + 1.0))
        return averaged + (current - averaged) * weight
    return average


def train_head(
    head: nn.Module,
    scorer: nn.Module,
    simulate_batch,
    holdout: HeadEvalSet,
    *,
    steps: int,
    batch_size: int,
    fresh_per_step: int,
    buffer_size: int,
    crop_size: int,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    weight_decay: float,
    ema_decay: float,
    focal_gamma: float,
    image_kernel: int,
    select_every: int,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    report_fn=None,
    report_every: int = 0,
    show_progress: bool = True,
) -> HeadTraining:
    """Train the discriminative head on simulated anomalies, the MAE inside `scorer` frozen.

    simulate_batch(n) -> util.anomaly_simulation.SimulatedBatch: n fresh samples (uint8 images and
    soft targets). Each step puts `fresh_per_step` of them (through the MAE: `head_inputs`) into a
    SampleBuffer of `buffer_size` (filled with `batch_size` before the first step), draws `batch_size`
    from it (so each sample is used about batch_size / fresh_per_step times), crops each to
    `crop_size` (`random_crops`), and makes one AdamW step on the focal loss (`focal_loss`); the
    learning rate warms up linearly over warmup_steps, then follows a cosine down to min_lr
    (util.lr_sched). An EMA of the weights (`ema_average`) is checked every `select_every` steps and at
    the last on the held-out eval set (held-out normal images with simulated anomalies: no test
    image); the EMA weights with the best `selection_score` (the later on a tie) are returned.
    report_fn(step, ema_head) -> dict, every `report_every` steps and at the last, adds its numbers to
    the history and is never read by the selection (main_train_head.py: test metrics, for reports).
    A non-finite loss raises UserError(exit_code=1).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    head.train(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    ema = torch.optim.swa_utils.AveragedModel(head, avg_fn=ema_average(ema_decay))
    buffer = SampleBuffer(max(buffer_size, batch_size))
    simulated = 0

    def add_fresh(n: int) -> None:
        nonlocal simulated
        batch = simulate_batch(n)
        buffer.add(head_inputs(scorer, batch.images, device, amp_dtype), batch.targets.to(device))
        simulated += n

    add_fresh(batch_size)
    history: list[dict[str, Any]] = []
    best: Optional[tuple[float, int, dict[str, torch.Tensor]]] = None
    loss_sum, loss_count = torch.zeros((), device=device), 0
    bar = tqdm(range(steps), desc="head", disable=not show_progress, dynamic_ncols=True, mininterval=1.0)
    try:
        for step in bar:
            step_lr = lr_at(step, lr, min_lr, warmup_steps, steps)
            set_lr(optimizer, step_lr)
            add_fresh(fresh_per_step)
            inputs, targets = random_crops(*buffer.draw(batch_size, generator), crop_size, generator)
            with autocast(device, amp_dtype):
                logits = head(*inputs)
            loss = focal_loss(logits[:, 0], targets, focal_gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update_parameters(head)
            loss_sum += loss.detach()
            loss_count += 1
            done = step + 1
            check = done % select_every == 0 or done == steps
            report = report_fn is not None and report_every > 0 and (done % report_every == 0 or done == steps)
            if not (check or report):
                continue
            mean_loss = float(loss_sum) / loss_count
            if not math.isfinite(mean_loss):
                raise UserError(f"head training diverged: non-finite loss by step {done}; try a lower --lr",
                                exit_code=1)
            record: dict[str, Any] = {"step": done, "loss": mean_loss, "lr": step_lr}
            loss_sum, loss_count = torch.zeros((), device=device), 0
            if check:
                metrics = head_metrics(ema.module, holdout, image_kernel, device, amp_dtype)
                record.update({f"holdout_{k}": metrics[k] for k in SELECTION_METRICS},
                              holdout_score=selection_score(metrics))
                if best is None or record["holdout_score"] >= best[0]:
                    best = (record["holdout_score"], done,
                            {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()})
            if report:
                record.update(report_fn(done, ema.module))
            history.append(record)
            bar.set_postfix(loss=f"{mean_loss:.4f}", held_out=f"{record.get('holdout_score', float('nan')):.3f}")
            if not show_progress:
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                      flush=True)
    finally:
        bar.close()
    return HeadTraining(best[2], best[1], history, time.perf_counter() - start, simulated)
