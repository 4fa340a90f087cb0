"""Tests of util/metrics.py against scikit-learn and against brute-force references written here."""
import json
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from util.metrics import (aupro, auroc, compute_metrics, f1_max, format_metrics_table, pixel_auroc,
                          pixel_f1_max, roc_curve)

METRIC_KEYS = {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "n_images",
               "n_anomalous", "per_defect", "image_f1_threshold", "pixel_f1_threshold",
               "n_images_without_mask"}


def _random_cases():
    """(scores, labels) pairs: continuous, heavy ties, integer-valued, float32, unbalanced both ways."""
    rng = np.random.default_rng(0)
    cases = []
    for n, kind in [(50, "cont"), (200, "ties"), (120, "int"), (300, "f32"), (80, "many_pos"),
                    (7, "int"), (400, "ties")]:
        y = rng.random(n) < (0.8 if kind == "many_pos" else 0.3)
        y[0], y[1] = True, False  # both classes present
        s = rng.normal(size=n) + 0.8 * y
        if kind == "ties":
            s = np.round(s, 1)
        elif kind == "int":
            s = rng.integers(0, 5, size=n) + y * rng.integers(0, 2, size=n)
        elif kind == "f32":
            s = s.astype(np.float32)
        cases.append((s, y.astype(int)))
    return cases


def _sk_f1_max(s, y):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))
    return f1.max()


@pytest.mark.parametrize("case", range(7))
def test_auroc_roc_f1_match_sklearn(case):
    s, y = _random_cases()[case]
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = roc_curve(s, y)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf and len(thr) == len(np.unique(s)) + 1
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert trapezoid == pytest.approx(auroc(s, y), abs=1e-12)
    f1, t = f1_max(s, y)
    assert f1 == pytest.approx(_sk_f1_max(s, y), abs=1e-12)
    pred = np.asarray(s) >= t  # the returned threshold reaches the returned F1
    tp, fp, fn = (pred & (y == 1)).sum(), (pred & (y == 0)).sum(), (~pred & (y == 1)).sum()
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(f1)


def test_hand_made_auroc_f1():
    y = np.array([0, 0, 0, 1, 1])
    assert auroc([0.1, 0.2, 0.3, 0.8, 0.9], y) == 1.0
    assert auroc([0.9, 0.8, 0.7, 0.2, 0.1], y) == 0.0
    assert auroc(np.ones(5), y) == 0.5
    assert f1_max([0.1, 0.2, 0.3, 0.8, 0.9], y) == (1.0, 0.8)
    assert f1_max(np.ones(5), y) == (pytest.approx(2 * 2 / (2 * 2 + 3)), 1.0)
    fpr, tpr, _ = roc_curve(np.ones(5), y)  # one tie: a single diagonal segment
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]


def test_degenerate_inputs_raise():
    with pytest.raises(ValueError, match="one class"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="one class"):
        f1_max([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="one class"):
        roc_curve([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2, 0.3], [0, 1, -1])
    with pytest.raises(ValueError, match="length"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(maps, np.zeros((2, 8, 8), bool))
    with pytest.raises(ValueError, match="no ground-truth regions"):
        aupro(maps, np.zeros((2, 8, 8), bool))
    with pytest.raises(ValueError, match="no normal pixels"):
        aupro(maps, np.ones((2, 8, 8), bool))
    with pytest.raises(ValueError, match="shape"):
        aupro(maps, np.ones((2, 8, 7), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, np.ones((2, 8, 8), bool), fpr_limit=0.0)


# ---------------------------------------------------------------------------------------------
# pixel metrics and AUPRO
# ---------------------------------------------------------------------------------------------

def _blob_masks(rng, n, h, w):
    """Masks with several regions per image of very different sizes (single pixels to big blocks)."""
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        for _ in range(rng.integers(1, 5)):
            bh, bw = rng.integers(1, h // 2, size=2) if rng.random() < 0.5 else (1, 1)
            y0, x0 = rng.integers(0, h - bh), rng.integers(0, w - bw)
            masks[i, y0:y0 + bh, x0:x0 + bw] = True
    masks[-1] = False  # a good image
    return masks


def _brute_aupro(maps, masks, fpr_limit=0.3):
    """Explicit sweep of every distinct threshold; PRO by a loop over the regions."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    neg = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & neg).sum() / neg.sum())
        pros.append(np.mean([pred[i][r].sum() / r.sum() for i, r in regions]))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, h, w = 3, 16, 20
    masks = _blob_masks(rng, n, h, w)
    maps = (rng.random((n, h, w)) + rng.uniform(0.0, 0.8) * masks).astype(np.float32)
    if seed % 2:  # heavy ties between normal and anomalous pixels
        maps = np.round(maps * 4) / 4
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    assert n_regions >= 2
    for limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, limit) == pytest.approx(_brute_aupro(maps, masks, limit), abs=1e-3)
    # pixel metrics are the image metrics of the flattened arrays
    assert pixel_auroc(maps, masks) == pytest.approx(auroc(maps.ravel(), masks.ravel()), abs=1e-12)
    assert pixel_f1_max(maps, masks) == f1_max(maps.ravel(), masks.ravel())


def test_aupro_exact_against_brute_force_tight():
    # many images, tiny regions next to large ones; exactness beyond the 1e-3 tolerance
    rng = np.random.default_rng(42)
    masks = np.zeros((4, 12, 12), bool)
    masks[0, 1:9, 1:9] = True            # 64 pixels
    masks[0, 11, 11] = True              # 1 pixel
    masks[1, 0, 0] = masks[1, 5, 5] = True
    masks[2, 3:5, 6:12] = True
    maps = rng.random(masks.shape).astype(np.float32) + 0.3 * masks
    assert aupro(maps, masks) == pytest.approx(_brute_aupro(maps, masks), abs=1e-9)


def test_aupro_hand_made():
    rng = np.random.default_rng(1)
    masks = _blob_masks(rng, 3, 16, 16)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert aupro((~masks).astype(np.float32), masks) == pytest.approx(0.0, abs=1e-12)
    # constant map: the curve is the diagonal, area 0.3^2 / 2, normalised by 0.3
    assert aupro(np.zeros(masks.shape, np.float32), masks) == pytest.approx(0.15)
    assert pixel_auroc(np.zeros(masks.shape), masks) == 0.5
    assert pixel_auroc(masks * 1.0, masks) == 1.0
    assert pixel_f1_max(masks * 1.0, masks) == (1.0, 1.0)


def test_aupro_regions_are_8_connected():
    # (0,0),(0,1) and (1,2): (1,2) touches (0,1) only diagonally -> one region of 3 pixels
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 0, 0] = mask[0, 0, 1] = mask[0, 1, 2] = True
    amap = np.full(mask.shape, 0.5, np.float32)
    amap[mask] = 0.0
    amap[0, 1, 2] = 1.0
    # curve: (0,0) -> (0, PRO_top) -> (1, PRO_top) -> (1, 1); 8-connected: PRO_top = 1/3
    # (4-connected it would be mean(0/2, 1/1) = 0.5)
    assert aupro(amap, mask) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# compute_metrics and the table
# ---------------------------------------------------------------------------------------------

def _dataset(rng, n_good=6, n_bad=6, h=12, w=12):
    labels = np.r_[np.zeros(n_good, int), np.ones(n_bad, int)]
    defects = ["good"] * n_good + ["crack", "scratch"] * (n_bad // 2)
    masks = np.zeros((n_good + n_bad, h, w), bool)
    for i in range(n_good, n_good + n_bad):
        y0, x0 = rng.integers(0, h - 4, size=2)
        masks[i, y0:y0 + 4, x0:x0 + 3] = True
    maps = (rng.random(masks.shape) + 0.7 * masks).astype(np.float32)
    scores = maps.reshape(len(maps), -1).max(1)
    return scores, labels, defects, maps, masks


def test_compute_metrics_full():
    rng = np.random.default_rng(3)
    scores, labels, defects, maps, masks = _dataset(rng)
    m = compute_metrics(scores, labels, defects, maps, masks)
    assert set(m) == METRIC_KEYS
    json.dumps(m)  # JSON-ready
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert (m["image_f1_max"], m["image_f1_threshold"]) == f1_max(scores, labels)
    assert m["pixel_auroc"] == pytest.approx(pixel_auroc(maps, masks))
    assert (m["pixel_f1_max"], m["pixel_f1_threshold"]) == pixel_f1_max(maps, masks)
    assert m["aupro"] == pytest.approx(aupro(maps, masks))
    assert (m["n_images"], m["n_anomalous"], m["n_images_without_mask"]) == (12, 6, 0)
    assert set(m["per_defect"]) == {"crack", "scratch"}
    crack = np.array(defects) == "crack"
    sel = (labels == 0) | crack
    assert m["per_defect"]["crack"] == pytest.approx(roc_auc_score(crack[sel], scores[sel]))


def test_compute_metrics_images_without_mask_excluded():
    rng = np.random.default_rng(4)
    scores, labels, defects, maps, masks = _dataset(rng)
    has_mask = np.ones(len(labels), bool)
    has_mask[[0, 7, 8]] = False  # a good image (still counts) and two anomalous ones (excluded)
    masks[[7, 8]] = False        # their masks are unknown, i.e. empty
    maps[[7, 8]] = 0.0           # would change the pixel metrics if they were included
    m = compute_metrics(scores, labels, defects, maps, masks, has_mask=has_mask)
    keep = np.ones(len(labels), bool)
    keep[[7, 8]] = False
    assert m["n_images_without_mask"] == 2
    assert m["pixel_auroc"] == pytest.approx(pixel_auroc(maps[keep], masks[keep]))
    assert m["pixel_auroc"] != pytest.approx(pixel_auroc(maps, masks))
    assert m["aupro"] == pytest.approx(aupro(maps[keep], masks[keep]))
    assert m["pixel_f1_max"] == pixel_f1_max(maps[keep], masks[keep])[0]
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))  # image metrics use all


def test_compute_metrics_none_cases():
    rng = np.random.default_rng(5)
    scores, labels, defects, maps, masks = _dataset(rng)
    m = compute_metrics(scores, labels, defects)  # no maps: pixel metrics unavailable
    assert set(m) == METRIC_KEYS
    assert m["pixel_auroc"] is None and m["aupro"] is None and m["pixel_f1_max"] is None
    assert m["image_auroc"] is not None and m["n_images_without_mask"] == 6
    # only anomalous images: one class, image metrics and per-defect AUROCs unavailable
    bad = labels == 1
    m = compute_metrics(scores[bad], labels[bad], np.array(defects)[bad], maps[bad], masks[bad])
    assert m["image_auroc"] is None and m["image_f1_max"] is None and m["image_f1_threshold"] is None
    assert m["per_defect"] == {"crack": None, "scratch": None}
    assert m["pixel_auroc"] is not None and m["aupro"] is not None  # pixels still have both classes
    # only good images: no anomalous pixels either
    good = ~bad
    m = compute_metrics(scores[good], labels[good], np.array(defects)[good], maps[good], masks[good])
    assert m["image_auroc"] is None and m["pixel_auroc"] is None and m["aupro"] is None
    assert m["per_defect"] == {} and m["n_anomalous"] == 0
    # anomalous images all without masks: pixel metrics unavailable, image metrics fine
    m = compute_metrics(scores, labels, defects, maps, masks, has_mask=~bad)
    assert m["pixel_auroc"] is None and m["image_auroc"] is not None
    json.dumps(m)


def test_format_metrics_table():
    rng = np.random.default_rng(6)
    m = compute_metrics(*_dataset(rng))
    m["aupro"] = None
    table = format_metrics_table(m)
    for key in ("image_auroc", "pixel_auroc", "image_f1_max", "pixel_f1_max"):
        assert f"{m[key]:.4f}" in table
    for name, v in m["per_defect"].items():
        assert any(name in line and f"{v:.4f}" in line for line in table.splitlines())
    assert "n/a" in table and "12" in table
    widths = {len(line) for line in table.splitlines() if not line.startswith("per-defect")}
    assert len(widths) == 1  # aligned
    assert not math.isnan(m["image_auroc"])
