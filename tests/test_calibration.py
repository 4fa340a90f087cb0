"""Scoring against normal images: MSGMS against an independent numpy/scipy reference, calibration
statistics against numpy recomputations, map recipes on hand-computed inputs, thresholds, the
held-out split, and the calibrated scorer."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from models_mae import AnomalyScorer, create_model
from scoring import ScoringOptions, build_scorer, fit_scoring, make_calibration
from util.calibration import (MAP_CHOICES, LevelStats, MapSpec, Threshold, binomial_tail, check_false_alarms,
                              false_alarm_limit, fit_level, fit_threshold, image_scores, leave_one_out_mean_std,
                              level_map, mean_std, normalized_scores, predicted_labels)
from util.cli import UserError
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, MIN_HOLDOUT, TrainDataset, holdout_names, holdout_root_names
from util.error_maps import msgms, squared_error
from util.metrics import threshold_metrics
from util.smoothing import GaussianSmoothing

from image_files import random_rgb, save_image


# ---- MSGMS: an independent reference (numpy + scipy) ---------------------------------------
def _reference_msgms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RIAD's MSGMS written from its definition: grey = channel mean in [0, 1], Prewitt magnitude
    (edge pixel repeated), GMS with c = 0.0026, 4 scales of 2x2 block means, each upsampled with
    bilinear interpolation at half-pixel centres (edge extended), 1 - the mean."""
    prewitt = np.array([[1.0, 0.0, -1.0]] * 3) / 3.0

    def magnitude(img):
        gx = ndimage.correlate(img, prewitt, mode="nearest")
        gy = ndimage.correlate(img, prewitt.T, mode="nearest")
        return np.sqrt(gx**2 + gy**2)

    def block_mean(img):
        h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
        return img[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    def upsample(img, shape):
        rows = np.maximum((np.arange(shape[0]) + 0.5) * img.shape[0] / shape[0] - 0.5, 0)
        cols = np.maximum((np.arange(shape[1]) + 0.5) * img.shape[1] / shape[1] - 0.5, 0)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        return ndimage.map_coordinates(img, [rr, cc], order=1, mode="nearest")

    a, b = x.mean(axis=0), y.mean(axis=0)
    total = np.zeros_like(a)
    for s in range(4):
        if s:
            a, b = block_mean(a), block_mean(b)
        ga, gb = magnitude(a), magnitude(b)
        gms = (2 * ga * gb + 0.0026) / (ga**2 + gb**2 + 0.0026)
        total += upsample(gms, total.shape)
    return 1 - total / 4


@pytest.mark.parametrize("size", [32, 56])
def test_msgms_matches_an_independent_reference(size):
    rng = np.random.default_rng(size)
    x01 = ndimage.gaussian_filter(rng.random((3, size, size)), (0, 1.5, 1.5))
    y01 = np.clip(x01 + 0.1 * rng.standard_normal(x01.shape) * (rng.random((1, size, size)) > 0.7), 0, 1)
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    to_model = lambda a: torch.from_numpy((a - mean) / std).float()[None]  # noqa: E731
    ours = msgms(to_model(y01), to_model(x01), torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))[0]
    # the test's float32 model-space round trip limits the agreement, not the definition
    np.testing.assert_allclose(ours.numpy(), _reference_msgms(x01, y01), atol=1e-5)


def test_msgms_is_zero_for_a_perfect_reconstruction_and_sees_a_missing_edge():
    img = torch.zeros(1, 3, 32, 32)
    img[..., 16:] = 1.0  # a vertical edge
    mean, std = torch.zeros(3), torch.ones(3)
    assert msgms(img, img, mean, std).abs().max() < 1e-6
    flat = torch.full_like(img, 0.5)
    error = msgms(flat, img, mean, std)[0]
    assert error[:, 14:18].mean() > 0.5 and error[:, :4].abs().max() < 1e-6  # the edge, nothing far from it


def test_squared_error_averages_channels():
    a, b = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    b[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(squared_error(b, a)[0], torch.tensor([[14 / 3, 0.0], [0.0, 0.0]]))


# ---- statistics ---------------------------------------------------------------------------
def _maps(n=6, h=5, w=4, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).gamma(2.0, 1.0, (n, h, w)))


def test_mean_std_and_floor_match_numpy():
    maps = _maps()
    mean, std = mean_std(maps)
    raw = maps.numpy().std(axis=0)
    np.testing.assert_allclose(mean.numpy(), maps.numpy().mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), np.maximum(raw, 0.5 * raw.mean()), rtol=1e-12)


def test_leave_one_out_statistics_match_a_recomputation_without_each_image():
    maps = _maps(n=7)
    mean, std = leave_one_out_mean_std(maps)
    for i in range(7):
        others = np.delete(maps.numpy(), i, axis=0)
        raw = others.std(axis=0)
        np.testing.assert_allclose(mean[i].numpy(), others.mean(axis=0), rtol=1e-10)
        np.testing.assert_allclose(std[i].numpy(), np.maximum(raw, 0.5 * raw.mean()), rtol=1e-9)


def test_map_recipes_on_hand_computed_values():
    e = {"mse": torch.tensor([[[3.0, 1.0]]]), "msgms": torch.tensor([[[0.2, 0.8]]])}
    stats = LevelStats(mean={"mse": torch.tensor([[2.0, 2.0]]), "msgms": torch.tensor([[0.4, 0.4]])},
                       std={"mse": torch.tensor([[0.5, 0.5]]), "msgms": torch.tensor([[0.1, 0.1]])},
                       scale={"mse": 2.0, "msgms": 4.0})
    assert torch.equal(level_map(e, MapSpec.parse("mse"), None), e["mse"])
    assert torch.allclose(level_map(e, MapSpec.parse("mse-z"), stats), torch.tensor([[[2.0, -2.0]]]))
    assert torch.allclose(level_map(e, MapSpec.parse("msgms-absz"), stats), torch.tensor([[[2.0, 4.0]]]))
    # fusion: max(mse/2, msgms/4) raw; max(|z_mse|/2, |z_msgms|/4) for absz
    assert torch.allclose(level_map(e, MapSpec.parse("fusion"), stats), torch.tensor([[[1.5, 0.5]]]))
    assert torch.allclose(level_map(e, MapSpec.parse("fusion-absz"), stats), torch.tensor([[[1.0, 1.0]]]))


def test_map_recipe_names_round_trip_and_bad_names_fail():
    for recipe in MAP_CHOICES:
        assert str(MapSpec.parse(recipe)) == recipe
    assert not MapSpec.parse("mse").needs_calibration and MapSpec.parse("fusion").needs_calibration
    with pytest.raises(ValueError, match="unknown map recipe"):
        MapSpec.parse("ssim")


def test_fit_level_fusion_scale_is_the_quantile_of_leave_one_out_maps():
    maps = {"mse": _maps(seed=1), "msgms": _maps(seed=2) / 10}
    stats, loo = fit_level(maps, MapSpec.parse("fusion-absz"))
    for error in ("mse", "msgms"):
        m, s = leave_one_out_mean_std(maps[error])
        single = ((maps[error].double() - m) / s).abs()
        assert stats.scale[error] == pytest.approx(float(torch.quantile(single.flatten().float(), 0.99)))
    expected = torch.maximum(((maps["mse"] - leave_one_out_mean_std(maps["mse"])[0]) /
                              leave_one_out_mean_std(maps["mse"])[1]).abs() / stats.scale["mse"],
                             ((maps["msgms"] - leave_one_out_mean_std(maps["msgms"])[0]) /
                              leave_one_out_mean_std(maps["msgms"])[1]).abs() / stats.scale["msgms"])
    assert torch.allclose(loo, expected)


def test_threshold_is_the_quantile_of_held_out_scores_and_normalisation_puts_it_at_half():
    level = torch.zeros(5, 4, 4, dtype=torch.float64)
    for i, top in enumerate([1.0, 2.0, 3.0, 4.0, 5.0]):
        level[i, 0, 0] = top
    t = fit_threshold(level, level, "max", 0.01, image_quantile=0.75, pixel_quantile=1.0)
    assert t.image == pytest.approx(4.0) and t.image_low == 1.0 and t.pixel == 5.0 and t.n_images == 5
    scores = np.array([1.0, 2.5, 4.0, 7.0, 100.0])
    np.testing.assert_allclose(normalized_scores(scores, t), [0.0, 0.25, 0.5, 1.0, 1.0])
    assert predicted_labels(scores, t).tolist() == [0, 0, 1, 1, 1]
    assert Threshold.from_dict(t.to_dict()) == t


def test_image_scores_max_and_topk():
    maps = torch.arange(16.0).reshape(1, 4, 4)
    assert image_scores(maps).item() == 15.0
    assert image_scores(maps, "topk", 0.25).item() == pytest.approx((15 + 14 + 13 + 12) / 4)


def test_threshold_metrics_hand_computed():
    m = threshold_metrics([0.1, 0.6, 0.7, 0.2, 0.9], [0, 0, 1, 1, 1], 0.5)
    # predicted 1: 0.6 (FP), 0.7 (TP), 0.9 (TP); 0.2 is a FN
    assert m == {"precision": 2 / 3, "recall": 2 / 3, "f1": 4 / 6, "accuracy": 3 / 5}
    assert threshold_metrics([0.1], [0], 0.5) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1.0}


# ---- the held-out split -------------------------------------------------------------------
def _train_folder(root, n):
    for i in range(n):
        save_image(random_rgb(seed=i), root / f"train/good/{i:03d}.png")
    return root


def test_holdout_names_are_seeded_sized_and_checked(tmp_path, capsys):
    root = _train_folder(tmp_path / "cat", 60)
    names = holdout_names(root, 0.1, seed=3)
    assert len(names) == 6 and names == holdout_names(root, 0.1, seed=3) and names != holdout_names(root, 0.1, 4)
    assert len(holdout_names(root, 0.02, seed=0)) == MIN_HOLDOUT  # at least a handful
    assert holdout_names(root, 0.0, seed=0) == []
    for bad in (-0.1, 0.5, 0.9):
        with pytest.raises(UserError, match="--holdout"):
            holdout_names(root, bad, seed=0)
    small = _train_folder(tmp_path / "small", 8)
    with pytest.raises(UserError, match="would leave 3 to train on"):
        holdout_names(small, 0.1, seed=0)
    capsys.readouterr()
    assert holdout_names(small, 0.1, seed=0, strict=False) == []  # the default fraction: a warning instead
    assert "none held out for calibration" in capsys.readouterr().err


def test_holdout_root_names_are_every_image_and_checked(tmp_path):
    data = _train_folder(tmp_path / "cat", 8)
    other = _train_folder(tmp_path / "other", MIN_HOLDOUT)
    assert holdout_root_names(other, data) == sorted(p.name for p in (other / "train" / "good").iterdir())
    few = _train_folder(tmp_path / "few", MIN_HOLDOUT - 1)
    for root, message in ((few, f"has {MIN_HOLDOUT - 1} images; calibration needs at least {MIN_HOLDOUT}"),
                          (tmp_path / "nowhere", "no folder"), (data, "is --data_path")):
        with pytest.raises(UserError, match="--holdout_root") as caught:
            holdout_root_names(root, data)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_training_dataset_never_reads_held_out_images(tmp_path):
    root = _train_folder(tmp_path / "cat", 20)
    names = holdout_names(root, 0.25, seed=0)
    dataset = TrainDataset(root, 28, jitter=False, exclude=names)
    assert len(dataset) == 15 and not {p.name for p in dataset.paths} & set(names)


# ---- the calibrated scorer ----------------------------------------------------------------
def test_calibrated_scorer_equals_its_recipes_applied_to_the_smoothed_error_maps():
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=28, lora_rank=0).eval()
    holdout = torch.randn(6, 3, 28, 28)
    plain = AnomalyScorer(model, num_masks=2, mask_pattern="checkerboard")
    options = ScoringOptions(num_masks=2, mask_pattern="checkerboard", sigma=1.0, image_sigma=0.5,
                             pixel_map="msgms-z", image_map="fusion-absz")
    with torch.no_grad():
        holdout_maps, _ = plain.error_maps(holdout)  # per-pixel, not smoothed: what checkpoints store
        scorer, threshold = build_scorer(model, options, holdout_maps)
        imgs = torch.randn(3, 3, 28, 28)
        out = scorer(imgs)
        maps, _ = plain.error_maps(imgs)
    (pixel_stats, image_stats), again = fit_scoring(holdout_maps, options)
    assert threshold == again
    pixel = {e: GaussianSmoothing(1.0)(m) for e, m in maps.items()}
    image = {e: GaussianSmoothing(0.5)(m) for e, m in maps.items()}
    torch.testing.assert_close(out.anomaly_maps, level_map(pixel, MapSpec.parse("msgms-z"), pixel_stats).float())
    image_map = level_map(image, MapSpec.parse("fusion-absz"), image_stats).float()
    torch.testing.assert_close(out.scores, image_map.flatten(1).amax(dim=1))
    # the statistics are those of the held-out maps smoothed at each level's sigma
    expected_mean, _ = mean_std(GaussianSmoothing(1.0)(holdout_maps["msgms"]))
    torch.testing.assert_close(pixel_stats.mean["msgms"], expected_mean)
    calibration = make_calibration(holdout_maps, [f"{i}.png" for i in range(6)], 28, options)
    assert calibration["threshold"] == threshold.to_dict() and calibration["defaults"]["image_map"] == "fusion-absz"


def test_calibrated_recipes_need_held_out_maps():
    model = create_model("mae_vit_tiny_patch7", img_size=28, lora_rank=0)
    with pytest.raises(ValueError, match="held-out"):
        build_scorer(model, ScoringOptions(num_masks=2, mask_pattern="checkerboard", image_map="fusion-absz"), None)
    scorer, threshold = build_scorer(model, ScoringOptions(num_masks=2, mask_pattern="checkerboard",
                                                           image_map="mse"), None)
    assert threshold is None and str(scorer.image_level.spec) == "mse"


# ---- the threshold against new normal images -------------------------------------------------
def test_binomial_tail_and_the_false_alarm_limit_by_hand():
    np.testing.assert_allclose(binomial_tail(2, 0.5), [1.0, 0.75, 0.25, 0.0])
    np.testing.assert_allclose(binomial_tail(3, 0.0), [1.0, 0.0, 0.0, 0.0, 0.0])
    # n = 10, p = 0.05: P(X >= 3) = 1 - 0.95^10 - 10 * 0.05 * 0.95^9 - 45 * 0.05^2 * 0.95^8 = 0.0115 > 0.01,
    # P(X >= 4) = 0.0010: 3 of 10 flagged is within chance, so the limit is 3/10 (above 3 x 0.05)
    tail = binomial_tail(10, 0.05)
    assert tail[3] == pytest.approx(1 - 0.95**10 - 10 * 0.05 * 0.95**9 - 45 * 0.05**2 * 0.95**8)
    assert false_alarm_limit(10, 0.05) == pytest.approx(0.3)
    assert false_alarm_limit(40, 0.05) == pytest.approx(0.15)  # 6/40 = 3 x 0.05: both bounds agree
    assert false_alarm_limit(400, 0.05) == pytest.approx(0.15)  # many images: the factor decides
    assert false_alarm_limit(10, 0.0) == 0.0  # a promise of no false alarm: any one warns
    assert false_alarm_limit(1, 0.05) == 1.0  # one image: never a warning


def test_false_alarm_warning_only_above_the_limit():
    scores = np.arange(1, 11) / 10  # 10 normal test images: 0.1 .. 1.0
    within = check_false_alarms(scores, 0.75, 0.95)  # 3 of 10 at or above: the limit itself, no warning
    assert (within.n_normal, within.n_flagged, within.false_alarm_rate) == (10, 3, 0.3)
    assert within.promised_rate == 0.05 and within.warn_above == pytest.approx(0.3) and within.warning is None
    above = check_false_alarms(scores, 0.7, 0.95)  # 4 of 10: at or above counts, as pred_label does
    assert above.n_flagged == 4 and "4 of 10 good test images" in above.warning
    assert "--holdout_root" in above.warning and "\n" not in above.warning
    assert check_false_alarms(scores, 2.0, 0.95).warning is None  # nothing flagged
    assert check_false_alarms(scores, 1.0, 1.0).warning is not None  # quantile 1 promises none: one warns
    assert check_false_alarms(np.array([]), 0.5, 0.95) is None
    assert within.to_dict()["warning"] is None and "3 of 10 good test images" in within.describe()
