"""Anomaly-detection metrics as plain numpy functions (image and pixel level, AUPRO).

Conventions shared by every function here:
- a higher score means "more anomalous"; a sample is predicted anomalous when score >= threshold;
- labels / masks: non-zero (True) = anomalous (positive), zero = normal (negative);
- scores may be float32 (kept as float32: comparisons are exact within one dtype) or any real dtype;
  pixel maps are processed in float32. NaN scores raise ValueError;
- a metric that needs both classes raises ValueError when one is missing; `compute_metrics` turns that
  into None (JSON null, "metric unavailable").

Everything is computed exactly (no threshold grid) and without [n_thresholds, n_pixels] arrays: the
scores of each class are sorted once and counted with binary searches, so a whole MVTec category at
1024x1024 (~130M pixels) fits in a few GB.
"""
import math
from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage

# 8-connectivity for ground-truth regions: diagonal neighbours belong to the same region.
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------

def _as_scores(scores: Any, name: str = "scores") -> np.ndarray:
    """1-D real array; float16/integer/bool inputs become float64, float32/float64 are kept."""
    s = np.asarray(scores)
    if s.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be real numbers, got dtype {s.dtype}")
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    s = s.reshape(-1)
    if s.size and np.isnan(s.min()):  # min propagates NaN: no full-size temporary
        raise ValueError(f"{name} contain NaN")
    return s


def _as_binary_labels(labels: Any, n: int) -> np.ndarray:
    """1-D bool array of length n from bool or 0/1 labels (anything else is an error)."""
    y = np.asarray(labels).reshape(-1)
    if y.size != n:
        raise ValueError(f"scores and labels differ in length: {n} vs {y.size}")
    if y.dtype != bool:
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be 0/1 or bool (unknown labels cannot be scored)")
        y = y.astype(bool)
    return y


def _split_sorted(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending sorted copies of the positive and the negative scores; ValueError if a class is empty."""
    pos = np.sort(scores[positive])
    neg = np.sort(scores[~positive])
    _require_both(pos.size, neg.size)
    return pos, neg


def _require_both(n_pos: int, n_neg: int) -> None:
    if n_pos == 0 or n_neg == 0:
        which = "anomalous (positive)" if n_pos == 0 else "normal (negative)"
        raise ValueError(f"only one class present: no {which} samples, the metric is undefined")


def _check_maps_masks(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """[N, H, W] maps and [N, H, W] masks (a single [H, W] pair is accepted); no copies made."""
    maps = np.asarray(anomaly_maps)
    gts = np.asarray(masks)
    if maps.ndim == 2:
        maps, gts = maps[None], gts[None]
    if maps.ndim != 3:
        raise ValueError(f"anomaly_maps must be [N, H, W], got shape {maps.shape}")
    if maps.shape != gts.shape:
        raise ValueError(f"anomaly_maps {maps.shape} and masks {gts.shape} differ in shape")
    if maps.dtype.kind not in "fiub":
        raise ValueError(f"anomaly_maps must be real numbers, got dtype {maps.dtype}")
    return maps, gts


class _PixelData:
    """Sorted pixel scores of one evaluation set, shared by pixel AUROC, pixel F1 and AUPRO.

    pos: float32 [P] ascending scores of the anomalous pixels; pos_w: float64 [P] their PRO weights
    1 / (|region| * n_regions), aligned with pos; neg: float32 [Q] ascending scores of the normal
    pixels. Built image by image so the only full-size buffers are these (one float32 copy of the maps).
    """

    def __init__(self, anomaly_maps: Any, masks: Any) -> None:
        maps, gts = _check_maps_masks(anomaly_maps, masks)
        n_img = maps.shape[0]
        n_pos = int(np.count_nonzero(gts))
        n_neg = gts.size - n_pos
        self.neg = np.empty(n_neg, dtype=np.float32)
        pos = np.empty(n_pos, dtype=np.float32)
        inv_size = np.empty(n_pos, dtype=np.float64)  # 1 / |region| of each anomalous pixel
        self.n_regions = 0
        o_pos = o_neg = 0
        for i in range(n_img):
            m = np.asarray(maps[i], dtype=np.float32)
            if m.size and np.isnan(m.min()):
                raise ValueError(f"anomaly map {i} contains NaN")
            g = gts[i] != 0
            k = int(np.count_nonzero(g))
            if k:
                regions, n = ndimage.label(g, structure=_STRUCTURE_8)  # [H, W] int32, 0 = background
                sizes = np.bincount(regions.ravel(), minlength=n + 1).astype(np.float64)
                pos[o_pos:o_pos + k] = m[g]
                inv_size[o_pos:o_pos + k] = 1.0 / sizes[regions[g]]  # same row-major order as m[g]
                self.n_regions += n
                o_pos += k
            ng = m.size - k
            self.neg[o_neg:o_neg + ng] = m[~g]
            o_neg += ng
        order = np.argsort(pos, kind="stable")
        self.pos = pos[order]
        del pos
        self.pos_w = inv_size[order]
        del inv_size, order
        if self.n_regions:
            self.pos_w /= self.n_regions
        self.neg.sort()


# ----------------------------------------------------------------------------------------------
# image-level (1-D) metrics
# ----------------------------------------------------------------------------------------------

def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC curve: one point per distinct score, plus the origin.

    thresholds: the distinct scores in decreasing order, preceded by +inf. For threshold t,
    tpr(t) = #{positives with score >= t} / #positives, fpr(t) = #{negatives with score >= t} /
    #negatives; ties are handled by giving all samples with the same score one point (the curve
    moves diagonally across a tie). The first point (t = +inf) is (0, 0), the last (1, 1).
    Returns (fpr, tpr, thresholds), float64 arrays of equal length.
    Raises ValueError when only one class is present.
    """
    s = _as_scores(scores)
    y = _as_binary_labels(labels, s.size)
    n_pos = int(np.count_nonzero(y))
    _require_both(n_pos, s.size - n_pos)
    order = np.argsort(s, kind="stable")[::-1]  # descending
    s_sorted = s[order]
    tps = np.cumsum(y[order], dtype=np.int64)
    fps = np.arange(1, s.size + 1, dtype=np.int64) - tps
    # last index of every run of equal scores
    last = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1]
    fpr = np.r_[0.0, fps[last] / (s.size - n_pos)]
    tpr = np.r_[0.0, tps[last] / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last].astype(np.float64)]
    return fpr, tpr, thresholds


def _auroc_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC from ascending sorted positive and negative scores (same dtype), exact.

    The trapezoid area under the ROC curve equals P(pos > neg) + 0.5 * P(pos == neg) over all
    (positive, negative) pairs (Mann-Whitney U with ties counted half); counted with binary searches
    of the smaller group into the larger one, in integers, so the only rounding is the final division.
    """
    if pos.size <= neg.size:
        left = np.searchsorted(neg, pos, side="left")    # negatives < each positive
        right = np.searchsorted(neg, pos, side="right")  # negatives <= each positive
    else:
        # count from the negatives' side: positives > s = P - right, positives == s = right - left
        l_ = np.searchsorted(pos, neg, side="left")
        r_ = np.searchsorted(pos, neg, side="right")
        left = pos.size - r_   # per negative: positives strictly above it
        right = left + (r_ - l_)
    wins = int(left.sum(dtype=np.int64))              # pairs with pos > neg
    ties = int((right - left).sum(dtype=np.int64))    # pairs with pos == neg
    return (2 * wins + ties) / (2 * pos.size * neg.size)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of `roc_curve`, by the trapezoid rule (= sklearn.roc_auc_score).

    Computed without building the curve as the equivalent pair count
    AUROC = (#{(p, n): s_p > s_n} + 0.5 * #{(p, n): s_p == s_n}) / (#pos * #neg).
    1.0: every anomalous sample scores above every normal one; 0.5: chance or constant scores.
    Raises ValueError when only one class is present.
    """
    s = _as_scores(scores)
    y = _as_binary_labels(labels, s.size)
    return _auroc_sorted(*_split_sorted(s, y))


def _f1_max_sorted(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """F1-max from ascending sorted scores. Only thresholds equal to a positive score can be optimal
    (lowering a threshold past negatives alone only adds false positives), so only those are tried."""
    cand = np.unique(pos)[::-1]  # distinct positive scores, descending
    tp = pos.size - np.searchsorted(pos, cand, side="left")  # positives >= t
    fp = neg.size - np.searchsorted(neg, cand, side="left")  # negatives >= t
    f1 = 2.0 * tp / (tp + fp + pos.size)                     # 2TP / (2TP + FP + FN)
    best = int(np.argmax(f1))  # first maximum = highest threshold among equal F1 values
    return float(f1[best]), float(cand[best])


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """Maximum F1 score over all thresholds, and the threshold reaching it.

    For threshold t a sample is predicted anomalous when score >= t; F1(t) = 2TP / (2TP + FP + FN).
    Every distinct score is a candidate threshold (the maximum is always reached at the score of an
    anomalous sample). On equal F1 the highest threshold is returned.
    Returns (f1, threshold). Raises ValueError when only one class is present.
    """
    s = _as_scores(scores)
    y = _as_binary_labels(labels, s.size)
    return _f1_max_sorted(*_split_sorted(s, y))


def threshold_metrics(scores: Any, labels: Any, threshold: float) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of the decision score >= threshold (1 = anomalous).

    precision = TP / (TP + FP) (0 when nothing is predicted anomalous), recall = TP / (TP + FN)
    (0 when there is no anomalous sample), F1 = 2TP / (2TP + FP + FN) (0 when that is 0/0),
    accuracy = (TP + TN) / N. Works for image scores or flattened pixel maps alike.
    """
    s = _as_scores(scores)
    y = _as_binary_labels(labels, s.size).astype(bool)
    pred = s >= threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0, "accuracy": (tp + tn) / s.size}


# ----------------------------------------------------------------------------------------------
# pixel-level metrics
# ----------------------------------------------------------------------------------------------

def pixel_auroc(anomaly_maps: Any, masks: Any) -> float:
    """AUROC over all pixels of all images: `auroc(maps.ravel(), masks.ravel() != 0)`, in float32.

    anomaly_maps: [N, H, W] (or [H, W]) real; masks: same shape, bool or 0/1 (non-zero = anomalous).
    Raises ValueError when there are no anomalous or no normal pixels.
    """
    maps, gts = _check_maps_masks(anomaly_maps, masks)
    data = _PixelData(maps, gts)
    _require_both(data.pos.size, data.neg.size)
    return _auroc_sorted(data.pos, data.neg)


def pixel_f1_max(anomaly_maps: Any, masks: Any) -> tuple[float, float]:
    """F1-max over all pixels of all images: `f1_max(maps.ravel(), masks.ravel() != 0)`, in float32.

    Returns (f1, threshold). Raises ValueError when there are no anomalous or no normal pixels.
    """
    maps, gts = _check_maps_masks(anomaly_maps, masks)
    data = _PixelData(maps, gts)
    _require_both(data.pos.size, data.neg.size)
    return _f1_max_sorted(data.pos, data.neg)


def _aupro_sorted(data: _PixelData, fpr_limit: float) -> float:
    """AUPRO from `_PixelData`; see `aupro` for the definition.

    The PRO/FPR curve (one point per distinct score, from (0, 0)) is piecewise linear and PRO only
    changes where FPR is constant or jumps together with it, so its trapezoid area is a sum over the
    distinct normal scores v (descending) of the segment from (F_gt(v), P_gt(v)) to
    (F_ge(v), P_ge(v)), where F_gt(v) = #{neg > v} / Q, P_gt(v) = sum of PRO weights of anomalous
    pixels > v (F_ge, P_ge likewise with >=). A full segment has area
    count(v) / Q * (P_gt(v) + P_ge(v)) / 2, i.e. each normal pixel s contributes
    (P_gt(s) + P_ge(s)) / (2Q); summed the other way round this is
    sum_p w_p * (#{neg s < p} + #{neg s <= p}) / (2Q) over the anomalous pixels p: binary searches
    of the (sorted) anomalous scores into the sorted normal scores. The one segment crossing
    fpr_limit (the tie run of the v* at rank ceil(fpr_limit * Q)) is cut by linear interpolation.
    """
    pos, w, neg = data.pos, data.pos_w, data.neg
    q = neg.size
    # v*: the normal score whose segment reaches fpr_limit (ascending index of the
    # ceil(L*Q)-th largest normal score)
    # (if fpr_limit * q rounds up past an exact integer, v* is one rank later and its segment starts at
    # fpr_limit, adding nothing: still exact)
    m = min(max(math.ceil(fpr_limit * q), 1), q)
    v_star = neg[q - m]
    r_star = int(np.searchsorted(neg, v_star, side="right"))  # normal pixels <= v*
    l_star = int(np.searchsorted(neg, v_star, side="left"))   # normal pixels < v*
    n_gt, c_eq = q - r_star, r_star - l_star                  # normal pixels > v*, == v*
    # full segments: every normal pixel s > v*
    cnt_le = np.searchsorted(neg, pos, side="right") - r_star  # #{v* < s <= p} (may be < 0)
    cnt_lt = np.searchsorted(neg, pos, side="left") - r_star   # #{v* < s <  p}
    np.maximum(cnt_le, 0, out=cnt_le)
    np.maximum(cnt_lt, 0, out=cnt_lt)
    area = float(np.dot(w, cnt_le + cnt_lt)) / (2.0 * q)
    # the segment of v*, cut at fpr_limit
    f_gt, f_ge = n_gt / q, (n_gt + c_eq) / q
    p_gt = float(w[np.searchsorted(pos, v_star, side="right"):].sum())
    p_ge = float(w[np.searchsorted(pos, v_star, side="left"):].sum())
    dx = min(fpr_limit, f_ge) - f_gt
    if dx > 0:
        r = dx / (f_ge - f_gt)
        area += dx * (p_gt + 0.5 * r * (p_ge - p_gt))
    return area / fpr_limit


def aupro(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap (PRO) curve up to a false positive rate, normalised to [0, 1].

    Regions are the connected components (8-connectivity) of each image's ground-truth mask. For a
    threshold t:
      PRO(t) = mean over ALL regions of all images of (#pixels of the region with map >= t) / |region|
      FPR(t) = #{pixels with mask == 0, over all images, with map >= t} / #{pixels with mask == 0}
    The curve has one point per distinct map value, starts at (0, 0) (t = +inf) and is linear between
    points. AUPRO = (integral of PRO dFPR from 0 to fpr_limit, with the curve linearly interpolated
    at fpr_limit) / fpr_limit. 1.0: every region pixel scores above every normal pixel.
    Computed exactly from sorted float32 scores (see `_aupro_sorted`), memory ~ one float32 copy of
    the maps plus 16 bytes per anomalous pixel.

    anomaly_maps: [N, H, W] (or [H, W]) real; masks: same shape, bool or 0/1 (non-zero = anomalous).
    Raises ValueError if there are no regions, no normal pixels, or fpr_limit is not in (0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps, gts = _check_maps_masks(anomaly_maps, masks)
    data = _PixelData(maps, gts)
    if data.n_regions == 0:
        raise ValueError("no ground-truth regions (all masks empty): AUPRO is undefined")
    if data.neg.size == 0:
        raise ValueError("no normal pixels (all masks full): AUPRO is undefined")
    return _aupro_sorted(data, fpr_limit)


# ----------------------------------------------------------------------------------------------
# everything metrics.json holds
# ----------------------------------------------------------------------------------------------

def _or_none(fn, *a) -> Any:
    try:
        return fn(*a)
    except ValueError:
        return None


def compute_metrics(scores: Sequence[float], labels: Sequence[int], defects: Sequence[str],
                    anomaly_maps: Optional[Any] = None, masks: Optional[Any] = None,
                    has_mask: Optional[Sequence[bool]] = None,
                    fpr_limit: float = 0.3) -> dict[str, Any]:
    """All metrics of metrics.json (see INTERFACE.md) for one labelled test set.

    scores: [N] image anomaly scores; labels: [N] 0 (good) / 1 (anomalous); defects: [N] defect names
    (e.g. 'good', 'crack'; only the anomalous images' names are used). anomaly_maps: [N, H, W] and
    masks: [N, H, W] (non-zero = anomalous; good images' masks are all zero); has_mask: [N] bool,
    whether the image's mask came from a file (default: all True when masks are given).

    Returns a JSON-ready dict (Python floats/ints, None = unavailable):
      image_auroc, image_f1_max, image_f1_threshold   from scores/labels; None if only one class.
      pixel_auroc, pixel_f1_max, pixel_f1_threshold, aupro (up to FPR fpr_limit, in [0, 1])
          over the pixels of the good images and of the anomalous images that have a mask file
          (anomalous images without one are excluded: their pixels' truth is unknown). None when
          maps or masks are missing, or the evaluated pixels have no anomalous or no normal pixel.
      n_images, n_anomalous, n_images_without_mask (anomalous images excluded from pixel metrics).
      per_defect: {defect: AUROC of that defect's images against all good images}, sorted by name;
          values None when there are no good images.
    """
    s = _as_scores(scores)
    y = _as_binary_labels(labels, s.size)
    defects = [str(d) for d in defects]
    if len(defects) != s.size:
        raise ValueError(f"scores and defects differ in length: {s.size} vs {len(defects)}")
    have_pixels = anomaly_maps is not None and masks is not None
    if has_mask is None:
        hm = np.full(s.size, have_pixels, dtype=bool)
    else:
        hm = np.asarray(has_mask, dtype=bool).reshape(-1)
        if hm.size != s.size:
            raise ValueError(f"scores and has_mask differ in length: {s.size} vs {hm.size}")

    out: dict[str, Any] = {}
    out["image_auroc"] = _or_none(auroc, s, y)
    f1 = _or_none(f1_max, s, y)
    out["image_f1_max"], out["image_f1_threshold"] = f1 if f1 is not None else (None, None)

    out["pixel_auroc"] = out["pixel_f1_max"] = out["pixel_f1_threshold"] = out["aupro"] = None
    if have_pixels:
        maps, gts = _check_maps_masks(anomaly_maps, masks)
        if maps.shape[0] != s.size:
            raise ValueError(f"{maps.shape[0]} anomaly maps for {s.size} scores")
        keep = ~y | hm
        if not keep.all():  # copies only the kept images (arrays stay untouched when all are kept)
            maps, gts = maps[keep], gts[keep]
        if maps.shape[0]:
            data = _PixelData(maps, gts)
            if data.pos.size and data.neg.size:
                out["pixel_auroc"] = _auroc_sorted(data.pos, data.neg)
                out["pixel_f1_max"], out["pixel_f1_threshold"] = _f1_max_sorted(data.pos, data.neg)
                out["aupro"] = _aupro_sorted(data, fpr_limit)

    out["n_images"] = int(s.size)
    out["n_anomalous"] = int(np.count_nonzero(y))
    out["n_images_without_mask"] = int(np.count_nonzero(y & ~hm))
    good = s[~y]
    per_defect: dict[str, Optional[float]] = {}
    for name in sorted({d for d, lab in zip(defects, y) if lab}):
        sel = np.array([d == name for d in defects]) & y
        per_defect[name] = _or_none(auroc, np.r_[good, s[sel]],
                                    np.r_[np.zeros(good.size, bool), np.ones(int(sel.sum()), bool)])
    out["per_defect"] = per_defect
    return out


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """Small aligned text table of a `compute_metrics` dict: overall metrics, then per-defect AUROC.

    Values are printed with 4 decimals; None (unavailable) as 'n/a'.
    """
    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(int(v))
        return f"{float(v):.4f}"

    rows = [(label, metrics.get(key)) for key, label in (
        ("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR<=0.3)"),
        ("image_f1_max", "image F1-max"), ("pixel_f1_max", "pixel F1-max"),
        ("n_images", "images"), ("n_anomalous", "anomalous images"),
        ("n_images_without_mask", "anomalous without mask")) if key in metrics]
    per_defect = metrics.get("per_defect") or {}
    rows_defect = [(f"  {name}", v) for name, v in per_defect.items()]
    width = max(len(r[0]) for r in rows + rows_defect + [("per-defect image AUROC", None)])
    lines = [f"{label:<{width}}  {fmt(v):>8}" for label, v in rows]
    if rows_defect:
        lines.append("per-defect image AUROC")
        lines += [f"{label:<{width}}  {fmt(v):>8}" for label, v in rows_defect]
    return "\n".join(lines)
