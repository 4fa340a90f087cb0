"""main_infer.py end to end: the promised files, their formats, metrics recomputed from the dumped
maps, --images, bad checkpoints and bad options.

The main labelled run, an --images run and one bad checkpoint go through a real subprocess (the
script's entry point); the other cases call `run_cli(main, ...)` in-process, the same path minus the
~5-10 s of interpreter start-up and imports each subprocess costs on a small CPU.
"""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main_infer
from lora_utils import unmerged_state_dict
from models_mae import AnomalyScorer, create_model
from util.cli import run_cli
from util.datasets import TestDataset, find_test_items, load_mask
from util.metrics import compute_metrics

ROOT = Path(__file__).resolve().parents[1]
SIZE = 112  # 16x16 patch grid for patch 7
TRAIN_ARGS = {"model": "mae_vit_tiny_patch7", "input_size": SIZE, "norm_pix_loss": False, "lora_rank": 4,
              "lora_alpha": None, "lora_dropout": 0.0, "lora_targets": ["qkv", "proj"], "epochs": 1}
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)  # non-zero adapters, so merging them matters
    return model


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main_infer.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _run_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    capsys.readouterr()
    code = run_cli(main_infer.main, main_infer.get_args_parser().parse_args([str(a) for a in args]))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint in main_train.py's format (LoRA unmerged) of a randomly initialised tiny model."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-0.pth"
    torch.save({"model": unmerged_state_dict(_model()), "optimizer": {}, "scaler": None, "epoch": 0,
                "args": TRAIN_ARGS}, path)
    return path


@pytest.fixture(scope="module")
def labelled_run(synthetic_category, checkpoint, tmp_path_factory):
    """One labelled run with --overwrite into an OUT that holds an earlier run's map and an unrelated file."""
    out = tmp_path_factory.mktemp("infer") / "out"
    (out / "anomaly_maps").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "anomaly_maps" / "old.npy").write_bytes(b"an earlier run's")
    proc = _run("--checkpoint", checkpoint, "--data_path", synthetic_category, "--output_dir", out,
                "--amp", "none", "--num_workers", "0", "--batch_size", "5", "--sigma", "2", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow
def test_labelled_run_writes_every_promised_file(synthetic_category, labelled_run):
    out, proc = labelled_run
    items = find_test_items(synthetic_category)
    for name in ("scores.csv", "skipped.csv", "report.html", "metrics.json", "roc.png", "summary.png", "args.json"):
        assert (out / name).is_file(), name
    assert (out / "notes.txt").read_text() == "keep me"  # not ours: kept
    assert not (out / "anomaly_maps" / "old.npy").exists()  # --overwrite emptied our folder first
    assert not list(out.rglob("*.tmp"))  # no temporary left behind
    for item in items:
        stem = Path(item.rel_path).with_suffix("")
        amap = np.load(out / "anomaly_maps" / f"{stem}.npy")
        assert amap.dtype == np.float32 and amap.shape == (SIZE, SIZE)
        assert (out / "overlays" / f"{stem}.png").is_file()
    header, rows = _read_csv(out / "scores.csv")
    assert header == ["path", "label", "defect", "score", "score_normalized", "pred_label"]
    assert all(r["score_normalized"] == "" and r["pred_label"] == "" for r in rows)  # uncalibrated: no threshold
    assert sorted(r["path"] for r in rows) == sorted(it.rel_path for it in items)
    by_path = {it.rel_path: it for it in items}
    for r in rows:
        assert int(r["label"]) == by_path[r["path"]].label and r["defect"] == by_path[r["path"]].defect
        amap = np.load(out / "anomaly_maps" / f"{Path(r['path']).with_suffix('')}.npy")
        assert float(r["score"]) == float(amap.max())  # --score max: the maximum of the saved map
    options = json.loads((out / "args.json").read_text())
    assert options["device"] == "cpu" and options["amp"] == "none" and options["input_size"] == SIZE
    assert options["sigma"] == 2.0 and options["num_masks"] == 4
    # console: the table with per-defect rows, then where the pictures are
    assert "image AUROC" in proc.stdout and "per-defect image AUROC" in proc.stdout
    assert "  crack" in proc.stdout and str(out / "overlays") in proc.stdout and "summary.png" in proc.stdout


@pytest.mark.slow
def test_labelled_metrics_match_a_recomputation_from_the_dumped_maps(synthetic_category, labelled_run):
    out, _ = labelled_run
    metrics = json.loads((out / "metrics.json").read_text())
    dataset = TestDataset(find_test_items(synthetic_category), SIZE)
    _, rows = _read_csv(out / "scores.csv")
    score_of = {r["path"]: float(r["score"]) for r in rows}
    items = [dataset[i] for i in range(len(dataset))]
    maps = np.stack([np.load(out / "anomaly_maps" / f"{Path(it['rel_path']).with_suffix('')}.npy") for it in items])
    expected = compute_metrics(np.array([score_of[it["rel_path"]] for it in items], dtype=np.float32),
                               [it["label"] for it in items], [it["defect"] for it in items],
                               anomaly_maps=maps, masks=np.stack([it["mask"].numpy() > 0.5 for it in items]),
                               has_mask=[it["has_mask"] for it in items])
    for key in METRIC_KEYS:
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0
        assert metrics[key] == pytest.approx(expected[key]), key
    assert metrics["pixel_auroc"] is not None and metrics["aupro"] is not None
    assert metrics["per_defect"] == pytest.approx(expected["per_defect"])
    assert metrics["per_defect_image_auroc"] == metrics["per_defect"]
    assert "never deploy" in metrics["notes"]["image_f1_threshold"] and "per_defect" in metrics["notes"]
    assert set(metrics["per_defect"]) == {"crack", "poke", "scratch", "faulty_imprint", "squeeze"}
    assert metrics["n_images"] == len(items) == 14 and metrics["n_anomalous"] == 10


@pytest.mark.slow
def test_maps_equal_the_unmerged_model(synthetic_category, labelled_run):
    """The checkpoint alone rebuilds the model: maps from the merged model == the LoRA-unmerged one."""
    out, _ = labelled_run
    dataset = TestDataset(find_test_items(synthetic_category), SIZE)
    scorer = AnomalyScorer(_model().eval(), num_masks=4, mask_pattern="stripes", sigma=2.0)
    with torch.inference_mode():
        expected = scorer(torch.stack([dataset[i]["image"] for i in range(3)])).anomaly_maps
    for i in range(3):
        saved = np.load(out / "anomaly_maps" / f"{Path(dataset[i]['rel_path']).with_suffix('')}.npy")
        np.testing.assert_allclose(saved, expected[i].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_full_eval_size_and_missing_ground_truth(synthetic_category, checkpoint, tmp_path, capsys):
    out = tmp_path / "full"
    proc = _run_in_process(capsys, "--checkpoint", checkpoint, "--data_path", synthetic_category, "--output_dir", out,
                "--amp", "none", "--num_workers", "0", "--no_overlays", "--eval_size", "full")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "overlays").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    items = find_test_items(synthetic_category)
    maps, masks, scores = [], [], []
    for it in items:  # 64 px images: maps upsampled to the native masks
        small = torch.from_numpy(np.load(out / "anomaly_maps" / f"{Path(it.rel_path).with_suffix('')}.npy"))
        scores.append(float(small.max()))
        maps.append(F.interpolate(small[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0].numpy())
        masks.append(load_mask(it.mask_path) if it.mask_path else np.zeros((64, 64), bool))
    expected = compute_metrics(np.array(scores, np.float32), [it.label for it in items], [it.defect for it in items],
                               anomaly_maps=np.stack(maps), masks=np.stack(masks), has_mask=[it.has_mask for it in items])
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(expected[key]), key
    assert metrics["eval_size"] == "full"

    # the same test images without ground_truth/: image metrics, pixel metrics skipped with a note
    bare = tmp_path / "bare"
    shutil.copytree(synthetic_category / "test", bare / "test")
    out2 = tmp_path / "bare_out"
    proc = _run_in_process(capsys, "--checkpoint", checkpoint, "--data_path", bare, "--output_dir", out2, "--num_workers", "0",
                "--no_overlays")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out2 / "metrics.json").read_text())
    assert metrics["image_auroc"] is not None
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert "pixel metrics" in proc.stdout and "skipped" in proc.stdout


@pytest.mark.slow
def test_images_folder_and_single_file(synthetic_category, checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(synthetic_category / "test" / "crack", folder / "a")
    (folder / "b").mkdir()
    shutil.copy(synthetic_category / "test" / "good" / "000.png", folder / "b" / "g.png")
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG not really")  # reported and skipped
    out = tmp_path / "out"
    proc = _run("--checkpoint", checkpoint, "--images", folder, "--output_dir", out, "--num_workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "broken.png" in proc.stderr
    header, rows = _read_csv(out / "skipped.csv")
    assert header == ["path", "reason"] and [r["path"] for r in rows] == ["b/broken.png"]
    assert rows[0]["reason"].startswith("cannot read image")
    assert "1 file not scored" in proc.stdout
    header, rows = _read_csv(out / "scores.csv")
    assert header == ["path", "label", "defect", "score", "score_normalized", "pred_label"]
    assert sorted(r["path"] for r in rows) == ["a/000.png", "a/001.png", "b/g.png"]
    assert all(r["label"] == "" for r in rows)
    for r in rows:
        stem = Path(r["path"]).with_suffix("")
        assert np.load(out / "anomaly_maps" / f"{stem}.npy").shape == (SIZE, SIZE)
        assert (out / "overlays" / f"{stem}.png").is_file()
    assert not (out / "metrics.json").exists() and not (out / "summary.png").exists()

    single = tmp_path / "single"
    proc = _run_in_process(capsys, "--checkpoint", checkpoint, "--images", folder / "b" / "g.png", "--output_dir", single,
                "--num_workers", "0", "--no_overlays")
    assert proc.returncode == 0, proc.stderr
    _, rows = _read_csv(single / "scores.csv")
    assert [r["path"] for r in rows] == ["g.png"]
    assert np.load(single / "anomaly_maps" / "g.npy").dtype == np.float32


@pytest.mark.slow
def test_junk_checkpoint_exits_2_in_a_subprocess(synthetic_category, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "out"
    _assert_one_line_error(_run("--checkpoint", junk, "--images", synthetic_category, "--output_dir", out),
                           str(junk))
    assert not out.exists()


def test_bad_checkpoints_and_options_exit_2(synthetic_category, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:100_000])
    _assert_one_line_error(_run_in_process(capsys, "--checkpoint", truncated, "--images", synthetic_category,
                                           "--output_dir", out), str(truncated))

    official = tmp_path / "mae_pretrain.pth"  # the official format: {'model': ...}, no 'args'
    state = {k: v for k, v in torch.load(checkpoint, weights_only=True)["model"].items() if "lora" not in k}
    torch.save({"model": state}, official)
    _assert_one_line_error(_run_in_process(capsys, "--checkpoint", official, "--images", synthetic_category,
                                           "--output_dir", out), "pretrained weights", "not a trained MAE-AD checkpoint")

    _assert_one_line_error(_run_in_process(capsys, "--checkpoint", checkpoint, "--images", synthetic_category,
                                           "--output_dir", out, "--num_masks", "3"), "--num_masks 3", "divisible")
    _assert_one_line_error(_run_in_process(capsys, "--checkpoint", checkpoint, "--data_path", tmp_path / "missing",
                                           "--output_dir", out), "missing")
    _assert_one_line_error(_run_in_process(capsys, "--checkpoint", checkpoint, "--images", tmp_path / "missing.png",
                                           "--output_dir", out), "missing.png")
    assert not out.exists()  # nothing written before the inputs were checked


def test_checkpoint_of_another_variant_names_both(checkpoint, tmp_path, synthetic_category, capsys):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["args"] = {**ckpt["args"], "model": "mae_vit_small_patch7"}  # weights of tiny, options say small
    wrong = tmp_path / "wrong.pth"
    torch.save(ckpt, wrong)
    _assert_one_line_error(_run_in_process(capsys, "--checkpoint", wrong, "--images", synthetic_category,
                                           "--output_dir", tmp_path / "o"), "mae_vit_tiny_patch7", "mae_vit_small_patch7")


def test_adapter_file_with_pretrained_base_gives_the_same_maps(synthetic_category, checkpoint, tmp_path, capsys):
    from lora_utils import export_adapter, freeze_non_lora

    model = _model()
    base = {k: v for k, v in unmerged_state_dict(model).items() if "lora" not in k}
    base_path = tmp_path / "base.pth"
    torch.save({"model": base}, base_path)  # official-style base weights
    freeze_non_lora(model, set(base))
    adapter = tmp_path / "adapter.pth"
    export_adapter(model, adapter, args={**TRAIN_ARGS, "pretrained": str(tmp_path / "moved.pth")})
    image = synthetic_category / "test" / "crack" / "000.png"
    common = ("--images", image, "--no_overlays", "--num_workers", "0", "--amp", "none")

    # the base named in the adapter's options is gone: say so and point to --pretrained
    _assert_one_line_error(_run_in_process(capsys, "--checkpoint", adapter, "--output_dir", tmp_path / "x", *common),
                           "--pretrained")
    for name, extra in (("full", ("--checkpoint", checkpoint)), ("adapter", ("--checkpoint", adapter,
                                                                           "--pretrained", base_path))):
        proc = _run_in_process(capsys, *extra, "--output_dir", tmp_path / name, *common)
        assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "adapter" / "anomaly_maps" / "000.npy"),
                               np.load(tmp_path / "full" / "anomaly_maps" / "000.npy"), rtol=1e-5, atol=1e-6)


def test_output_dir_inside_the_images_folder_is_not_scored(synthetic_category, checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(synthetic_category / "test" / "poke", folder)
    out = folder / "out"
    args = ("--checkpoint", checkpoint, "--images", folder, "--output_dir", out, "--num_workers", "0")
    for again in ((), ("--overwrite",)):  # the second run sees the first run's overlays under OUT and leaves them out
        proc = _run_in_process(capsys, *args, *again)
        assert proc.returncode == 0, proc.stderr
    _, rows = _read_csv(out / "scores.csv")
    assert [r["path"] for r in rows] == ["000.png", "001.png"]
    assert "inside --output_dir" in proc.stderr
