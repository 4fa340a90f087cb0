"""Tests of util/visualize.py: every picture is a readable PNG, written atomically."""
import numpy as np
import pytest
import torch
from PIL import Image

from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.visualize import HeatPanel, denormalize, save_overlay, save_reconstruction_grid, save_roc, save_summary


def _normalise(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _check_png(path, min_wh=(150, 150), max_wh=(2000, 2000)):
    assert path.exists()
    assert not list(path.parent.glob("*.tmp.png")), "temporary file left behind"
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        w, h = im.size
    assert min_wh[0] <= w <= max_wh[0] and min_wh[1] <= h <= max_wh[1], (w, h)
    return w, h


def test_denormalize_round_trip():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    rgb[0, 0] = (0, 0, 0)
    rgb[0, 1] = (255, 255, 255)
    x = _normalise(rgb)
    out = denormalize(x)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(denormalize(x.numpy()), rgb)
    # values outside the image range are clipped, not wrapped
    assert denormalize(torch.full((3, 2, 2), 100.0)).min() == 255
    assert denormalize(torch.full((3, 2, 2), -100.0)).max() == 0
    with pytest.raises(ValueError):
        denormalize(torch.zeros(2, 4, 4))


def test_save_overlay(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    amap = rng.random((64, 64)).astype(np.float32)
    gt = np.zeros((64, 64), np.uint8)
    gt[10:30, 20:40] = 1
    path = tmp_path / "overlays" / "test" / "bad" / "crack_000.png"  # parents are created
    out = save_overlay(path, _normalise(rgb), _normalise(rgb), torch.from_numpy(amap), 0.75,
                       gt_mask=gt, vmax=2.0, title="test/bad/crack_000.png")
    assert out == path
    _check_png(path, min_wh=(400, 150), max_wh=(1200, 600))
    # uint8 inputs, no mask, no reconstruction, a map of another size; overwrite in place
    save_overlay(path, rgb, None, rng.random((16, 16)), 0.1)
    _check_png(path, min_wh=(400, 150), max_wh=(1200, 600))
    # an empty and a constant map are fine
    save_overlay(tmp_path / "empty.png", rgb, rgb, np.zeros((64, 64)), 0.0, gt_mask=np.zeros((64, 64)))
    _check_png(tmp_path / "empty.png", min_wh=(400, 150), max_wh=(1200, 600))


def test_save_roc(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.random(40) < 0.5
    scores = rng.random(40) + labels
    save_roc(tmp_path / "roc.png", scores, labels, auroc=0.9)
    _check_png(tmp_path / "roc.png", max_wh=(800, 800))
    save_roc(tmp_path / "roc2.png", scores, labels)  # AUROC computed
    _check_png(tmp_path / "roc2.png", max_wh=(800, 800))
    with pytest.raises(ValueError):
        save_roc(tmp_path / "roc3.png", scores, np.ones(40))


def _items(rng, n, labels):
    return [dict(image=rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8),
                 anomaly_map=rng.random((32, 32)), score=float(rng.random()), label=int(labels[i]),
                 rel_path=f"test/{'good' if labels[i] == 0 else 'crack'}/{i:03d}.png")
            for i in range(n)]


def _figures(monkeypatch) -> list:
    """The figures util.visualize renders from now on (still written to their files)."""
    import util.visualize as visualize

    figures, save = [], visualize._save_figure
    monkeypatch.setattr(visualize, "_save_figure", lambda fig, path: figures.append(fig) or save(fig, path))
    return figures


def test_overlay_explains_the_verdict(tmp_path, monkeypatch):
    """The verdict's map with a colour bar on the given scale and the threshold outlined; the pixel map
    beside it when given; the verdict word, the score and the normalised score in the title."""
    figures = _figures(monkeypatch)
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    image_map = np.zeros((32, 32), np.float32)
    image_map[8:16, 8:16] = 3.0  # above the threshold 1.5: outlined
    save_overlay(tmp_path / "a.png", rgb, rgb, image_map, 3.0, vmax=3.0, title="a.png", verdict="ANOMALOUS",
                 normalized=0.93, map_name="image map fusion-absz (verdict)", threshold=1.5,
                 pixel_panel=HeatPanel(rng.random((32, 32)), "pixel map mse (localisation)", 2.0, 0.9))
    fig = figures[-1]
    assert "ANOMALOUS" in fig._suptitle.get_text() and "score 3" in fig._suptitle.get_text()
    assert "normalised 0.93" in fig._suptitle.get_text()
    heat_axes = [ax for ax in fig.axes if "map" in ax.get_title()]
    assert [ax.get_title().split("\n")[0] for ax in heat_axes] == ["image map fusion-absz (verdict)",
                                                                  "pixel map mse (localisation)"]
    assert "threshold 1.5" in heat_axes[0].get_title()
    bars = [im for ax in heat_axes for im in ax.get_images() if im.get_cmap().name == "jet"]
    assert [b.get_clim() for b in bars] == [(0.0, 3.0), (0.0, 2.0)]  # the run's scale, not this image's
    assert len(fig.axes) == 6  # input, reconstruction, two heatmaps, two colour bars
    assert heat_axes[0].collections  # the threshold's outline


def test_summary_marks_false_alarms_and_misses(tmp_path, monkeypatch):
    figures = _figures(monkeypatch)
    rng = np.random.default_rng(4)
    items = _items(rng, 4, [0, 0, 1, 1])
    for item, score in zip(items, (0.9, 0.1, 0.2, 0.8)):  # good 0.9: false alarm; anomalous 0.2: miss
        item["score"] = score
    save_summary(tmp_path / "summary.png", items, threshold=0.5)
    titles = [ax.get_title() for ax in figures[-1].axes if ax.get_title()]
    assert sum("FALSE ALARM" in t for t in titles) == 1 and sum("MISS" in t for t in titles) == 1
    assert "2 of these 4 are wrong" in figures[-1]._suptitle.get_text()


def test_save_summary(tmp_path):
    rng = np.random.default_rng(3)
    items = _items(rng, 20, [i % 2 for i in range(20)])
    save_summary(tmp_path / "summary.png", items)
    _check_png(tmp_path / "summary.png", min_wh=(600, 200), max_wh=(2000, 1200))
    # one group empty (only anomalous images), tuples instead of dicts
    bad_only = [tuple(d[k] for k in ("image", "anomaly_map", "score", "label", "rel_path"))
                for d in _items(rng, 3, [1, 1, 1])]
    save_summary(tmp_path / "bad_only.png", bad_only)
    _check_png(tmp_path / "bad_only.png", min_wh=(150, 100))
    save_summary(tmp_path / "good_only.png", _items(rng, 2, [0, 0]))
    _check_png(tmp_path / "good_only.png", min_wh=(150, 100))
    save_summary(tmp_path / "none.png", [])  # nothing labelled at all
    _check_png(tmp_path / "none.png", min_wh=(100, 100))



def test_save_reconstruction_grid(tmp_path):
    rng = np.random.default_rng(4)
    images = [_normalise(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    recons = {"scratch": [torch.zeros(3, 32, 32)] * 2, "prior": [np.zeros((32, 32, 3), np.uint8)] * 2}
    save_reconstruction_grid(tmp_path / "grid.png", images, recons, title="capsule")
    w, h = _check_png(tmp_path / "grid.png", min_wh=(250, 250), max_wh=(800, 800))
    assert w > h  # three columns, two rows
    with pytest.raises(ValueError, match="1 reconstructions for 2 images"):
        save_reconstruction_grid(tmp_path / "bad.png", images, {"scratch": images[:1]})
    with pytest.raises(ValueError, match="no images"):
        save_reconstruction_grid(tmp_path / "none.png", [], {})
