"""The learning-rate schedule: linear warmup, half-cycle cosine to min_lr."""
import math

import pytest
import torch

from util.lr_sched import lr_at, set_lr

BASE, MIN, WARMUP, EPOCHS = 1e-3, 1e-5, 10, 110


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),
    (2.5, 2.5e-4),  # per-iteration warmup: a fractional epoch gets its share
    (5.0, 5e-4),
    (9.9, 9.9e-4),
    (10.0, 1e-3),  # end of warmup = base lr (cosine at progress 0)
    (35.0, 1e-5 + 0.99e-3 * 0.5 * (1 + math.sqrt(0.5))),  # progress 1/4: cos(pi/4)
    (60.0, 1e-5 + 0.99e-3 * 0.5),  # halfway through the cosine
    (85.0, 1e-5 + 0.99e-3 * 0.5 * (1 - math.sqrt(0.5))),  # progress 3/4
    (110.0, 1e-5),  # the end: min_lr
    (500.0, 1e-5),  # past the end it stays at min_lr
])
def test_values_at_hand_computed_points(epoch, expected):
    assert lr_at(epoch, BASE, MIN, WARMUP, EPOCHS) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_is_linear_and_cosine_decreases_to_min():
    steps = [i / 8 for i in range(8 * EPOCHS + 1)]
    lrs = [lr_at(e, BASE, MIN, WARMUP, EPOCHS) for e in steps]
    warm = [lr for e, lr in zip(steps, lrs) if e <= WARMUP]
    diffs = [b - a for a, b in zip(warm, warm[1:])]
    assert max(diffs) - min(diffs) < 1e-15  # constant increments: linear
    after = [lr for e, lr in zip(steps, lrs) if e >= WARMUP]
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert after[-1] == pytest.approx(MIN)
    assert min(lrs[1:]) >= 0


def test_no_warmup_and_warmup_longer_than_training():
    assert lr_at(0, BASE, 0.0, 0, 10) == BASE  # no warmup: starts at the base lr
    assert lr_at(10, BASE, 0.0, 0, 10) == pytest.approx(0.0, abs=1e-18)
    assert lr_at(3, BASE, 0.0, 5, 4) == pytest.approx(BASE * 3 / 5)  # still warming up when training ends
    assert lr_at(6, BASE, 0.0, 5, 4) == BASE


def test_set_lr_writes_every_group_with_its_scale():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.5}], lr=1.0)
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.005]
