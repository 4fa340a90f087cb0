"""scripts/export.py and scripts/predict_onnx.py: the exported ONNX / TorchScript file scores like
PyTorch fp32 (maps 1e-4 absolute, scores 1e-5 relative, identical labels) at a fixed and a dynamic
batch, carries its metadata, passes onnx.checker; the predictor writes main_infer.py's outputs
without importing torch; bad input gives one-line errors and no file.

Exports take ~10-20 s each on a small CPU, so each file is exported once per module (fixtures).
"""
import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

import main_infer
from image_files import random_rgb, save_image
from lora_utils import unmerged_state_dict
from models_mae import create_model
from scoring import ScoringOptions, holdout_error_maps, make_calibration
from util.calibration import normalized_scores, predicted_labels
from util.cli import run_cli
from util.datasets import TestDataset, find_test_items, list_images, unlabelled_items

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import export  # noqa: E402
import predict_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 56  # 8x8 patch grid
TRAIN_ARGS = {"model": "mae_vit_tiny_patch7", "input_size": SIZE, "norm_pix_loss": False, "lora_rank": 4,
              "lora_alpha": None, "lora_dropout": 0.0, "lora_targets": ["qkv", "proj"], "epochs": 1}
# What "scores the same" means for every engine (docs/DEPLOYMENT.md; scripts/export.py checks them too).
MAP_ATOL, SCORE_RTOL = 1e-4, 1e-5
# Runs predict_onnx.py with torch made unimportable: any `import torch` in it (or in what it imports) fails.
NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")


def _save_checkpoint(path: Path, train_args: dict, **extra) -> Path:
    """A main_train.py checkpoint (LoRA unmerged, non-zero adapters) of a random tiny model."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)
    torch.save({"model": unmerged_state_dict(model), "optimizer": {}, "scaler": None, "epoch": 0,
                "args": train_args, **extra}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Without calibration: exporting it needs --threshold."""
    return _save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-0.pth", TRAIN_ARGS)


@pytest.fixture(scope="module")
def calibrated_checkpoint(synthetic_category, tmp_path_factory) -> Path:
    """With the calibration main_train.py stores (4 held-out training images): the default scorer is
    the calibrated one (its msgms error, z-scores, fusion) and the threshold comes with it."""
    path = tmp_path_factory.mktemp("ckpt") / "calibrated.pth"
    names = [p.name for p in list_images(synthetic_category / "train" / "good")[:4]]
    train_args = {**TRAIN_ARGS, "holdout_files": names, "data_path": str(synthetic_category)}
    _save_checkpoint(path, train_args)
    model, _, _ = main_infer.build_model(str(path))
    maps = holdout_error_maps(model, synthetic_category, names, ScoringOptions(), torch.device("cpu"), None)
    return _save_checkpoint(path, train_args, calibration=make_calibration(maps, names, SIZE, ScoringOptions()))


def _reference(category: Path, checkpoint: Path):
    """main_infer's scorer in fp32 on the test images: uint8 pixels [N, S, S, 3], scores, maps, Threshold."""
    dataset = TestDataset(find_test_items(category), SIZE)
    scorer, threshold, _, _ = main_infer.load_scoring(str(checkpoint))
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    with torch.inference_mode():
        out = scorer(images)
    pixels = dataset.images.permute(0, 2, 3, 1).contiguous().numpy()
    return pixels, out.scores.numpy(), out.anomaly_maps.numpy(), threshold


@pytest.fixture(scope="module")
def manual(synthetic_category, checkpoint):
    """The uncalibrated reference with a threshold given by hand between its scores (both labels occur)."""
    pixels, scores, maps, _ = _reference(synthetic_category, checkpoint)
    return pixels, scores, maps, SimpleNamespace(image=float(np.median(scores)), image_low=0.0)


@pytest.fixture(scope="module")
def calibrated(synthetic_category, calibrated_checkpoint):
    reference = _reference(synthetic_category, calibrated_checkpoint)
    assert reference[3] is not None
    return reference


def _export(checkpoint, output: Path, *options) -> Path:
    args = export.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--output", str(output),
                                                *map(str, options)])
    assert run_cli(export.main, args) == 0
    return output


@pytest.fixture(scope="module")
def onnx_calibrated(calibrated_checkpoint, tmp_path_factory) -> Path:
    return _export(calibrated_checkpoint, tmp_path_factory.mktemp("export") / "dynamic.onnx", "--dynamic_batch")


def _assert_parity(outputs, reference, rows=slice(None), both_labels=False):
    _, scores, maps, threshold = reference
    score, normalized, label, anomaly_map = outputs
    np.testing.assert_allclose(anomaly_map, maps[rows], atol=MAP_ATOL, rtol=0)
    np.testing.assert_allclose(score, scores[rows], rtol=SCORE_RTOL, atol=0)
    expected = predicted_labels(scores[rows], threshold)
    assert label.dtype == np.int64 and np.array_equal(label, expected)
    if both_labels:
        assert 0 < expected.sum() < expected.size
    np.testing.assert_allclose(normalized, normalized_scores(scores[rows], threshold), atol=1e-5)


@pytest.mark.slow
def test_onnx_dynamic_batch_matches_pytorch_and_carries_metadata(onnx_calibrated, calibrated):
    proto = onnx.load(str(onnx_calibrated))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    threshold = calibrated[3]
    assert meta["input_size"] == str(SIZE) and meta["model"] == "mae_vit_tiny_patch7"
    assert meta["batch"] == "dynamic" and meta["threshold_source"] == "calibration"
    assert float(meta["threshold_image"]) == threshold.image
    assert float(meta["threshold_image_low"]) == threshold.image_low
    assert json.loads(meta["calibration"]) == threshold.to_dict()
    assert len(json.loads(meta["train_args"])["holdout_files"]) == threshold.n_images == 4
    scoring = json.loads(meta["scoring"])
    assert (scoring["num_masks"], scoring["image_map"]) == (4, ScoringOptions().image_map)
    (image_input,) = proto.graph.input
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    session = export.onnx_runner(str(onnx_calibrated))
    pixels = calibrated[0]
    _assert_parity(session(pixels), calibrated)  # the whole split in one call
    _assert_parity(session(pixels[2:5]), calibrated, slice(2, 5))


@pytest.mark.slow
def test_onnx_batch_1_with_a_threshold_by_hand(checkpoint, manual, tmp_path):
    """An uncalibrated checkpoint, --threshold VALUE, a fixed batch of 1."""
    path = _export(checkpoint, tmp_path / "batch1.onnx", "--batch", 1, "--threshold", manual[3].image)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["threshold_source"] == "manual" and meta["batch"] == "1" and meta["calibration"] == "null"
    assert json.loads(meta["train_args"]) == TRAIN_ARGS
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, SIZE, SIZE, 3]
    session = export.onnx_runner(str(path))
    pixels = manual[0]
    outputs = [session(pixels[i:i + 1]) for i in range(len(pixels))]
    _assert_parity(tuple(np.concatenate(parts) for parts in zip(*outputs)), manual, both_labels=True)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session(pixels[:2])  # the batch is fixed


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch_at_any_batch(calibrated_checkpoint, calibrated, tmp_path):
    path = _export(calibrated_checkpoint, tmp_path / "model.pt", "--format", "torchscript", "--dynamic_batch")
    files = {export.METADATA_FILE: ""}
    torch.jit.load(str(path), _extra_files=files)
    meta = json.loads(files[export.METADATA_FILE])
    assert meta["input_size"] == str(SIZE) and meta["format"] == "torchscript"
    assert float(meta["threshold_image"]) == calibrated[3].image
    run = export.torchscript_runner(str(path))
    pixels = calibrated[0]
    _assert_parity(run(pixels), calibrated)
    _assert_parity(run(pixels[:1]), calibrated, slice(0, 1))


@pytest.mark.slow
def test_predictor_writes_main_infers_outputs_without_torch(onnx_calibrated, calibrated_checkpoint,
                                                            synthetic_category, tmp_path, capsys):
    """main_infer.py --images (fp32) and predict_onnx.py (torch unimportable) on the same folder of
    64-px images (resized to 56): same paths, scores, normalised scores, labels, maps."""
    model = onnx_calibrated
    images = synthetic_category / "test"
    infer_out, onnx_out = tmp_path / "infer", tmp_path / "onnx"
    args = main_infer.get_args_parser().parse_args(
        ["--checkpoint", str(calibrated_checkpoint), "--images", str(images), "--output_dir", str(infer_out),
         "--amp", "none", "--num_workers", "0", "--no_overlays"])
    capsys.readouterr()
    assert run_cli(main_infer.main, args) == 0
    infer_stdout = capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT / "scripts" / "predict_onnx.py"),
                           "--onnx", str(model), "--images", str(images), "--output_dir", str(onnx_out),
                           "--batch_size", "3", "--no_overlays"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not square" not in proc.stderr  # 64-px squares are resized to 56 without a note
    # the same threshold line, header and per-image lines (verdict, score, normalised score, path)
    def verdict_lines(stdout):
        start = stdout.splitlines().index(next(line for line in stdout.splitlines() if line.startswith("threshold:")))
        return stdout.splitlines()[start:start + 2 + len(rows)]
    with open(infer_out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert verdict_lines(proc.stdout) == verdict_lines(infer_stdout)
    assert verdict_lines(proc.stdout)[1].split() == ["verdict", "score", "normalised", "path"]
    with open(infer_out / "scores.csv", newline="") as f:
        expected = list(csv.DictReader(f))
    with open(onnx_out / "scores.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == predict_onnx.CSV_COLUMNS
        rows = list(reader)
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    assert all(r["label"] == "" == e["label"] and r["defect"] == "" == e["defect"] for r, e in zip(rows, expected))
    for column, tolerance in (("score", dict(rtol=SCORE_RTOL, atol=0)), ("score_normalized", dict(rtol=0, atol=2e-6))):
        np.testing.assert_allclose([float(r[column]) for r in rows], [float(e[column]) for e in expected],
                                   **tolerance)
    assert [r["pred_label"] for r in rows] == [e["pred_label"] for e in expected]
    for r in rows:
        stem = Path(r["path"]).with_suffix(".npy")
        got, want = np.load(onnx_out / "anomaly_maps" / stem), np.load(infer_out / "anomaly_maps" / stem)
        assert got.dtype == np.float32 and got.shape == (SIZE, SIZE)
        np.testing.assert_allclose(got, want, atol=MAP_ATOL, rtol=0)


def test_predictor_imports_no_torch():
    code = ("import sys; sys.path.insert(0, 'scripts'); import predict_onnx; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---- bad input --------------------------------------------------------------------------------
def _run(capsys, module, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = run_cli(module.main, module.get_args_parser().parse_args([str(a) for a in argv]))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return code, lines[0]


def test_export_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    cases = [
        (["--checkpoint", checkpoint, "--output", tmp_path / "missing" / "m.onnx"], "does not exist"),
        (["--checkpoint", checkpoint, "--output", tmp_path], "is a folder"),
        (["--checkpoint", tmp_path / "none.pth", "--output", out, "--threshold", 1], "does not exist"),
        (["--checkpoint", checkpoint, "--output", out, "--opset", 12, "--threshold", 1], "--opset 12"),
        (["--checkpoint", checkpoint, "--output", out], "pass --threshold VALUE"),
        (["--checkpoint", checkpoint, "--output", out, "--threshold", -1], "--threshold -1"),
        (["--checkpoint", checkpoint, "--output", out, "--batch", 0, "--threshold", 1], "--batch"),
    ]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    cases.append((["--checkpoint", tmp_path / "junk.pth", "--output", out, "--threshold", 1], "junk.pth"))
    for argv, fragment in cases:
        code, line = _run(capsys, export, *argv)
        assert code == 2 and fragment in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pth"]
    with pytest.raises(SystemExit) as e:
        export.get_args_parser().parse_args(["--checkpoint", "c", "--output", "o", "--format", "tflite"])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


def test_export_that_disagrees_with_pytorch_writes_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    """The self-check runs before the rename: a graph that scores differently leaves no file (the
    exporter is replaced by stand-ins so that this takes no export time)."""
    def wrong(images):
        n, s = images.shape[:2]
        return (np.ones(n, np.float32), np.ones(n, np.float32), np.ones(n, np.int64), np.zeros((n, s, s), np.float32))
    monkeypatch.setattr(export, "torchscript_bytes", lambda module, example, metadata: b"graph")
    monkeypatch.setattr(export, "torchscript_runner", lambda data: wrong)
    out = tmp_path / "m.pt"
    code, line = _run(capsys, export, "--checkpoint", checkpoint, "--output", out, "--format", "torchscript",
                      "--threshold", 1)
    assert code == 1 and "disagrees with PyTorch" in line and "nothing written" in line
    assert list(tmp_path.iterdir()) == []


def test_missing_export_packages_name_the_requirements_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    with pytest.raises(export.UserError, match="requirements-export.txt"):
        export.require_packages("onnx")
    export.require_packages("torchscript")  # TorchScript needs nothing beyond torch


def test_predictor_bad_input_is_one_line(tmp_path, capsys):
    img = save_image(random_rgb(), tmp_path / "imgs" / "a.png")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX file that export.py did not write
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    for model, fragment in [(tmp_path / "none.onnx", "does not exist"), (tmp_path / "junk.onnx", "not an ONNX file"),
                            (foreign, "not one of scripts/export.py's")]:
        code, line = _run(capsys, predict_onnx, "--model", model, "--images", img.parent, "--output_dir",
                          tmp_path / "out")
        assert code == 2 and fragment in line, line
    assert not (tmp_path / "out").exists()


def test_predictor_reads_images_as_main_infer_does(tmp_path):
    """Same pixels as util.datasets' TestDataset for odd sizes and modes (the parity of the maps rests on it)."""
    from PIL import Image
    save_image(random_rgb(30, 20, seed=1), tmp_path / "a.png")
    save_image(random_rgb(56, 56, seed=2)[..., 0], tmp_path / "gray.png")
    Image.fromarray(random_rgb(40, 40, seed=3)).convert("RGBA").save(tmp_path / "rgba.png")
    rel, pixels, non_square, skipped = predict_onnx.decode(predict_onnx.find_images(tmp_path), SIZE)
    dataset = TestDataset(unlabelled_items(tmp_path), SIZE)
    assert rel == [it.rel_path for it in dataset.items] == ["a.png", "gray.png", "rgba.png"]
    assert non_square == dataset.non_square == [("a.png", (20, 30))] and skipped == []
    assert np.array_equal(pixels, dataset.images.permute(0, 2, 3, 1).numpy())


def test_predictor_skips_unreadable_images_and_refuses_clashing_names(tmp_path, capsys):
    save_image(random_rgb(), tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    rel, pixels, _, skipped = predict_onnx.decode(predict_onnx.find_images(tmp_path), SIZE)
    assert rel == ["a.png"] and pixels.shape == (1, SIZE, SIZE, 3)
    assert [(s.path, s.reason.startswith("cannot read image")) for s in skipped] == [("broken.png", True)]
    assert "skipping" in capsys.readouterr().err
    save_image(random_rgb(), tmp_path / "a.jpg")
    with pytest.raises(predict_onnx.UserError, match="would share the output name a.npy"):
        predict_onnx.check_stems(predict_onnx.find_images(tmp_path))


@pytest.mark.slow
def test_benchmark_export_reports_parity_and_speed_of_every_engine(synthetic_category, tmp_path, capsys):
    """scripts/benchmark_export.py in its smallest form: the JSON it promises; the exact engines exact."""
    import benchmark_export
    out = tmp_path / "bench.json"
    args = benchmark_export.get_args_parser().parse_args(
        ["--data_path", str(synthetic_category), "--models", "tiny", "--input_size", str(SIZE), "--steps", "1",
         "--warmup", "0", "--parity_images", "3", "--holdout_images", "3", "--engines", "all", "--json", str(out)])
    assert run_cli(benchmark_export.main, args) == 0
    (result,) = json.loads(out.read_text())["results"]
    engines = result["engines"]
    assert list(engines) == ["pytorch_fp32", "pytorch_fast", "onnxruntime_fp32", "onnxruntime_int8", "torchscript_fp32"]
    for name in ("onnxruntime_fp32", "torchscript_fp32"):
        assert engines[name]["within_tolerance"]
        assert all(case["exact"] and case["n_images"] == 3 for case in engines[name]["parity"].values())
    for e in engines.values():
        assert e["img_s"] > 0 and e["ms_per_img"] == pytest.approx(1000 / e["img_s"])
    assert result["threshold"]["n_images"] == 3
