"""No step of the training loop and no scoring batch reads the device back on the host.

CUDA's sync debug mode (scripts/gpu_check.py counts with it on a GPU) does not exist on the CPU, so
a spy stands in: every host read of a tensor (`item`, `tolist`, `numpy`, `bool`/`float`/`int`,
`cpu`) is counted while the loops run. On the CPU, util.host_reads.HostRead queues its copy with
`.cpu()` (on CUDA: a non-blocking copy into pinned memory), so `cpu` counts queued copies.
"""
import contextlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import engine
import main_train
from engine import run_inference, train_one_epoch
from util.cli import UserError
from util.host_reads import HostRead

from test_engine_infer import TinyTestSet, _scorer

pytestmark = pytest.mark.usefixtures("one_thread")
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "cpu")


@contextlib.contextmanager
def spy_reads(monkeypatch):
    """Count host reads of tensors: {method: calls}."""
    counts = dict.fromkeys(READS, 0)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    try:
        yield counts
    finally:
        monkeypatch.undo()


class _Recording(torch.nn.Module):
    """The tiny MAE, recording each step's loss tensor (no read) for the comparison."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mae = main_train.create_model("mae_vit_tiny_patch7", img_size=28, lora_rank=4)
        self.losses = []

    def forward(self, imgs, mask_ratio=0.75):
        loss, pred, mask = self.mae(imgs, mask_ratio=mask_ratio)
        self.losses.append(loss.detach().clone())
        return loss, pred, mask


def _epoch(model, steps, monkeypatch, **kw):
    opt = main_train.build_optimizer(model, 1e-3, 0.001, torch.device("cpu"))  # fused AdamW, as trained
    batches = [torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(steps)]
    with spy_reads(monkeypatch) as counts:
        result = train_one_epoch(model, batches, opt, device=torch.device("cpu"), epoch=0, epochs=2, base_lr=1e-3,
                                 min_lr=0.0, warmup_epochs=0, mask_ratio=0.75, show_progress=False, **kw)
    return result, counts


def test_training_steps_read_nothing_and_the_epoch_reads_once(monkeypatch):
    model = _Recording()
    pending, counts = _epoch(model, 6, monkeypatch, print_freq=100, defer_read=True)
    assert counts.pop("cpu") == 1  # the epoch's values queued once
    assert sum(counts.values()) == 0  # six steps, no read at all
    with spy_reads(monkeypatch) as counts:
        stats = pending.result()
    assert counts["tolist"] == 1 and sum(counts.values()) == 1
    assert stats["steps"] == 6
    assert stats["train_loss"] == pytest.approx(float(torch.stack(model.losses).double().mean()), rel=1e-12)


def test_reads_do_not_grow_with_the_steps(monkeypatch):
    """Reads happen at the print points only (every print_freq steps and at the epoch end)."""
    few = _epoch(_Recording(), 2, monkeypatch, print_freq=4)[1]
    many = _epoch(_Recording(), 8, monkeypatch, print_freq=4)[1]
    assert few == {**dict.fromkeys(READS, 0), "cpu": 1, "tolist": 1}  # the epoch end
    assert many == {**dict.fromkeys(READS, 0), "cpu": 2, "tolist": 2}  # the print point at step 4, the epoch end


def test_reported_losses_are_the_running_means_of_the_step_losses(monkeypatch):
    model = _Recording()
    reports = []
    monkeypatch.setattr(engine.Progress, "report", lambda self, step, loss, lr, ips: reports.append((step, loss)))
    stats = train_one_epoch(model, [torch.randn(2, 3, 28, 28) for _ in range(7)],
                            main_train.build_optimizer(model, 1e-3, 0.0, torch.device("cpu")),
                            device=torch.device("cpu"), epoch=0, epochs=1, base_lr=1e-3, min_lr=0.0,
                            warmup_epochs=0, mask_ratio=0.75, print_freq=3)
    losses = torch.stack(model.losses).double()
    assert [s for s, _ in reports] == [3, 6, 7]  # each print point, reported one interval later at the latest
    for step, loss in reports:
        assert loss == pytest.approx(float(losses[:step].mean()), rel=1e-12)
    assert stats["train_loss"] == pytest.approx(float(losses.mean()), rel=1e-12)


def test_a_non_finite_loss_is_found_at_the_deferred_read():
    class Nan(torch.nn.Module):
        """loss NaN for a batch of positive images."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, imgs, mask_ratio=0.75):
            loss = (self.w * imgs).mean()
            return (loss * float("nan") if imgs[0, 0] > 0 else loss), None, None

    model = Nan()
    batches = [-torch.ones(1, 2), torch.ones(1, 2), -torch.ones(1, 2)]
    pending = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"),
                              epoch=3, epochs=5, base_lr=0.1, min_lr=0.0, warmup_epochs=0, mask_ratio=0.75,
                              show_progress=False, defer_read=True)
    with pytest.raises(UserError, match="epoch 3, step 1"):
        pending.result()


def test_scoring_reads_one_copy_per_batch_and_yields_a_batch_after_the_next_is_queued(monkeypatch):
    scorer = _scorer().eval()
    calls = []
    real_forward = type(scorer).forward
    monkeypatch.setattr(type(scorer), "forward", lambda self, imgs: (calls.append(len(imgs)), real_forward(self, imgs))[1])
    loader = list(DataLoader(TinyTestSet(n=7), batch_size=2))  # collated up front: the loader's own seed draw is no device read
    seen = []
    with spy_reads(monkeypatch) as counts:
        for result in run_inference(scorer, loader, torch.device("cpu"), None):
            seen.append((len(result.scores), len(calls)))
    assert counts["cpu"] == 4 and sum(counts.values()) == 4  # one transfer per batch, nothing else
    # batch k comes out once batch k+1 is on its way (the last one when the loader is exhausted)
    assert seen == [(2, 2), (2, 3), (2, 4), (1, 4)]


def test_host_read_returns_the_values():
    t = torch.arange(6.0).reshape(2, 3)
    read = HostRead(t)
    assert read.ready() and torch.equal(read.get(), t)
    np.testing.assert_array_equal(HostRead(t[:, 1]).get().numpy(), [1.0, 4.0])
