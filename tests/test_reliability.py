"""Hostile-user cases of every entry point: each ends in a one-line error (exit 2 for bad usage or
input, 1 for a failure during work, 130 for Ctrl-C) or in a documented recovery.

docs/RELIABILITY.md lists every case and the test that checks it; cases already covered beside the
code they guard (tests/test_train.py, test_infer.py, ...) are not repeated here. Entry points run
in-process through util.cli.run_cli (the same path as the scripts, minus the seconds a subprocess
spends importing torch), except where a real process is the point (SIGKILL).
"""
import io
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_infer
import main_train
from image_files import random_rgb, save_image, write_small_category
from lora_utils import unmerged_state_dict
from models_mae import create_model
from util.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
SIZE = 56  # tiny model, 8x8 patch grid
TINY = ["--model", "mae_vit_tiny_patch7", "--input_size", str(SIZE), "--batch_size", "4", "--num_workers", "0",
        "--warmup_epochs", "1", "--print_freq", "1", "--blr", "1e-2", "--holdout", "0"]
TRAIN_ARGS = {"model": "mae_vit_tiny_patch7", "input_size": SIZE, "norm_pix_loss": False, "lora_rank": 4,
              "lora_alpha": 4.0, "lora_dropout": 0.0, "lora_targets": ["qkv", "proj"], "epochs": 1}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers ----------------------------------------------------------------------------------
def _cli(module, argv, capsys) -> tuple[int, str, str]:
    """`python <module>.py ARGV` in this process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = run_cli(module.main, module.get_args_parser().parse_args([str(a) for a in argv]))
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(code: int, err: str, *fragments: str, exit_code: int = 2) -> str:
    """The run failed with `exit_code` and exactly one `error:` line (warnings may come before it)."""
    assert code == exit_code, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _only_one_line(code: int, err: str, *fragments: str) -> str:
    """Like _one_error_line, and nothing else on stderr at all."""
    line = _one_error_line(code, err, *fragments)
    assert err.strip() == line, err
    return line


def _png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB(A) PNG (Pillow cannot write one): [H, W, 3 or 4] uint16."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _log_epochs(out: Path) -> list[int]:
    import json
    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A main_train.py-format checkpoint of a randomly initialised tiny model at 56 px."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=4)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-0.pth"
    torch.save({"model": unmerged_state_dict(model), "optimizer": {}, "scaler": None, "epoch": 0,
                "args": TRAIN_ARGS}, path)
    return path


# ---- data -------------------------------------------------------------------------------------
def test_every_image_format_trains(tmp_path, capsys):
    """16-bit RGB/RGBA/gray, 8-bit gray, RGBA and palette PNGs, JPEG and TIFF all train, none skipped."""
    good = tmp_path / "cat/train/good"
    rgb = random_rgb(24, 24)
    _png16(good / "rgb16.png", rgb.astype(np.uint16) * 257)
    _png16(good / "rgba16.png", np.dstack([rgb, np.full((24, 24), 255, np.uint8)]).astype(np.uint16) * 257)
    save_image(rgb[..., 0].astype(np.uint16) * 257, good / "gray16.png")
    save_image(rgb[..., 1], good / "gray.png")
    save_image(np.dstack([rgb, np.full((24, 24), 200, np.uint8)]), good / "rgba.png")
    Image.fromarray(rgb).convert("P").save(good / "palette.png")
    save_image(rgb, good / "photo.jpg", quality=90)
    save_image(rgb, good / "scan.tif")
    assert {Image.open(p).mode for p in good.iterdir()} >= {"RGB", "RGBA", "L", "P"}
    out = tmp_path / "out"
    code, stdout, err = _cli(main_train, ["--data_path", tmp_path / "cat", "--output_dir", out, *TINY,
                                          "--epochs", "1"], capsys)
    assert code == 0, err
    assert "skipping" not in err and "unreadable" not in err
    assert "on 8 images" in stdout
    assert _load(out / "checkpoint-last.pth")["epoch"] == 0


def test_orphan_mask_and_missing_mask_are_warned_and_skipped_by_pixel_metrics(checkpoint, tmp_path, capsys):
    root = write_small_category(tmp_path / "cat", n_anomalous=2)
    m = np.zeros((20, 20), np.uint8)
    m[1:3, 1:3] = 255
    save_image(m, root / "ground_truth/crack/007_mask.png")  # its image test/crack/007.png does not exist
    out = tmp_path / "out"
    code, stdout, err = _cli(main_infer, ["--checkpoint", checkpoint, "--data_path", root, "--output_dir", out,
                                          "--num_workers", "0", "--no_overlays", "--amp", "none"], capsys)
    assert code == 0, err
    assert "1 mask(s) without an image" in err and "007_mask.png" in err
    assert "1 anomalous image(s) have no ground-truth mask" in err
    import json
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images_without_mask"] == 1 and metrics["n_anomalous"] == 2
    assert metrics["pixel_auroc"] is not None  # computed from the images that have a mask
    assert "1 of 2 anomalous images have no mask" in stdout


def test_spaces_and_non_ascii_names_end_to_end(checkpoint, tmp_path, capsys):
    root = tmp_path / "cat égal 漢"
    save_image(random_rgb(30, 50), root / "test/scratch mark/näme 1.png")
    m = np.zeros((30, 50), np.uint8)
    m[10:20, 10:30] = 255
    save_image(m, root / "ground_truth/scratch mark/näme 1_mask.png")
    save_image(random_rgb(seed=4), root / "test/good/ok ü.png")
    out = tmp_path / "out ø"
    code, _, err = _cli(main_infer, ["--checkpoint", checkpoint, "--data_path", root, "--output_dir", out,
                                     "--num_workers", "0", "--amp", "none"], capsys)
    assert code == 0, err
    assert np.load(out / "anomaly_maps/test/scratch mark/näme 1.npy").shape == (SIZE, SIZE)
    assert (out / "overlays/test/good/ok ü.png").is_file()
    rows = (out / "scores.csv").read_text(encoding="utf-8").splitlines()
    assert sorted(r.split(",")[0] for r in rows[1:]) == ["test/good/ok ü.png", "test/scratch mark/näme 1.png"]


# ---- flags ------------------------------------------------------------------------------------
@NO_GPU
@pytest.mark.parametrize("entry", ["main_train", "main_infer", "benchmark"])
def test_device_cuda_without_a_gpu(entry, synthetic_category, checkpoint, tmp_path, capsys):
    if entry == "main_train":
        module, argv = main_train, ["--data_path", synthetic_category, "--output_dir", tmp_path / "o", *TINY]
    elif entry == "main_infer":
        module, argv = main_infer, ["--checkpoint", checkpoint, "--images", synthetic_category,
                                    "--output_dir", tmp_path / "o"]
    else:
        from scripts import benchmark as module
        argv = ["--model", "mae_vit_tiny_patch7", "--input_size", "28"]
    code, _, err = _cli(module, [*argv, "--device", "cuda"], capsys)
    _only_one_line(code, err, "--device cuda", "no CUDA GPU", "--device cpu")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, fragments", [
    (["--batch_size", "0"], ["--batch_size", "at least 1"]),
    (["--num_workers", "-1"], ["--num_workers", "0 or more"]),
    (["--sigma", "-1"], ["--sigma", "sigma must be >= 0"]),
    (["--topk_fraction", "0", "--score", "topk"], ["--topk_fraction", "(0, 1]"]),
    (["--num_masks", "3"], ["--num_masks 3", "grid side (8)", "[2, 4, 8]"]),
    (["--mask_pattern", "grid", "--num_masks", "3"], ["--mask_pattern grid", "square num_masks"]),
    (["--mask_pattern", "grid", "--num_masks", "9"], ["--mask_pattern grid", "divisible by 3"]),
    (["--mask_pattern", "checkerboard"], ["--mask_pattern checkerboard", "num_masks=2 only"]),
    (["--mask_pattern", "hexagons"], ["--mask_pattern", "invalid choice", "stripes"]),
], ids=["batch_size_0", "num_workers_neg", "sigma_neg", "topk_fraction_0", "stripes_3_on_grid_8", "grid_3",
        "grid_9_on_grid_8", "checkerboard_4", "unknown_pattern"])
def test_infer_bad_flags(flags, fragments, checkpoint, synthetic_category, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = _cli(main_infer, ["--checkpoint", checkpoint, "--images", synthetic_category, "--output_dir", out,
                                     *flags], capsys)
    _only_one_line(code, err, *fragments)
    assert not out.exists()  # checked before anything is written


def test_train_eval_every_needs_a_grid_the_eval_masks_fit(synthetic_category, tmp_path, monkeypatch, capsys):
    """49 px = a 7x7 grid, which the 4 default (grid) views cannot split: refused before any epoch runs
    (it used to fail with a ValueError at the first evaluation, after training)."""
    monkeypatch.setattr(main_train, "TrainDataset", None)  # reading data would crash the test
    code, _, err = _cli(main_train, ["--data_path", synthetic_category, "--output_dir", tmp_path / "o", *TINY,
                                     "--input_size", "49", "--eval_every", "1"], capsys)
    _only_one_line(code, err, "--eval_every with --input_size 49", "e.g. 56, 112 or 224")


@pytest.mark.parametrize("flags, fragments", [
    (["--n_train", "-1"], ["--n_train -1", "0 or more"]),
    (["--n_per_defect", "-3"], ["--n_per_defect -3"]),
    (["--size", "8"], ["--size 8", "too small", "at least 32"]),
    (["--kind", "wood"], ["--kind", "invalid choice", "capsule"]),
    (["--size", "big"], ["--size", "invalid int value"]),
], ids=["n_train_neg", "n_per_defect_neg", "size_too_small", "unknown_kind", "size_not_int"])
def test_make_synthetic_bad_flags(flags, fragments, tmp_path, capsys):
    from scripts import make_synthetic_mvtec
    code, _, err = _cli(make_synthetic_mvtec, ["--dst", tmp_path / "d", *flags], capsys)
    _only_one_line(code, err, *fragments)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flags, fragments", [
    (["--model", "mae_vit_giant"], ["--model mae_vit_giant", "mae_vit_tiny_patch7", "mae_vit_large_patch7"]),
    (["--input_size", "0"], ["--input_size 0", "multiple of the patch size 7"]),
    (["--input_size", "30"], ["--input_size 30", "multiple of the patch size 7"]),
    (["--batch_size", "0"], ["--batch_size 0", "at least 1"]),
    (["--steps", "-2"], ["--steps -2", "at least 1"]),
    (["--warmup", "-1"], ["--warmup -1", "at least"]),
    (["--input_size", "49", "--num_masks", "4"], ["--num_masks 4", "divisible"]),
], ids=["unknown_model", "input_size_0", "input_size_30", "batch_size_0", "steps_neg", "warmup_neg",
        "num_masks_4_on_grid_7"])
def test_benchmark_bad_flags(flags, fragments, capsys):
    from scripts import benchmark
    code, _, err = _cli(benchmark, ["--model", "mae_vit_tiny_patch7", "--input_size", "28", *flags], capsys)
    _only_one_line(code, err, *fragments)


def test_prepare_mvtec_bad_flag_is_one_line(tmp_path, capsys):
    from scripts import prepare_mvtec
    code, _, err = _cli(prepare_mvtec, ["--src", tmp_path, "--dst", tmp_path / "o", "--catgories", "x"], capsys)
    _only_one_line(code, err, "unrecognized arguments: --catgories")


def test_debug_flag_adds_the_traceback(synthetic_category, tmp_path, capsys):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"junk")
    argv = ["--checkpoint", bad, "--images", synthetic_category, "--output_dir", tmp_path / "o"]
    code, _, err = _cli(main_infer, argv, capsys)
    _only_one_line(code, err, f"{bad} is not a PyTorch checkpoint")
    code, _, err = _cli(main_infer, [*argv, "--debug"], capsys)
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")


# ---- checkpoints ------------------------------------------------------------------------------
def _bad_file(kind: str, checkpoint: Path, path: Path) -> Path:
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:  # the first half of a real checkpoint's bytes: a copy or a save cut short
        data = checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind, message", [("random", "is not a PyTorch checkpoint (cannot unpickle)"),
                                           ("half", "looks truncated (incomplete zip archive)")],
                         ids=["random_bytes", "first_half"])
@pytest.mark.parametrize("entry", ["train --resume", "train --pretrained", "infer --checkpoint"],
                         ids=["train_resume", "train_pretrained", "infer_checkpoint"])
def test_unreadable_checkpoint_is_one_short_line(entry, kind, message, checkpoint, synthetic_category, tmp_path,
                                                 capsys):
    bad = _bad_file(kind, checkpoint, tmp_path / f"{kind}.pth")
    out = tmp_path / "o"
    if entry.startswith("train"):
        module, argv = main_train, ["--data_path", synthetic_category, "--output_dir", out, *TINY,
                                    entry.split()[1], bad]
    else:
        module, argv = main_infer, ["--checkpoint", bad, "--images", synthetic_category, "--output_dir", out]
    code, _, err = _cli(module, argv, capsys)
    line = _only_one_line(code, err, str(bad), message)
    assert len(line) < 300 and "weights_only" not in line  # not PyTorch's page-long explanation
    assert not out.exists()


def test_mae_training_checkpoint_to_resume_points_to_pretrained(synthetic_category, tmp_path, capsys):
    """facebookresearch/mae's own checkpoint-*.pth (options as an argparse.Namespace) is weights to
    start from, not a run to continue: --resume says so; --pretrained loads it."""
    import argparse

    from official_ckpt import official_mae_state_dict
    from util.checkpoint import load_pretrained
    path = tmp_path / "checkpoint-399.pth"
    state = official_mae_state_dict(embed_dim=192, depth=12, decoder_dim=128, decoder_depth=2)
    torch.save({"model": state, "optimizer": {}, "epoch": 399, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75)}, path)
    code, _, err = _cli(main_train, ["--data_path", synthetic_category, "--output_dir", tmp_path / "o", *TINY,
                                     "--resume", path], capsys)
    _only_one_line(code, err, f"--resume {path}", "another training program", f"--pretrained {path}")
    report = load_pretrained(create_model("mae_vit_tiny_patch7", img_size=SIZE), path, verbose=False)
    assert "blocks.11.attn.qkv.weight" in report.loaded and "mask_token" in report.loaded


# ---- faults -----------------------------------------------------------------------------------
_KILL_WHILE_SAVING = """
import io, os, runpy, signal, sys
sys.path.insert(0, {repo!r})
import torch
real_save, calls = torch.save, [0]

def dying_save(obj, f, *args, **kwargs):
    # call {kill_at} (epoch 1's checkpoint-last.pth): write half of the bytes, then die like `kill -9`
    calls[0] += 1
    if calls[0] < {kill_at}:
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
sys.argv[0] = {script!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_while_saving_keeps_the_last_checkpoint_and_resume_auto_finishes(synthetic_category, tmp_path,
                                                                                 capsys):
    out = tmp_path / "run"
    wrapper = tmp_path / "kill_while_saving.py"
    # --save_every 1: epoch 0 writes checkpoint-0 (save 1) and checkpoint-last (2); epoch 1 writes
    # checkpoint-1 (3) and is killed half-way through checkpoint-last (4).
    wrapper.write_text(_KILL_WHILE_SAVING.format(repo=str(REPO), script=str(REPO / "main_train.py"), kill_at=4))
    argv = ["--data_path", str(synthetic_category), "--output_dir", str(out), *TINY, "--epochs", "3",
            "--save_every", "1"]
    proc = subprocess.run([sys.executable, str(wrapper), *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _load(out / "checkpoint-last.pth")["epoch"] == 0  # the previous one, whole
    stale = list(out.glob(".checkpoint-last.pth.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the half-written file is a dot-named temporary
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth", "checkpoint-1.pth",
                                                                    "checkpoint-last.pth"]
    assert _log_epochs(out) == [0, 1]  # epoch 1 was logged before the kill

    code, stdout, err = _cli(main_train, [*argv, "--resume", "auto"], capsys)
    assert code == 0, err
    assert "resumed from" in stdout and "(epoch 0 done)" in stdout
    assert "removed 1 half-written checkpoint file(s)" in err
    assert _load(out / "checkpoint-last.pth")["epoch"] == 2
    assert _log_epochs(out) == [0, 1, 2]  # epoch 1's record from the killed run was replaced, not repeated
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_interrupted_inference_leaves_no_half_written_map(checkpoint, synthetic_category, tmp_path, monkeypatch,
                                                          capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")  # not an output of main_infer.py: --overwrite keeps it
    real_save, calls = np.save, []

    def ctrl_c_while_writing(f, arr, *args, **kwargs):  # Ctrl-C half-way through the 3rd map
        calls.append(1)
        if len(calls) < 3:
            return real_save(f, arr, *args, **kwargs)
        buf = io.BytesIO()
        real_save(buf, arr, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", ctrl_c_while_writing)
    code, _, err = _cli(main_infer, ["--checkpoint", checkpoint, "--data_path", synthetic_category, "--output_dir",
                                     out, "--overwrite", "--num_workers", "0", "--batch_size", "1", "--amp", "none"],
                      capsys)
    monkeypatch.undo()
    assert code == 130 and "error: interrupted" in err and "Traceback" not in err
    maps = sorted((out / "anomaly_maps").rglob("*.npy"))
    assert len(maps) == 2  # the two finished maps, not the third half of one
    for path in maps:
        assert np.load(path).shape == (SIZE, SIZE)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert (out / "mine.txt").read_text() == "keep"
    assert not (out / "scores.csv").exists()  # written only after a complete pass
