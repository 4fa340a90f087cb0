"""Calibrated scoring end to end: main_train.py stores the held-out calibration, main_infer.py uses or
recomputes it, the threshold never depends on test labels, scores.csv / metrics.json / masks agree
with the stored threshold, and old checkpoints still score as before."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_infer
import main_train
from lora_utils import unmerged_state_dict
from models_mae import create_model
from util.calibration import Threshold, normalized_scores
from util.cli import run_cli

SIZE = 56
TRAIN_ARGS = {"model": "mae_vit_tiny_patch7", "input_size": SIZE, "norm_pix_loss": False, "lora_rank": 4,
              "lora_alpha": None, "lora_dropout": 0.0, "lora_targets": ["qkv", "proj"], "epochs": 1}
INFER = ["--amp", "none", "--num_workers", "0", "--batch_size", "4", "--sigma", "2", "--no_overlays"]


def _cli(module, argv, capsys):
    capsys.readouterr()
    code = run_cli(module.main, module.get_args_parser().parse_args([str(a) for a in argv]))
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _checkpoint(path: Path, holdout_files: list[str], data_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=4)
    torch.save({"model": unmerged_state_dict(model), "optimizer": {}, "scaler": None, "epoch": 0,
                "args": {**TRAIN_ARGS, "holdout_files": holdout_files, "data_path": str(data_path)}}, path)
    return path


@pytest.fixture(scope="module")
def holdout_checkpoint(synthetic_category, tmp_path_factory) -> Path:
    """A checkpoint (no stored calibration) whose options name 4 of the category's train images as held out."""
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-0.pth", names, synthetic_category)


@pytest.mark.slow
def test_threshold_ignores_test_labels_and_outputs_agree_with_it(synthetic_category, holdout_checkpoint,
                                                                  tmp_path, capsys):
    # The same images with the test labels permuted: good <-> crack folders swapped.
    swapped = tmp_path / "swapped"
    shutil.copytree(synthetic_category, swapped)
    (swapped / "test" / "good").rename(swapped / "test" / "tmp")
    (swapped / "test" / "crack").rename(swapped / "test" / "good")
    (swapped / "test" / "tmp").rename(swapped / "test" / "crack")
    shutil.rmtree(swapped / "ground_truth" / "crack")
    results = []
    for root in (synthetic_category, swapped):
        out = tmp_path / f"out_{root.name}"
        code, stdout, err = _cli(main_infer, ["--checkpoint", holdout_checkpoint, "--data_path", root,
                                              "--output_dir", out, "--save_masks", *INFER], capsys)
        assert code == 0, err
        assert "calibration: recomputed on the 4 held-out images" in stdout
        results.append((out, json.loads((out / "metrics.json").read_text())))
    (out_a, metrics_a), (_, metrics_b) = results
    assert metrics_a["threshold"] == metrics_b["threshold"] and metrics_a["threshold"]["source"] == "holdout"
    assert metrics_a["image_auroc"] != metrics_b["image_auroc"]  # the labels did change
    threshold = Threshold.from_dict(metrics_a["threshold"])
    rows = _rows(out_a / "scores.csv")
    scores = np.array([float(r["score"]) for r in rows])
    assert [int(r["pred_label"]) for r in rows] == [int(s >= threshold.image) for s in scores]
    np.testing.assert_allclose([float(r["score_normalized"]) for r in rows], normalized_scores(scores, threshold),
                               atol=1e-6)
    labels = np.array([int(r["label"]) for r in rows])
    predicted = scores >= threshold.image
    tp = int(np.sum(predicted & (labels == 1)))
    assert metrics_a["image_recall"] == pytest.approx(tp / int(np.sum(labels == 1)))
    for r in rows:  # masks: the saved pixel map at the pixel threshold
        stem = Path(r["path"]).with_suffix("")
        amap = np.load(out_a / "anomaly_maps" / f"{stem}.npy")
        mask = np.array(Image.open(out_a / "masks" / f"{stem}.png"))
        assert np.array_equal(mask == 255, amap >= threshold.pixel)


@pytest.mark.slow
def test_images_mode_prints_the_verdict_of_each_image(synthetic_category, holdout_checkpoint, tmp_path, capsys):
    code, stdout, err = _cli(main_infer, ["--checkpoint", holdout_checkpoint, "--images",
                                          synthetic_category / "test" / "crack", "--output_dir", tmp_path / "o",
                                          *INFER], capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "o" / "scores.csv")
    verdicts = [line.split()[0] for line in stdout.splitlines() if line.startswith(("ANOMALOUS ", "normal "))]
    assert verdicts == ["ANOMALOUS" if r["pred_label"] == "1" else "normal" for r in rows] and len(rows) == 2


@pytest.mark.slow
def test_old_checkpoints_score_uncalibrated_with_a_note(synthetic_category, tmp_path, capsys):
    old = tmp_path / "old.pth"
    torch.manual_seed(0)
    torch.save({"model": unmerged_state_dict(create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=4)),
                "optimizer": {}, "scaler": None, "epoch": 0, "args": TRAIN_ARGS}, old)
    code, stdout, err = _cli(main_infer, ["--checkpoint", old, "--data_path", synthetic_category,
                                          "--output_dir", tmp_path / "o", *INFER, "--sigma", "3"], capsys)
    assert code == 0, err
    assert "note: the checkpoint has no held-out images" in stdout and "uncalibrated" in stdout
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "threshold" not in metrics and metrics["scoring"]["image_map"] == "mse"
    rows = _rows(tmp_path / "o" / "scores.csv")
    for r in rows:  # as before: the score is the maximum of the raw mse map, no verdict columns
        amap = np.load(tmp_path / "o" / "anomaly_maps" / f"{Path(r['path']).with_suffix('')}.npy")
        assert float(r["score"]) == float(amap.max()) and r["pred_label"] == "" and r["score_normalized"] == ""
    # asking for a calibrated recipe explicitly is an error, not a silent fallback
    code, _, err = _cli(main_infer, ["--checkpoint", old, "--data_path", synthetic_category, "--output_dir",
                                     tmp_path / "o2", "--image_map", "fusion-absz", *INFER], capsys)
    assert code == 2 and "--image_map fusion-absz needs calibration" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(main_infer, ["--checkpoint", old, "--data_path", synthetic_category, "--output_dir",
                                     tmp_path / "o3", "--save_masks", *INFER], capsys)
    assert code == 2 and "--save_masks needs a pixel threshold" in err


@pytest.mark.slow
def test_training_holds_images_out_and_stores_the_calibration(tmp_path, capsys, monkeypatch):
    from scripts.make_synthetic_mvtec import make_category

    root = tmp_path / "cat"
    make_category(root, seed=1, size=56, n_train=12, n_test_good=2, n_per_defect=1, kind="texture")
    seen = []
    original = main_train.TrainDataset

    def recording(*a, **kw):
        dataset = original(*a, **kw)
        seen.append({p.name for p in dataset.paths})
        return dataset

    monkeypatch.setattr(main_train, "TrainDataset", recording)
    argv = ["--data_path", root, "--output_dir", tmp_path / "run", "--model", "mae_vit_tiny_patch7", "--input_size",
            str(SIZE), "--batch_size", "4", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0",
            "--holdout", "0.3", "--save_every", "0"]
    code, stdout, err = _cli(main_train, argv, capsys)
    assert code == 0, err
    checkpoint = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    held = checkpoint["args"]["holdout_files"]
    assert len(held) == 5 and len(seen) == 1 and not seen[0] & set(held) and len(seen[0]) == 7
    calibration = checkpoint["calibration"]
    assert calibration["holdout_files"] == held and set(calibration["maps"]) == {"mse", "msgms"}
    assert calibration["maps"]["mse"].shape == (5, SIZE, SIZE)
    code, stdout, err = _cli(main_infer, ["--checkpoint", tmp_path / "run" / "checkpoint-last.pth", "--data_path",
                                          root, "--output_dir", tmp_path / "eval", "--amp", "none", "--num_workers",
                                          "0", "--no_overlays"], capsys)
    assert code == 0, err
    assert "calibration: stored in the checkpoint (5 held-out normal images)" in stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["threshold"]["image"] == pytest.approx(calibration["threshold"]["image"], rel=1e-6)
    # a bad --holdout is a one-line error before any work
    code, _, err = _cli(main_train, [*argv[:-4], "--holdout", "0.6"], capsys)
    assert code == 2 and "--holdout 0.6" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_compare_scoring_agrees_with_main_infer(synthetic_category, holdout_checkpoint, tmp_path, capsys):
    from scripts import compare_scoring

    code, _, err = _cli(compare_scoring, ["--checkpoint", holdout_checkpoint, "--data_path", synthetic_category,
                                          "--maps", "mse,fusion-absz", "--sigma", "2", "--amp", "none",
                                          "--mask_pattern", "stripes", "--image_sigma", "2",
                                          "--output", tmp_path / "cmp.json"], capsys)
    assert code == 0, err
    compared = json.loads((tmp_path / "cmp.json").read_text())["std_floor"]["0.5"]
    code, _, err = _cli(main_infer, ["--checkpoint", holdout_checkpoint, "--data_path", synthetic_category,
                                     "--output_dir", tmp_path / "o", "--pixel_map", "mse", "--image_map", "fusion-absz",
                                     *INFER], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert compared["image"]["fusion-absz"]["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert compared["pixel"]["mse"]["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"])
    assert compared["pixel"]["mse"]["aupro"] == pytest.approx(metrics["aupro"])
