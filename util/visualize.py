"""Pictures for people: per-image overlays, the image ROC curve and a "failures first" summary grid.

Uses matplotlib's object-oriented API on an Agg canvas (no pyplot): nothing here ever opens a window,
touches the global backend or leaks figures, whatever backend the calling process uses. Every PNG is
written atomically (a temporary file, then os.replace), so an interrupted run never leaves a
half-written picture under the final name.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from util.images import IMAGENET_MEAN, IMAGENET_STD

HEATMAP_CMAP = "jet"
HEATMAP_ALPHA = 0.5
GT_COLOR = "lime"
THRESHOLD_COLOR = "white"
# Title colours of the verdict words (util.report.VERDICTS); anything else stays black.
VERDICT_COLORS = {"ANOMALOUS": "firebrick", "normal": "darkgreen", "FALSE ALARM": "firebrick", "MISS": "firebrick"}
_DPI = 100

PathLike = Union[str, os.PathLike]


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view/copy of a numpy array or a (possibly GPU, possibly grad-tracking) torch tensor."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def denormalize(image: Any, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Undo the ImageNet normalisation: [3, H, W] tensor/array -> uint8 [H, W, 3].

    pixel = clip(x * std + mean, 0, 1) * 255, rounded to the nearest integer.
    """
    x = _to_numpy(image).astype(np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a normalised [3, H, W] image, got shape {x.shape}")
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    x = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)  # [3, H, W]
    return np.ascontiguousarray(x.transpose(1, 2, 0))           # [H, W, 3]


def _to_rgb(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] from either a uint8 [H, W, 3] picture or a normalised [3, H, W] image."""
    x = _to_numpy(image)
    if x.ndim == 3 and x.shape[-1] == 3 and x.dtype == np.uint8:
        return x
    if x.ndim == 3 and x.shape[0] == 3:
        return denormalize(x)
    raise ValueError(f"expected uint8 [H, W, 3] or normalised [3, H, W], got {x.dtype} {x.shape}")


def _to_map(x: Any) -> np.ndarray:
    """float32 [H, W] from [H, W] or [1, H, W]."""
    m = _to_numpy(x).astype(np.float32)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"expected an [H, W] map, got shape {m.shape}")
    return m


def _save_figure(fig: Figure, path: PathLike) -> Path:
    """Render fig to path atomically (parent folders created); returns the final path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")  # matplotlib picks the format from the name or `format`
    FigureCanvasAgg(fig)
    try:
        fig.savefig(tmp, format="png", dpi=_DPI)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _overlay_heatmap(ax, rgb: np.ndarray, amap: Optional[np.ndarray], vmin: float, vmax: float,
                     gt_mask: Optional[np.ndarray] = None, level: Optional[float] = None):
    """Image, heatmap (stretched to the image when sizes differ), the map's outline at `level` (a
    threshold) and the ground-truth outline; returns the heatmap's AxesImage (for a colour bar) or None."""
    h, w = rgb.shape[:2]
    ax.imshow(rgb, interpolation="nearest")
    heat = None
    if amap is not None:
        heat = ax.imshow(amap, cmap=HEATMAP_CMAP, alpha=HEATMAP_ALPHA, vmin=vmin, vmax=vmax,
                         extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
    if gt_mask is not None:
        g = (_to_map(gt_mask) > 0.5).astype(np.float32)
        if 0.0 < g.mean() < 1.0:  # an empty or full mask has no outline
            _contour(ax, g, 0.5, w, h, GT_COLOR, "-")
    if amap is not None and level is not None and amap.min() < level <= amap.max():  # else no outline
        _contour(ax, amap, level, w, h, THRESHOLD_COLOR, "--")  # over the ground truth: the verdict's reason
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    return heat


def _contour(ax, values: np.ndarray, level: float, w: int, h: int, color: str, style: str) -> None:
    """The outline of values >= level, drawn on an image of w x h pixels; the threshold's white line
    gets a dark edge so that it shows on every colour of the heatmap."""
    vh, vw = values.shape
    xs = (np.arange(vw) + 0.5) * w / vw - 0.5  # pixel centres in image coordinates
    ys = (np.arange(vh) + 0.5) * h / vh - 0.5
    edge = [patheffects.withStroke(linewidth=2.5, foreground="black")] if color == THRESHOLD_COLOR else None
    lines = ax.contour(xs, ys, values, levels=[level], colors=color, linewidths=1.2, linestyles=style)
    if edge:
        lines.set_path_effects(edge)


def _color_range(maps: Sequence[np.ndarray], vmax: Optional[float]) -> tuple[float, float]:
    """0 (or the lowest value when negative) .. vmax; a given vmax is a run's fixed scale, which
    starts at 0 for every image so that pictures stay comparable."""
    if vmax is not None:
        return 0.0, max(float(vmax), 1e-12)
    lo = min((float(m.min()) for m in maps), default=0.0)
    vmin = min(0.0, lo)  # reconstruction errors are >= 0: anchor the scale at 0
    vmax = max((float(m.max()) for m in maps), default=1.0)
    return vmin, max(float(vmax), vmin + 1e-12)


@dataclass
class HeatPanel:
    """One heatmap panel of an overlay: a map, what it is, its colour scale and its threshold."""

    anomaly_map: Any  # [H, W] (stretched to the image when its size differs)
    name: str = "anomaly map"  # the panel's title, e.g. "image map fusion-absz (verdict)"
    vmax: Optional[float] = None  # top of the colour scale (the run's; default: this map's maximum)
    threshold: Optional[float] = None  # drawn as a dashed outline where the map reaches it


def _heat_panel(fig, ax, rgb: np.ndarray, panel: HeatPanel, gt_mask: Any) -> None:
    amap = _to_map(panel.anomaly_map)
    vmin, vmax = _color_range([amap], panel.vmax)
    heat = _overlay_heatmap(ax, rgb, amap, vmin, vmax, gt_mask, panel.threshold)
    bar = fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=6)
    if panel.threshold is not None and vmin <= panel.threshold <= vmax:
        bar.ax.axhline(panel.threshold, color="black", lw=1.5, ls="--")
    ax.set_title(panel.name if panel.threshold is None else f"{panel.name}\n- - threshold {panel.threshold:.3g}",
                 fontsize=7)


def save_overlay(path: PathLike, image: Any, reconstruction: Any, anomaly_map: Any, score: float,
                 gt_mask: Any = None, vmax: Optional[float] = None,
                 title: Optional[str] = None, verdict: Optional[str] = None, normalized: Optional[float] = None,
                 map_name: str = "anomaly map", threshold: Optional[float] = None,
                 pixel_panel: Optional[HeatPanel] = None) -> Path:
    """One PNG: input | reconstruction | the verdict's map on the input [| the pixel-level map].

    image, reconstruction: normalised [3, H, W] (tensor or array) or uint8 [H, W, 3];
    reconstruction may be None (panel left out). anomaly_map: [H, W], the map the score (and the
    verdict) comes from, named `map_name`, with a colour bar from 0 to `vmax` (pass one value for a
    whole run to make pictures comparable; default: this map's range) and `threshold` (the image
    threshold) as a dashed outline: where the map reaches it, the image is judged anomalous.
    pixel_panel: a second heatmap (the localisation map, when it is another map). gt_mask: [H, W]
    (non-zero = anomalous) or None; a green outline on the heatmaps. The title holds `title` (e.g.
    the relative path), the verdict word (util.report.VERDICTS), the score and the normalised score.
    ~0.15 s at 224 px.
    """
    rgb = _to_rgb(image)
    panels = [HeatPanel(anomaly_map, map_name, vmax, threshold)] + ([pixel_panel] if pixel_panel else [])
    pictures = [("input", rgb)] + ([("reconstruction", _to_rgb(reconstruction))] if reconstruction is not None else [])
    n = len(pictures) + len(panels)
    width = 0.5 + 2.35 * n  # inches; the last 0.4 hold the colour bar's tick labels
    fig = Figure(figsize=(width, 2.75), dpi=_DPI)
    axes = fig.subplots(1, n)
    fig.subplots_adjust(left=0.01, right=1 - 0.4 / width, bottom=0.02, top=0.76, wspace=0.12)
    for ax, (name, picture) in zip(axes, pictures):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=7)
        ax.set_axis_off()
    for ax, panel in zip(axes[len(pictures):], panels):
        _heat_panel(fig, ax, rgb, panel, gt_mask)
    head = (f"{verdict}   " if verdict else "") + f"score {float(score):.4g}" + \
        (f" (normalised {normalized:.2f})" if normalized is not None else "")
    fig.suptitle(f"{title}\n{head}" if title else head, fontsize=9, fontweight="bold" if verdict else None,
                 color=VERDICT_COLORS.get(verdict, "black"))
    return _save_figure(fig, path)


def save_roc(path: PathLike, scores: Sequence[float], labels: Sequence[int],
             auroc: Optional[float] = None) -> Path:
    """Image-level ROC curve with its AUROC in the legend and the chance diagonal.

    auroc: shown in the legend (computed from scores/labels when None).
    Raises ValueError when only one class is present (the curve is undefined).
    """
    from util.metrics import auroc as _auroc, roc_curve

    fpr, tpr, _ = roc_curve(scores, labels)
    if auroc is None:
        auroc = _auroc(scores, labels)
    fig = Figure(figsize=(4.0, 4.0), dpi=_DPI)
    ax = fig.subplots()
    ax.plot(fpr, tpr, color="tab:blue", lw=1.5, label=f"AUROC = {float(auroc):.4f}")
    ax.plot([0, 1], [0, 1], color="gray", lw=1.0, ls="--", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("image ROC", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.subplots_adjust(left=0.15, right=0.96, bottom=0.12, top=0.92)
    return _save_figure(fig, path)


_ITEM_KEYS = ("image", "anomaly_map", "score", "label", "rel_path")


def _as_item(item: Any) -> dict:
    if isinstance(item, dict):
        return {k: item.get(k) for k in _ITEM_KEYS}
    return dict(zip(_ITEM_KEYS, item))


def _short(name: str, n: int = 26) -> str:
    return name if len(name) <= n else "..." + name[-(n - 3):]


def save_summary(path: PathLike, items: Sequence[Any], max_per_group: int = 8,
                 vmax: Optional[float] = None, threshold: Optional[float] = None, map_name: str = "") -> Path:
    """Grid of the likely failures: the highest-scoring good images (row 1) and the lowest-scoring
    anomalous images (row 2), up to max_per_group each, heatmaps on one shared colour scale.

    items: dicts with keys image (uint8 [H, W, 3] or normalised [3, H, W]), anomaly_map ([H, W] or
    None), score, label (0 good, 1 anomalous; other values are skipped), rel_path; or tuples in that
    order. threshold: the learnt image threshold; then each good image at or above it is marked
    FALSE ALARM and each anomalous one below it MISS (red), and the map's outline at it is drawn.
    A group with no images is left out; with none at all the picture says so.
    """
    rows = []
    entries = [_as_item(it) for it in items]
    good = sorted((e for e in entries if e["label"] == 0), key=lambda e: -float(e["score"]))
    bad = sorted((e for e in entries if e["label"] == 1), key=lambda e: float(e["score"]))
    if good:
        rows.append(("good, highest scores", good[:max_per_group]))
    if bad:
        rows.append(("anomalous, lowest scores", bad[:max_per_group]))
    n_cols = max((len(r) for _, r in rows), default=1)
    cell, title_h, head_h = 1.7, 0.45, 0.35  # inches: image cell, three-line cell titles, suptitle
    height = (cell + title_h) * max(len(rows), 1) + head_h
    fig = Figure(figsize=(cell * n_cols + 0.2, height), dpi=_DPI)
    if not rows:
        fig.text(0.5, 0.5, "no labelled images", ha="center", va="center")
        return _save_figure(fig, path)
    maps = {id(e): _to_map(e["anomaly_map"]) for _, r in rows for e in r
            if e["anomaly_map"] is not None}
    vmin, vmax = _color_range(list(maps.values()), vmax)
    axes = np.asarray(fig.subplots(len(rows), n_cols, squeeze=False))
    fig.subplots_adjust(left=0.2 / (cell * n_cols + 0.2), right=0.99, bottom=0.01,
                        top=1 - (head_h + title_h) / height, wspace=0.05, hspace=title_h / cell)
    errors = 0
    for r, (heading, group) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c >= len(group):
                continue
            e = group[c]
            _overlay_heatmap(ax, _to_rgb(e["image"]), maps.get(id(e)), vmin, vmax, level=threshold)
            mark = ""
            if threshold is not None:
                wrong = (float(e["score"]) >= threshold) != (e["label"] == 1)
                mark = ("FALSE ALARM" if e["label"] == 0 else "MISS") if wrong else "correct"
                errors += wrong
            ax.set_title(f"{mark}\n{float(e['score']):.4g}\n{_short(str(e['rel_path'] or ''))}", fontsize=6,
                         color=VERDICT_COLORS.get(mark, "black"), fontweight="bold" if mark != "correct" else None)
        axes[r, 0].text(-0.04, 0.5, heading, rotation=90, ha="right", va="center", fontsize=7,
                        transform=axes[r, 0].transAxes)
    scale = f"{map_name + '; ' if map_name else ''}colour scale {vmin:.3g} - {vmax:.3g}"
    at = "" if threshold is None else (f"; at the learnt threshold {threshold:.4g} (dashed outline): "
                                       f"{errors} of these {sum(len(g) for _, g in rows)} are wrong")
    fig.suptitle(f"failures first ({scale}{at})", fontsize=8)
    return _save_figure(fig, path)


def save_reconstruction_grid(path: PathLike, images: Sequence[Any],
                             reconstructions: dict[str, Sequence[Any]], title: str = "") -> Path:
    """Rows = images; columns = the input, then each named model's reconstruction of it.

    images: normalised [3, H, W] or uint8 [H, W, 3], one per row; reconstructions: {column name:
    one reconstruction per image, same formats}. Used to show what a model draws, not how it scores.
    """
    n_rows, n_cols = len(images), 1 + len(reconstructions)
    if n_rows == 0:
        raise ValueError("no images to draw")
    for name, recons in reconstructions.items():
        if len(recons) != n_rows:
            raise ValueError(f"{name}: {len(recons)} reconstructions for {n_rows} images")
    cell, title_h, head_h = 1.7, 0.35, 0.3 if title else 0.0  # inches; column names of up to two lines
    height = (cell + title_h) * n_rows + head_h
    fig = Figure(figsize=(cell * n_cols, height), dpi=_DPI)
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (head_h + title_h) / height,
                        wspace=0.04, hspace=title_h / cell)
    columns = [("input", images)] + list(reconstructions.items())
    for c, (name, pictures) in enumerate(columns):
        for r in range(n_rows):
            axes[r, c].imshow(_to_rgb(pictures[r]), interpolation="nearest")
            axes[r, c].set_axis_off()
        axes[0, c].set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    return _save_figure(fig, path)
