"""scripts/run_mvtec.py: all categories in one command, results tables, resume, failures, TIFF maps.

One real run (the entry point in-process, its training and scoring subprocesses real) over a tiny
root of three categories is shared by most tests: a synthetic texture (raw layout, its generator's
marker says texture), a capsule in the prepared layout (an MVTec AD name: object), and a category
without training images, which must fail alone.
The tiny model trains 2 epochs at 28 px on 32-56 px images.
"""
import csv
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main_infer
import main_train
from official_ckpt import write_official_checkpoint
from scripts import run_mvtec
from scripts.make_synthetic_mvtec import make_category
from scripts.prepare_mvtec import prepare
from util.cli import UserError, run_cli
from util.datasets import raw_layout_stem

RECIPE = ["--model", "mae_vit_tiny_patch7", "--input_size", "28", "--epochs", "2", "--save_every", "1",
          "--batch_size", "4", "--warmup_epochs", "1", "--num_workers", "0", "--lora_rank", "2", "--no_overlays"]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_runner(*argv: str) -> Finished:
    """The runner's entry point (run_cli(main, ...)) in this process; its subprocesses are real.

    One thread per subprocess: a tiny model gains nothing from more, and on a shared 2-core machine
    OpenMP threads spinning against other processes make each step many times slower.
    """
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()  # .buffer: the echoed output
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        mp.setenv("OMP_NUM_THREADS", "1")
        code = run_cli(run_mvtec.main, run_mvtec.get_args_parser().parse_args(list(argv)))
    out.flush()
    return Finished(code, out.buffer.getvalue().decode("utf-8", errors="replace"), err.getvalue())


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mvtec")
    root = base / "root"
    make_category(root / "texture_synth", seed=1, size=32, n_train=10, n_test_good=2, n_per_defect=1, kind="texture")
    make_category(base / "capsule_raw", seed=2, size=56, n_train=4, n_test_good=2, n_per_defect=1)
    prepare(base / "capsule_raw", root / "capsule", log=lambda msg: None)
    (root / "broken" / "train" / "good").mkdir(parents=True)  # no training images: fails in main_train.py
    (root / "broken" / "test" / "good").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def finished_run(mvtec_root, tmp_path_factory) -> tuple[Path, Finished]:
    out = tmp_path_factory.mktemp("run") / "out"
    return out, run_runner("--mvtec_root", str(mvtec_root), "--output_dir", str(out), "--save_tiff", "--compare",
                           *RECIPE)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_rows(path: Path) -> dict[str, list[str]]:
    """The first table of results.md: category -> cells after the category."""
    rows, in_table = {}, False
    for line in path.read_text().splitlines():
        if line.startswith("| Category"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        if in_table and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("*")] = cells[1:]
    return rows


@pytest.mark.slow
def test_end_to_end_one_failure_does_not_stop_the_others(finished_run):
    out, proc = finished_run
    assert proc.returncode == 1, proc.stderr
    assert "1 of 3 runs did not finish: broken" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    runs = {r["category"]: r for r in results["runs"]}
    assert runs["broken"]["status"] == "failed" and runs["broken"]["stage"] == "train"
    assert "no training images" in runs["broken"]["error"]
    for name, kind in (("texture_synth", "texture"), ("capsule", "object")):
        assert runs[name]["status"] == "ok" and runs[name]["kind"] == kind
        assert 0 <= runs[name]["image_auroc"] <= 1 and runs[name]["epochs"] == 2
        assert runs[name]["train_minutes"] > 0 and runs[name]["score_ms_per_image"] > 0
        assert (out / name / "train" / "checkpoint-last.pth").is_file()
        assert (out / name / "metrics.json").is_file() and (out / name / "result.json").is_file()
    assert results["versions"]["torch"] and "git_commit" in results and results["device_name"]
    assert results["script_options"]["epochs"] == 2 and results["script_options"]["model"] == "mae_vit_tiny_patch7"
    assert results["run_mvtec_options"]["save_tiff"] and results["result_options"]["train"]["epochs"] == 2
    assert "broken (seed 0): failed in train" in (out / "results.md").read_text()


@pytest.mark.slow
def test_markdown_and_csv_agree_and_the_mean_is_the_mean_of_the_rows(finished_run):
    out, _ = finished_run
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(run_mvtec.CSV_COLUMNS)
    assert [r["category"] for r in rows] == ["texture_synth", "capsule"]  # textures first
    table = markdown_rows(out / "results.md")
    assert list(table) == ["texture_synth", "capsule", "Mean"]
    metrics = [m[0] for m in run_mvtec.METRICS]
    for r in rows:
        assert table[r["category"]][0] == r["kind"]
        for k, column in enumerate(metrics):
            assert table[r["category"]][1 + k] == f"{100 * float(r[column]):.1f}"
    for k, column in enumerate(metrics):
        mean = np.mean([float(r[column]) for r in rows])
        assert table["Mean"][1 + k] == f"{100 * mean:.1f}"
    text = (out / "results.md").read_text()
    assert "| Mean | " in text and "| 95.0 |" in text  # --compare: InTra's published image AUROC


@pytest.mark.slow
def test_tiff_maps_are_at_the_original_size_in_the_official_layout(finished_run, mvtec_root):
    out, _ = finished_run
    # prepared layout: test/bad/crack_000.png came from test/crack/000.png
    tiff = out / "capsule" / "test" / "crack" / "000.tiff"
    npy = out / "capsule" / "anomaly_maps" / "test" / "bad" / "crack_000.npy"
    for tiff, npy, image in ((tiff, npy, mvtec_root / "capsule" / "test" / "bad" / "crack_000.png"),
                             (out / "texture_synth" / "test" / "good" / "001.tiff",
                              out / "texture_synth" / "anomaly_maps" / "test" / "good" / "001.npy",
                              mvtec_root / "texture_synth" / "test" / "good" / "001.png")):
        with Image.open(tiff) as im:
            assert im.mode == "F"
            full = np.asarray(im)
        small = np.load(npy)
        assert full.dtype == np.float32 and full.shape == Image.open(image).size[::-1] != small.shape
        back = F.interpolate(torch.from_numpy(full.copy())[None, None], size=small.shape, mode="bilinear",
                             antialias=True, align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(back, small, atol=0.05 * float(small.max()))
    n_test = sum(1 for p in (mvtec_root / "capsule" / "test").rglob("*.png"))
    assert len(list((out / "capsule" / "test").rglob("*.tiff"))) == n_test


def test_pillow_float_tiff_round_trips_exactly(tmp_path):
    values = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    main_infer.save_tiff(tmp_path / "m.tiff", values)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.tiff")), values)


def test_raw_layout_stem_recovers_defect_and_image_id():
    assert raw_layout_stem("test/bad/faulty_imprint_003.png") == "test/faulty_imprint/003"
    assert raw_layout_stem("test/crack/000.png") == "test/crack/000"
    assert raw_layout_stem("test/good/011.png") == "test/good/011"
    assert raw_layout_stem("test/bad/oddname.png") == "test/bad/oddname"


@pytest.mark.slow
def test_rerun_skips_finished_categories_and_resumes_interrupted_training(finished_run, mvtec_root, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    # capsule as a kill during its second epoch leaves it: epoch 0 saved, no scores yet
    capsule = out / "capsule"
    for name in ("result.json", "metrics.json"):
        (capsule / name).unlink()
    shutil.copy(capsule / "train" / "checkpoint-0.pth", capsule / "train" / "checkpoint-last.pth")
    texture_log = (out / "texture_synth" / "train.log").read_text()
    texture_result = (out / "texture_synth" / "result.json").read_text()

    proc = run_runner("--mvtec_root", str(mvtec_root), "--output_dir", str(out), "--save_tiff",
                      "--categories", "texture_synth,capsule", *RECIPE)
    assert proc.returncode == 0, proc.stderr
    assert "texture_synth (seed 0): done earlier" in proc.stdout
    assert (out / "texture_synth" / "train.log").read_text() == texture_log  # not retrained
    assert (out / "texture_synth" / "result.json").read_text() == texture_result
    assert "(epoch 0 done)" in (capsule / "train.log").read_text()
    epochs = [json.loads(line)["epoch"] for line in (capsule / "train" / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]
    runs = {r["category"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["texture_synth"]["reused"] and not runs["capsule"]["reused"]
    assert runs["capsule"]["status"] == "ok" and runs["capsule"]["train_attempts"] == 2


@pytest.mark.slow
def test_pretrained_frozen_base_keeps_only_the_adapter(mvtec_root, tmp_path):
    base = tmp_path / "mae_pretrain_vit_tiny.pth"
    write_official_checkpoint(base, embed_dim=192, depth=12, patch=16)
    out = tmp_path / "out"
    proc = run_runner("--mvtec_root", str(mvtec_root), "--output_dir", str(out), "--categories", "texture_synth",
                      "--pretrained", str(base), "--freeze_non_lora", *RECIPE)
    assert proc.returncode == 0, proc.stderr
    train = out / "texture_synth" / "train"
    assert sorted(p.name for p in train.glob("*.pth")) == [run_mvtec.ADAPTER_FILE]
    adapter = torch.load(train / run_mvtec.ADAPTER_FILE, weights_only=True)
    assert adapter["args"]["pretrained"] == str(base)
    assert any(k.endswith("lora_A") for k in adapter["adapter"]) and "threshold" in adapter["calibration"]
    assert not any(k.startswith("blocks.0.attn.qkv.weight") for k in adapter["adapter"])  # frozen: in the base
    assert json.loads((out / "texture_synth" / "result.json").read_text())["checkpoint"] == "train/adapter.pth"


def test_every_script_option_passes_through_and_parses_with_the_scripts_parsers(tmp_path):
    parser = run_mvtec.get_args_parser()
    assert "--num_masks" in parser.format_help() and "%(default)" not in parser.format_help()  # --help works
    parsers = run_mvtec.script_parsers()
    runner_flags = {s for a in parser._actions for s in a.option_strings}
    assert "--holdout_root" not in runner_flags  # one category's normal images: never passed to every category
    base = tmp_path / "base.pth"
    base.write_bytes(b"checked up front: it must exist")
    for name, per_category in (("train", run_mvtec.TRAIN_PER_CATEGORY), ("infer", run_mvtec.INFER_PER_CATEGORY)):
        for action in run_mvtec.passed_actions(parsers[name], per_category):
            assert set(action.option_strings) <= runner_flags, action.option_strings
    argv = ["--mvtec_root", "R", "--output_dir", "O", "--model", "mae_vit_small_patch7", "--input_size", "56",
            "--epochs", "3", "--lr", "0.00015", "--no_pin_mem", "--norm_pix_loss", "--lora_targets", "qkv,fc1",
            "--batch_size", "3", "--amp", "none", "--pretrained", str(base), "--num_masks", "2",
            "--mask_pattern", "checkerboard", "--sigma", "2.5", "--no_overlays", "--eval_size", "full",
            "--wandb_name", "exp"]
    args = parser.parse_args(argv)
    given = run_mvtec.given_options(args, parsers)
    plan = run_mvtec.build_plan(args, given, parsers, workers=1)
    task = run_mvtec.Task("cat", tmp_path / "cat", 7, tmp_path / "out" / "cat", tmp_path / "out")
    train = main_train.get_args_parser().parse_args(run_mvtec.train_argv(plan, task))
    infer = main_infer.get_args_parser().parse_args(run_mvtec.infer_argv(plan, task, tmp_path / "ck.pth"))
    assert (train.model, train.input_size, train.epochs, train.lr, train.pin_mem, train.norm_pix_loss) == \
        ("mae_vit_small_patch7", 56, 3, 0.00015, False, True)
    assert (train.batch_size, train.amp, train.pretrained, train.seed, train.resume) == \
        (3, "none", str(base), 7, "auto")
    assert train.wandb_name == "exp-cat-seed7" and train.output_dir == str(task.run_dir / "train")
    assert (infer.batch_size, infer.amp, infer.pretrained, infer.num_masks, infer.mask_pattern, infer.sigma) == \
        (3, "none", str(base), 2, "checkerboard", 2.5)
    assert infer.no_overlays and infer.eval_size == "full" and infer.save_tiff is None
    assert infer.overwrite  # OUT/<category> holds train/ and the logs too
    assert infer.output_dir == str(task.run_dir) and infer.checkpoint == str(tmp_path / "ck.pth")
    # options not given keep the scripts' own defaults (train batch 32, inference batch 8)
    bare = parser.parse_args(["--mvtec_root", "R", "--output_dir", "O"])
    plan = run_mvtec.build_plan(bare, run_mvtec.given_options(bare, parsers), parsers, workers=1)
    assert main_train.get_args_parser().parse_args(run_mvtec.train_argv(plan, task)).batch_size == 32
    assert main_infer.get_args_parser().parse_args(run_mvtec.infer_argv(plan, task, tmp_path)).batch_size == 8


def _main(*argv: str) -> int:
    return run_mvtec.main(run_mvtec.get_args_parser().parse_args(list(argv)))


def test_bad_inputs_are_one_line_errors(mvtec_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--mvtec_root", str(empty)], "holds no category"),
        (["--mvtec_root", str(mvtec_root / "capsule")], "is one category folder"),
        (["--mvtec_root", str(tmp_path / "missing")], "does not exist"),
        (["--mvtec_root", str(mvtec_root), "--categories", "capsule,zipper"], "zipper not found"),
        (["--mvtec_root", str(mvtec_root), "--gpus", str(torch.cuda.device_count() + 3)], "--gpus"),
        (["--mvtec_root", str(mvtec_root), "--seeds", "a"], "--seeds"),
        (["--mvtec_root", str(mvtec_root), "--kinds", "capsule=round"], "--kinds"),
        (["--mvtec_root", str(mvtec_root), "--input_size", "30"], "multiple of 7"),
        (["--mvtec_root", str(mvtec_root), "--pretrained", str(tmp_path / "gone.pth")], "--pretrained"),
    ]
    for argv, expected in cases:
        with pytest.raises(UserError) as e:
            _main(*argv, "--output_dir", str(tmp_path / "o"))
        assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_output_dir_of_another_run_is_refused_unless_overwrite(mvtec_root, tmp_path):
    out = tmp_path / "out"
    parsers = run_mvtec.script_parsers()
    old = run_mvtec.result_options({"epochs": 2}, parsers, 1, [0], False)
    out.mkdir()
    run_mvtec.write_run_options(out, old, ["capsule"])
    (out / "capsule").mkdir()
    (out / "results.md").write_text("old")
    with pytest.raises(UserError, match="holds a run with other options.*epochs"):
        _main("--mvtec_root", str(mvtec_root), "--output_dir", str(out), "--epochs", "3")
    run_mvtec.check_output_dir(out, old, overwrite=False)  # the same options: fine
    new = run_mvtec.result_options({"epochs": 3}, parsers, 1, [0], False)
    run_mvtec.check_output_dir(out, new, overwrite=True)
    assert not (out / "capsule").exists() and not (out / "results.md").exists()


def test_output_dir_with_other_files_is_refused_unless_overwrite(mvtec_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        _main("--mvtec_root", str(mvtec_root), "--output_dir", str(out))
    assert "a new run" in run_mvtec.check_output_dir(out, {}, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_dry_run_prints_the_plan_and_runs_nothing(mvtec_root, tmp_path, monkeypatch, capsys):
    def no_run(*args, **kwargs):
        raise AssertionError("--dry_run started a subprocess")
    monkeypatch.setattr(run_mvtec, "run_stage", no_run)
    out = tmp_path / "out"
    assert _main("--mvtec_root", str(mvtec_root), "--output_dir", str(out), "--categories", "capsule,texture_synth",
                 "--seeds", "0,1", "--epochs", "3", "--dry_run") == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert "dry run" in printed and "4 run(s)" in printed
    assert "capsule (object), seed 1" in printed and "texture_synth (texture), seed 0" in printed
    commands = [line.split() for line in printed.splitlines() if "main_train.py" in line or "main_infer.py" in line]
    assert len(commands) == 8 and all("--epochs" in c and "3" in c for c in commands if "main_train.py" in c[1])


def test_save_tiff_needs_a_labelled_category(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    args = main_infer.get_args_parser().parse_args(
        ["--checkpoint", "x.pth", "--images", str(images), "--output_dir", str(tmp_path / "o"), "--save_tiff"])
    with pytest.raises(UserError, match="--save_tiff needs --data_path"):
        main_infer.main(args)


def test_several_seeds_give_mean_and_std_per_category_and_for_the_mean_row(tmp_path):
    values = {("wood", 0): 0.90, ("wood", 1): 0.80, ("screw", 0): 0.70, ("screw", 1): 0.50}
    records = [{"category": c, "seed": s, **{m[0]: v for m in run_mvtec.METRICS}, "train_minutes": 1.0,
                "score_ms_per_image": 2.0, "epochs": 3} for (c, s), v in values.items()]
    kinds = {"wood": "texture", "screw": "object"}
    rows = run_mvtec.table_rows(records, kinds)
    assert [r["category"] for r in rows] == ["wood", "screw", "Mean"]
    text = run_mvtec.results_markdown(rows, [], [0, 1], None)
    assert "| wood | texture | 85.0 ± 7.1 |" in text  # sample std of 90 and 80
    assert "| **Mean** |  | 72.5 ± 10.6 |" in text  # per-seed means 80 and 65
    assert len(run_mvtec.results_csv(records, kinds).splitlines()) == 1 + 4


# ---- --jobs_per_gpu: several categories at once per GPU, on fake GPUs ------------------------------
def test_jobs_per_gpu_slots(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert run_mvtec.gpu_slots("all", 1, 3) == ["0", "1"] * 3
    assert run_mvtec.gpu_slots("1", 1, 2) == ["1", "1"]
    assert run_mvtec.gpu_slots("0,1", 2, 2) == ["0,1", "0,1"]
    with pytest.raises(UserError, match="--jobs_per_gpu 2 needs --gpus"):
        run_mvtec.gpu_slots("", 1, 2)
    with pytest.raises(UserError, match="--jobs_per_gpu 0"):
        run_mvtec.gpu_slots("0", 1, 0)


def test_jobs_per_gpu_runs_every_category_once_and_at_most_n_per_gpu(monkeypatch, tmp_path):
    """Fake GPUs and a fake run_task: each job sleeps a little, records its CUDA_VISIBLE_DEVICES and how
    many jobs share its GPU meanwhile; one category fails."""
    import threading
    import time

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    names = [f"cat{i:02d}" for i in range(11)]
    tasks = run_mvtec.make_tasks({n: tmp_path / n for n in names}, [0], tmp_path / "out")
    lock, running, peak, ran = threading.Lock(), {}, {}, []

    def fake_run_task(task, plan, gpus, children):
        with lock:
            running[gpus] = running.get(gpus, 0) + 1
            peak[gpus] = max(peak.get(gpus, 0), running[gpus])
            ran.append((task.category, gpus))
        time.sleep(0.05)
        with lock:
            running[gpus] -= 1
        if task.category == "cat03":
            raise RuntimeError("simulated crash")
        record = {"category": task.category, "epochs": 2, "images_per_epoch": 8}
        return run_mvtec.Outcome(task, "ok", record=record)

    monkeypatch.setattr(run_mvtec, "run_task", fake_run_task)
    outcomes = []
    run_mvtec.run_all(tasks, None, run_mvtec.gpu_slots("all", 1, 3), run_mvtec.Children(), outcomes.append)
    assert sorted(c for c, _ in ran) == names  # every category, none twice
    assert {g for _, g in ran} == {"0", "1"}
    assert max(peak.values()) <= 3 and sum(peak.values()) > 2  # at most 3 at once per GPU, and really concurrent
    failed = [o for o in outcomes if o.status != "ok"]
    assert [o.task.category for o in failed] == ["cat03"] and failed[0].stage == "runner"  # the others went on
    assert len(outcomes) == 11


def test_throughput_in_results(tmp_path):
    tasks = run_mvtec.make_tasks({"a": tmp_path / "a", "b": tmp_path / "b"}, [0], tmp_path)
    results = run_mvtec.Results(tmp_path, tasks, {"a": "object", "b": "object"}, [0], {}, compare=False)
    results.started -= 10.0  # as if the run had started 10 s ago
    rec = {"image_auroc": 0.9, "pixel_auroc": 0.9, "aupro": 0.8, "image_f1max": 0.8, "pixel_f1max": 0.5,
           "train_minutes": 0.1, "score_ms_per_image": 1.0, "epochs": 5, "images_per_epoch": 32}
    results.add(run_mvtec.Outcome(tasks[0], "ok", record={**rec, "category": "a", "seed": 0}))
    results.add(run_mvtec.Outcome(tasks[1], "ok", reused=True, record={**rec, "category": "b", "seed": 0}))
    t = json.loads((tmp_path / "results.json").read_text())["throughput"]
    assert t["categories"] == 1 and t["images_trained"] == 160  # the reused category is not counted
    assert 10.0 <= t["wall_s"] < 60 and t["images_per_s"] == pytest.approx(160 / t["wall_s"])


def test_images_per_epoch(synthetic_category):
    options = {"data_path": str(synthetic_category), "batch_size": 3, "world_size": 1, "holdout_files": []}
    assert run_mvtec.images_per_epoch(options) == 6  # 8 images: two whole batches of 3
    assert run_mvtec.images_per_epoch({**options, "world_size": 2}) == 6  # 4 each: one batch of 3 each
    assert run_mvtec.images_per_epoch({**options, "batch_size": 16}) == 8  # one ragged batch, kept
    assert run_mvtec.images_per_epoch({**options, "data_path": str(synthetic_category / "nope")}) is None
    held = {**options, "holdout_files": ["000.png", "001.png"]}
    assert run_mvtec.images_per_epoch(held) == 6  # 6 images left: two whole batches of 3
    assert run_mvtec.images_per_epoch({**held, "batch_size": 4, "holdout_root": "elsewhere"}) == 8  # all trained
