"""The bf16 fast path scores like fp32: a briefly trained tiny model on a small synthetic texture category.

Same weights, two inference paths: fp32 (amp none) and the fast path in bf16 (merged LoRA, frozen
weights stored in bf16, autocast). Their anomaly maps must correlate at Pearson r >= 0.99 and their
image AUROCs differ by at most 0.01. A random-init model would make the AUROC comparison
meaningless (scores near chance), so the model is trained for a few dozen fp32 steps first.
"""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from benchmark import build_model, fast_anomaly, fast_scorer  # noqa: E402
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, load_rgb  # noqa: E402
from util.metrics import auroc  # noqa: E402

SIZE = 56  # an 8x8 patch grid
TRAIN_STEPS = 40


def _load(paths: list[Path]) -> torch.Tensor:
    arr = np.stack([np.asarray(load_rgb(p).resize((SIZE, SIZE)), dtype=np.float32) / 255.0 for p in paths])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)  # [N, 3, S, S]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    make_category = pytest.importorskip("make_synthetic_mvtec").make_category
    root = tmp_path_factory.mktemp("texture")
    make_category(root, seed=0, size=SIZE, n_train=48, n_test_good=12, n_per_defect=4, kind="texture")
    train = _load(sorted((root / "train" / "good").glob("*.png")))
    test_paths = sorted((root / "test").glob("*/*.png"))
    labels = np.array([p.parent.name != "good" for p in test_paths], dtype=np.int64)
    test = _load(test_paths)

    model = build_model("mae_vit_tiny_patch7", SIZE, lora_rank=8, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for _ in range(TRAIN_STEPS):  # fp32, every tensor trainable: a briefly trained MAE
        batch = train[torch.randint(len(train), (16,), generator=gen)]
        loss, _, _ = model(batch, mask_ratio=0.75)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), test, labels


def _score(model, test, amp_dtype):
    scorer = fast_scorer(copy.deepcopy(model), num_masks=4, mask_pattern="stripes", sigma=4.0, amp_dtype=amp_dtype)
    out = fast_anomaly(scorer, test, torch.device("cpu"), amp_dtype)
    return out.scores.float().numpy(), out.anomaly_maps.float().numpy()


@pytest.mark.slow
def test_bf16_maps_and_auroc_match_fp32(trained):
    model, test, labels = trained
    scores32, maps32 = _score(model, test, None)
    scores16, maps16 = _score(model, test, torch.bfloat16)
    pooled = np.corrcoef(maps32.ravel(), maps16.ravel())[0, 1]
    per_image = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps32, maps16)]
    auc32, auc16 = auroc(scores32, labels), auroc(scores16, labels)
    print(f"pooled r {pooled:.5f}, per-image r min {min(per_image):.5f}, AUROC fp32 {auc32:.4f} bf16 {auc16:.4f}")
    assert auc32 > 0.7, f"the briefly trained model should beat chance clearly (AUROC {auc32:.3f})"
    assert pooled >= 0.99
    assert np.median(per_image) >= 0.99
    assert abs(auc32 - auc16) <= 0.01
