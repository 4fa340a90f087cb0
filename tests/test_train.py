"""main_train.py end to end (tiny model, 56 px, a handful of images) and the training loop."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import main_train
from engine import _accumulation_groups, train_one_epoch
from models_mae import MaskedAutoencoderViT, create_model
from official_ckpt import write_official_checkpoint
from util.checkpoint import MODEL_ARG_KEYS, model_kwargs_from_args
from util.cli import UserError, run_cli
from util.distributed import parameter_fingerprint
from util.logger import Progress, RunLogger

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "mae_vit_tiny_patch7", "--input_size", "56", "--batch_size", "4", "--num_workers", "0",
        "--warmup_epochs", "1", "--print_freq", "1", "--holdout", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def category(synthetic_category) -> Path:
    """conftest's synthetic category: 64 px, 8 train images, 4 good and 10 anomalous test images."""
    return synthetic_category


def run_script(argv, timeout=180, env=None, module=None):
    cmd = [sys.executable, *(["-m", module] if module else []), *argv]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def cli(argv) -> int:
    """What `python main_train.py ARGV` does, in this process."""
    try:
        return run_cli(main_train.main, main_train.get_args_parser().parse_args(argv))
    except SystemExit as e:  # argparse errors
        return e.code


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


# ---- end to end -------------------------------------------------------------------------------
def test_end_to_end(category, tmp_path):
    out = tmp_path / "run"
    res = run_script(["main_train.py", "--data_path", str(category), "--output_dir", str(out), *TINY,
                      "--epochs", "4", "--blr", "1e-2", "--save_every", "2", "--eval_every", "2"])
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "trainable (LoRA)" in res.stdout  # the parameter table
    assert "epoch 3/3 [2/2] loss" in res.stdout  # plain progress lines (stdout is not a TTY)

    records = log_lines(out)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert {"train_loss", "lr", "images_per_s"} <= r.keys()
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
    evaluated = [r["epoch"] for r in records if "image_auroc" in r]
    assert evaluated == [1, 3] and {"pixel_auroc", "aupro"} <= records[1].keys()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "lr", "images_per_s", "image_auroc", "pixel_auroc", "aupro"} <= tags
    tb_loss = [e.value for e in events.Scalars("train_loss")]
    assert [e.step for e in events.Scalars("train_loss")] == [0, 1, 2, 3]
    assert tb_loss == pytest.approx([r["train_loss"] for r in records], rel=1e-6)

    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth", "checkpoint-2.pth",
                                                                    "checkpoint-last.pth"]
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 3 and ckpt["scaler"] is None and {"model", "optimizer", "args", "rng"} <= ckpt.keys()
    assert load(out / "checkpoint-2.pth")["epoch"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert "blocks.0.attn.qkv.weight" in ckpt["model"] and "blocks.0.attn.qkv.lora_B" in ckpt["model"]

    options = json.loads((out / "args.json").read_text())
    assert options == ckpt["args"]
    assert set(MODEL_ARG_KEYS) <= options.keys() and options["lora_targets"] == ["qkv", "proj"]
    assert options["lr"] == pytest.approx(1e-2 * 4 / 256) and options["train_mask_ratio"] == 0.75
    model = create_model(**model_kwargs_from_args(ckpt["args"]))
    model.load_state_dict(ckpt["model"], strict=True)


class Crash(Exception):
    pass


def _train_in_process(category: Path, out: Path, extra=()) -> None:
    argv = ["--data_path", str(category), "--output_dir", str(out), *TINY, "--epochs", "4", "--save_every", "1",
            "--blr", "1e-2", *extra]
    main_train.main(main_train.get_args_parser().parse_args(argv))


def test_resume_matches_an_uninterrupted_run(category, tmp_path, monkeypatch):
    full, parts = tmp_path / "full", tmp_path / "parts"
    _train_in_process(category, full)
    real = main_train.train_one_epoch

    def crash_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise Crash
        return real(*args, **kwargs)

    with monkeypatch.context() as m, pytest.raises(Crash):  # killed in epoch 2: checkpoint-last holds epoch 1
        m.setattr(main_train, "train_one_epoch", crash_in_epoch_2)
        _train_in_process(category, parts)
    assert load(parts / "checkpoint-last.pth")["epoch"] == 1
    _train_in_process(category, parts, extra=["--resume", "auto"])

    a, b = load(full / "checkpoint-last.pth"), load(parts / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6, msg=key)
    first = [r["train_loss"] for r in log_lines(full)]
    resumed = [r["train_loss"] for r in log_lines(parts)]
    assert resumed == pytest.approx(first, rel=1e-6)  # epochs 0, 1 from the first part, 2, 3 resumed


def test_freeze_non_lora_with_official_weights(category, tmp_path):
    official = write_official_checkpoint(tmp_path / "mae_pretrain_vit_tiny_full.pth", embed_dim=192, depth=12,
                                         decoder_dim=128, decoder_depth=2, patch=16)
    out = tmp_path / "frozen"
    argv = ["--data_path", str(category), "--output_dir", str(out), *TINY, "--epochs", "2", "--save_every", "1",
            "--blr", "1e-2", "--pretrained", str(tmp_path / "mae_pretrain_vit_tiny_full.pth"), "--freeze_non_lora"]
    assert cli(argv) == 0
    first, last = load(out / "checkpoint-0.pth")["model"], load(out / "checkpoint-last.pth")["model"]
    frozen = [k for k in official if not k.startswith(("pos_embed", "decoder_pos_embed", "patch_embed", "decoder_pred"))]
    assert "blocks.0.attn.qkv.weight" in frozen and "mask_token" in frozen
    for key in frozen:  # loaded, frozen: exactly the official values after training
        assert torch.equal(last[key], official[key]), key
    lora_b = [k for k in last if k.endswith(".lora_B")]
    assert lora_b and all(last[k].abs().sum() > 0 for k in lora_b)  # LoRA B starts at zero and trained
    assert all(not torch.equal(first[k], last[k]) for k in lora_b)
    for key in ("patch_embed.proj.weight", "decoder_pred.weight"):  # 16x16 -> re-initialised, trainable
        assert not torch.equal(first[key], last[key]), key
    trainable = sum(len(g["params"]) for g in load(out / "checkpoint-last.pth")["optimizer"]["param_groups"])
    model = create_model("mae_vit_tiny_patch7", img_size=56)
    assert trainable == len([k for k, _ in model.named_parameters() if k not in frozen])


@pytest.mark.slow
def test_data_parallel_two_processes(category, tmp_path):
    out = tmp_path / "ddp"
    res = run_script(["--nproc_per_node", "2", "main_train.py", "--data_path", str(category), "--output_dir",
                      str(out), *TINY, "--batch_size", "2", "--epochs", "1"], module="torch.distributed.run")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth", "checkpoint-last.pth"]
    assert len(log_lines(out)) == 1 and res.stdout.count("epoch 0/0 [2/2]") == 1  # rank 0 only
    # Every rank reports its fingerprint to rank 0, which checks they agree and prints it;
    # it must also be the fingerprint of the weights rank 0 saved.
    line = next(line for line in res.stdout.splitlines() if line.startswith("replica check"))
    assert "all 2 processes hold identical parameters" in line
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["args"]["world_size"] == 2 and ckpt["args"]["eff_batch_size"] == 4 and len(ckpt["rng"]) == 2
    model = create_model(**model_kwargs_from_args(ckpt["args"]))
    model.load_state_dict(ckpt["model"])
    assert f"(fingerprint {parameter_fingerprint(model.named_parameters())})" in line


@pytest.mark.slow
def test_a_failing_rank_fails_the_job(category, tmp_path):
    wrapper = tmp_path / "fail_rank1.py"  # main_train.py with rank 1 raising in its first epoch
    wrapper.write_text(textwrap.dedent(f"""
        import os, runpy, sys
        sys.path.insert(0, {str(REPO)!r})
        import engine
        real = engine.train_one_epoch
        def failing(*args, **kwargs):
            if os.environ["RANK"] == "1":
                raise RuntimeError("simulated failure on rank 1")
            return real(*args, **kwargs)
        engine.train_one_epoch = failing
        sys.argv[0] = {str(REPO / "main_train.py")!r}
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    res = run_script(["--nproc_per_node", "2", str(wrapper), "--data_path", str(category), "--output_dir",
                      str(tmp_path / "out"), *TINY, "--batch_size", "2", "--epochs", "1"],
                     module="torch.distributed.run", timeout=120)
    assert res.returncode != 0
    assert "simulated failure on rank 1" in res.stderr
    assert not (tmp_path / "out" / "checkpoint-last.pth").exists()


# ---- errors -----------------------------------------------------------------------------------
def test_cli_errors_are_one_line(tmp_path):
    runs = [  # both at once: most of each run is Python importing torch
        subprocess.Popen([sys.executable, "main_train.py", *argv], cwd=REPO, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for argv in (["--data_path", str(tmp_path / "nowhere"), *TINY],
                     ["--data_path", str(tmp_path), "--model", "mae_vit_giant"])]
    (_, missing), (_, unknown) = [p.communicate(timeout=120) for p in runs]
    assert [p.returncode for p in runs] == [2, 2]
    assert len(missing.strip().splitlines()) == 1 and "nowhere" in missing and "Traceback" not in missing
    assert len(unknown.strip().splitlines()) == 1 and "Traceback" not in unknown
    assert "mae_vit_giant" in unknown and "mae_vit_tiny_patch7" in unknown  # lists the known models


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--accum_iter", "0"], "--accum_iter 0: must be at least 1"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--input_size", "100"], "use a multiple of 7, e.g. 98 or 105"),
    (["--lora_targets", "qkv,foo"], "--lora_targets"),
    (["--holdout", "0.2", "--holdout_root", "elsewhere"], "--holdout 0.2 with --holdout_root"),
], ids=["batch_size_0", "accum_iter_0", "epochs_0", "input_size_100", "lora_targets", "holdout_and_root"])
def test_bad_flags_stop_before_reading_data(flags, message, category, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(main_train, "TrainDataset", None)  # reading data would crash the test
    assert cli(["--data_path", str(category), "--output_dir", str(tmp_path), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _no_model(*args, **kwargs):
    raise AssertionError("the model was built before the data was checked")


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("empty", "no training images"),
    ("text_only", "no training images"),  # a non-image file is not an image
    ("all_corrupt", "could be read"),
], ids=["missing", "empty", "text_only", "all_corrupt"])
def test_data_errors_stop_before_the_model(layout, message, tmp_path, monkeypatch, capsys):
    root = tmp_path / "cat"
    if layout != "missing":
        (root / "train" / "good").mkdir(parents=True)
    if layout == "text_only":
        (root / "train" / "good" / "notes.txt").write_text("not an image")
    if layout == "all_corrupt":
        (root / "train" / "good" / "000.png").write_bytes(b"\x89PNG truncated")
    monkeypatch.setattr(main_train, "build_model", _no_model)
    assert cli(["--data_path", str(root), "--output_dir", str(tmp_path / "out"), *TINY]) == 2
    err = capsys.readouterr().err  # warnings about single files may come first, then one error line
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_corrupt_and_foreign_files_are_skipped_with_a_warning(category, tmp_path, capsys):
    root = tmp_path / "cat"
    shutil.copytree(category / "train", root / "train")
    (root / "train/good/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "train/good/readme.txt").write_text("ignored")
    out = tmp_path / "out"
    assert cli(["--data_path", str(root), "--output_dir", str(out), *TINY, "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "readme" not in err
    assert (out / "checkpoint-last.pth").is_file()


def test_resume_errors(category, tmp_path, capsys):
    official = tmp_path / "mae_pretrain.pth"
    write_official_checkpoint(official, embed_dim=192, depth=12)
    assert cli(["--data_path", str(category), "--output_dir", str(tmp_path / "o"), *TINY, "--resume", str(official)]) == 2
    err = capsys.readouterr().err
    assert f"--pretrained {official}" in err and len(err.strip().splitlines()) == 1

    out = tmp_path / "small"
    assert cli(["--data_path", str(category), "--output_dir", str(out), *TINY, "--epochs", "1"]) == 0
    capsys.readouterr()
    argv = ["--data_path", str(category), "--output_dir", str(out), *TINY, "--resume", "auto"]
    assert cli([*argv, "--model", "mae_vit_small_patch7", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "model=mae_vit_tiny_patch7" in err and "model=mae_vit_small_patch7" in err
    assert cli([*argv, "--epochs", "1"]) == 0  # already done: nothing to do
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.slow
def test_holdout_root_trains_on_all_of_train_good_and_calibrates_on_the_other_root(category, tmp_path, monkeypatch,
                                                                                   capsys):
    import main_infer
    from scoring import ScoringOptions, holdout_error_maps
    from scripts.make_synthetic_mvtec import make_category

    other = tmp_path / "elsewhere"  # its train/good has the names 000.png .. 005.png, as the category's has
    make_category(other, seed=1, size=64, n_train=6, n_test_good=1, n_per_defect=1)
    seen, original = [], main_train.TrainDataset

    def recording(*args, **kwargs):
        dataset = original(*args, **kwargs)
        seen.append(sorted(p.name for p in dataset.paths))
        return dataset

    monkeypatch.setattr(main_train, "TrainDataset", recording)
    out = tmp_path / "run"
    argv = ["--data_path", str(category), "--output_dir", str(out), *TINY[:-2], "--amp", "none", "--epochs", "1",
            "--save_every", "0", "--holdout_root", str(other)]  # no --holdout: nothing is held out of train/good
    assert cli(argv) == 0
    ckpt = load(out / "checkpoint-last.pth")
    held = sorted(p.name for p in (other / "train" / "good").iterdir())
    assert seen == [sorted(p.name for p in (category / "train" / "good").iterdir())]  # all 8 train
    assert ckpt["args"]["holdout_root"] == str(other) and ckpt["args"]["holdout"] == 0.0
    assert ckpt["args"]["holdout_files"] == ckpt["calibration"]["holdout_files"] == held
    model, _, _ = main_infer.build_model(str(out / "checkpoint-last.pth"))
    expected = holdout_error_maps(model, other, held, ScoringOptions(), torch.device("cpu"), None)
    torch.testing.assert_close(ckpt["calibration"]["maps"]["mse"], expected["mse"], rtol=1e-3, atol=1e-5)
    same_names = holdout_error_maps(model, category, held, ScoringOptions(), torch.device("cpu"), None)
    assert not torch.allclose(same_names["mse"], expected["mse"], rtol=1e-3, atol=1e-5)  # the other images

    capsys.readouterr()  # scoring with other views recomputes the held-out maps: from --holdout_root, by default
    code = run_cli(main_infer.main, main_infer.get_args_parser().parse_args(
        ["--checkpoint", str(out / "checkpoint-last.pth"), "--data_path", str(category), "--output_dir",
         str(tmp_path / "eval"), "--mask_pattern", "stripes", "--amp", "none", "--num_workers", "0", "--no_overlays"]))
    assert code == 0
    assert f"recomputed on the 6 held-out images in {other / 'train' / 'good'}" in capsys.readouterr().out

    copy = shutil.copytree(other, tmp_path / "copy")  # the same names: only the root tells them apart
    for changed in (["--holdout_root", str(copy)], []):  # resuming needs the same --holdout_root
        assert cli([*argv[:-2], *changed, "--epochs", "2", "--resume", "auto"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"calibrates on --holdout_root {other}" in errors[0]


def test_too_few_holdout_root_images_is_one_line(category, tmp_path, monkeypatch, capsys):
    few = tmp_path / "few"
    shutil.copytree(category / "test" / "good", few / "train" / "good")  # 4 images
    monkeypatch.setattr(main_train, "build_model", _no_model)
    assert cli(["--data_path", str(category), "--output_dir", str(tmp_path / "out"), *TINY, "--holdout_root",
                str(few)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--holdout_root" in err and "needs at least 5" in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(category, tmp_path, monkeypatch, capsys):
    real, calls = MaskedAutoencoderViT.forward_loss, []

    def nan_in_epoch_1(self, imgs, pred, mask):
        calls.append(1)  # 2 steps per epoch: call 4 is epoch 1, step 1
        loss = real(self, imgs, pred, mask)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", nan_in_epoch_1)
    out = tmp_path / "nan"
    assert cli(["--data_path", str(category), "--output_dir", str(out), *TINY, "--epochs", "3",
                "--save_every", "1", "--print_freq", "20"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1, step 1" in err and "Traceback" not in err
    assert load(out / "checkpoint-last.pth")["epoch"] == 0
    assert len(log_lines(out)) == 1


# ---- logging ----------------------------------------------------------------------------------
def test_wandb_offline(category, tmp_path):
    out = tmp_path / "wb"
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "elsewhere")}
    res = run_script(["main_train.py", "--data_path", str(category), "--output_dir", str(out), *TINY,
                      "--epochs", "1", "--wandb_name", "tiny-test"], env=env)
    assert res.returncode == 0, res.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_missing_wandb_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        RunLogger(tmp_path, tmp_path, wandb_name="x")


def test_progress_bar_on_a_terminal_and_lines_otherwise(capsys):
    bar = Progress(epoch=0, epochs=2, total_steps=3, tty=True)
    assert bar.bar is not None
    bar.step()
    bar.report(1, 0.5, 1e-3, 10.0)
    bar.close()
    plain = Progress(epoch=1, epochs=2, total_steps=3, tty=False)
    plain.report(3, 0.25, 1e-4, 20.0)
    assert "epoch 1/1 [3/3] loss 0.2500 lr 1.000e-04 20.0 img/s" in capsys.readouterr().out
    Progress(epoch=0, epochs=1, total_steps=1, enabled=False).report(1, 0.0, 0.0, 0.0)
    assert capsys.readouterr().out == ""


# ---- the loop ---------------------------------------------------------------------------------
def test_accumulation_groups():
    assert _accumulation_groups(5, 1) == [1] * 5
    assert _accumulation_groups(5, 2) == [2, 2, 2, 2, 1]  # the ragged last group still updates
    assert _accumulation_groups(3, 4) == [3, 3, 3]


class _Quadratic(torch.nn.Module):
    """loss = mean((w - x)^2); records the mask ratio it is called with."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.ratios = []

    def forward(self, imgs, mask_ratio=0.75):
        self.ratios.append(mask_ratio)
        return ((self.w - imgs) ** 2).mean(), None, None


def test_train_one_epoch_steps_every_accum_iter(monkeypatch):
    model = _Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps, lrs = [], []
    real_step = opt.step
    monkeypatch.setattr(opt, "step", lambda: (steps.append(1), lrs.append(opt.param_groups[0]["lr"]), real_step())[-1])
    batches = [torch.ones(3, 2) * i for i in range(5)]
    stats = train_one_epoch(model, batches, opt, device=torch.device("cpu"), epoch=1, epochs=4, base_lr=0.1,
                            min_lr=0.0, warmup_epochs=2, mask_ratio=0.6, accum_iter=2, show_progress=False)
    assert len(steps) == 3 and model.ratios == [0.6] * 5
    assert lrs == pytest.approx([0.1 * (1 + i / 5) / 2 for i in (0, 2, 4)])  # per-iteration warmup
    expected_loss = np.mean([(i ** 2) for i in range(5)])  # w moves after each update, so only roughly
    assert stats["steps"] == 5 and 0 < stats["train_loss"] <= expected_loss


def test_train_one_epoch_stops_on_nan():
    model = _Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.ones(1, 2), torch.full((1, 2), float("nan")), torch.ones(1, 2)]
    with pytest.raises(UserError, match="epoch 7, step 1") as e:
        train_one_epoch(model, batches, opt, device=torch.device("cpu"), epoch=7, epochs=10, base_lr=0.1,
                        min_lr=0.0, warmup_epochs=0, mask_ratio=0.75, show_progress=False)
    assert e.value.exit_code == 1


def test_cuda_graph_compile_modes_need_cuda(category, tmp_path, capsys):
    assert cli(["--data_path", str(category), "--output_dir", str(tmp_path), *TINY, "--device", "cpu",
                "--compile_mode", "reduce-overhead"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_fused_adamw_on_cpu_and_cuda():
    model = create_model("mae_vit_tiny_patch7", img_size=28, lora_rank=2)
    for device in ("cpu", "cuda"):  # building it does not touch the device
        assert main_train.build_optimizer(model, 1e-3, 0.0, torch.device(device)).defaults["fused"] is True
