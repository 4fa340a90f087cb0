"""The discriminative head: the anomaly simulator (determinism, exact masks, the normal share, soft
targets), the head module, the training loop's parts, main_train_head.py end to end on a tiny category
(its map beats chance on held-out simulated anomalies), the checkpoint's head entry (round trip, the
MAE part unchanged) and the scorer that serves it."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import main_infer
import main_train_head
from engine import (SELECTION_METRICS, HeadInputs, SampleBuffer, ema_average, focal_loss, head_inputs, head_metrics,
                    random_crops, selection_score)
from lora_utils import unmerged_state_dict
from models_head import HeadScorer, create_head, head_from_entry, head_maps
from models_mae import AnomalyOutput, AnomalyScorer, create_model
from scoring import (SCORING_VERSION, ScoringOptions, evidence_defects, head_evidence, holdout_choice,
                     make_calibration)
from util.anomaly_simulation import NORMAL_KIND, SimulationConfig, simulate, soft_targets
from util.cli import run_cli
from util.datasets import TestDataset, holdout_items, normalise
from util.recipe_choice import EVIDENCE_STRENGTHS

SIZE = 56
TRAIN_ARGS = {"model": "mae_vit_tiny_patch7", "input_size": SIZE, "norm_pix_loss": False, "lora_rank": 4,
              "lora_alpha": None, "lora_dropout": 0.0, "lora_targets": ["qkv", "proj"], "epochs": 1,
              "scoring_version": SCORING_VERSION}  # scored with today's global defaults (grid masks)
# Large, clearly visible defects, so that a few dozen steps on 4 images of 56 px learn something.
HEAD_ARGS = ["--steps", "60", "--batch_size", "4", "--fresh_per_step", "2", "--select_every", "20",
             "--kinds", "texture_paste,stain", "--min_strength", "0.5", "--num_textures", "8", "--crop_size", "0",
             "--amp", "none"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 6, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images [n, 3, size, size] uint8 (defects show on them)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    return (torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 200 + 20).to(torch.uint8)


def _textures(n: int = 3, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli(main_train_head.main, main_train_head.get_args_parser().parse_args([str(a) for a in argv]))
    out = capsys.readouterr()
    return code, out.out, out.err


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- the simulator ----------------------------------------------------------------------------
def test_simulation_is_deterministic_by_seed():
    images, textures, config = _images(), _textures(), SimulationConfig()
    a, b = (simulate(images, textures, config, np.random.default_rng(3)) for _ in range(2))
    c = simulate(images, textures, config, np.random.default_rng(4))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.targets, b.targets)
    assert a.kinds == b.kinds and torch.equal(a.strengths, b.strengths)
    assert not torch.equal(a.images, c.images)


def test_masks_are_exactly_where_pixels_changed_and_normal_samples_are_untouched():
    images = _images(8)
    batch = simulate(images, _textures(), SimulationConfig(), np.random.default_rng(0))
    assert torch.equal(batch.masks, (batch.images != images).any(dim=1))
    normal = torch.tensor([k == NORMAL_KIND for k in batch.kinds])
    assert torch.equal(batch.images[normal], images[normal]) and not batch.targets[normal].any()
    assert ((batch.targets > 0) == batch.masks).all()  # targets live on the masks


@pytest.mark.parametrize("share, n, expected", [(0.5, 8, 4), (0.5, 7, 4), (0.0, 5, 0), (1.0, 5, 5), (0.25, 8, 2)])
def test_normal_share_is_exact_per_batch(share, n, expected):
    config = SimulationConfig(kinds=("stain", "texture_paste"), normal_share=share)
    for seed in range(3):
        batch = simulate(_images(n, seed=seed), _textures(), config, np.random.default_rng(seed))
        assert sum(k == NORMAL_KIND for k in batch.kinds) == expected


def test_grey_images_stay_grey():
    grey = _images(4)[:, :1].expand(-1, 3, -1, -1).contiguous()
    batch = simulate(grey, _textures(), SimulationConfig(normal_share=0.0), np.random.default_rng(1))
    assert (batch.images == batch.images[:, :1]).all()


def test_soft_targets_grow_with_the_change_and_stay_on_the_mask():
    original = np.full((16, 16, 3), 100, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    values = []
    for delta in (2, 8, 40):
        new = original.copy()
        new[mask] += np.uint8(delta)
        t = soft_targets(original, new, mask)
        assert (t[~mask] == 0).all() and (t[mask] == t[mask][0]).all()
        values.append(float(t[mask][0]))
    assert 0 < values[0] < values[1] < values[2] < 1


def test_config_refuses_bad_values():
    for bad in ({"kinds": ("glitter",)}, {"normal_share": 1.5}, {"min_strength": 0.0}, {"min_strength": 0.8,
                                                                                         "max_strength": 0.5}):
        with pytest.raises(ValueError):
            SimulationConfig(**bad)


# ---- the head and the loop's parts ----------------------------------------------------------
@pytest.mark.parametrize("size", [56, 60])
def test_head_maps_any_size_to_one_logit_per_pixel(size):
    head = create_head("head_unet_tiny")
    imgs = torch.randn(2, 3, size, size)
    maps = {"mse": torch.rand(2, size, size), "msgms": torch.rand(2, size, size)}
    logits = head(imgs, imgs, maps)
    assert logits.shape == (2, 1, size, size) and torch.isfinite(logits).all()
    anomaly_maps, image_maps, scores = head_maps(logits, 5)
    assert anomaly_maps.shape == image_maps.shape == (2, size, size)
    assert torch.equal(scores, image_maps.flatten(1).amax(1))
    # the image map is a local mean of the pixel map
    assert torch.allclose(image_maps[:, 10, 10], anomaly_maps[:, 8:13, 8:13].mean(dim=(1, 2)), atol=1e-6)


def test_focal_loss_is_cross_entropy_at_gamma_0_and_down_weights_easy_pixels():
    logits = torch.tensor([[-3.0, 0.0, 3.0]])
    targets = torch.tensor([[0.0, 1.0, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.isclose(focal_loss(logits, targets, 0.0), bce)
    assert focal_loss(logits, targets, 2.0) < bce
    soft = torch.sigmoid(torch.tensor([[0.7]]))  # a prediction equal to its soft target costs nothing
    assert focal_loss(torch.tensor([[0.7]]), soft, 2.0) < 1e-9


def test_ema_is_a_running_mean_first():
    average = ema_average(0.99)
    values = [torch.tensor(float(v)) for v in (4.0, 2.0, 9.0)]
    avg = values[0]
    for n, v in enumerate(values[1:], start=1):
        avg = average(avg, v, torch.tensor(n))
    assert torch.isclose(avg, torch.tensor(5.0))


def _inputs(n: int, size: int = 16, fill: float = 0.0) -> HeadInputs:
    full = torch.full((n, 3, size, size), fill)
    return HeadInputs(full, full.clone(), {"mse": full[:, 0].clone(), "msgms": full[:, 0].clone()})


def test_sample_buffer_replaces_the_oldest():
    buffer = SampleBuffer(4)
    for k in range(3):  # 6 samples, values 0, 0, 1, 1, 2, 2: the first two are gone
        buffer.add(_inputs(2, fill=float(k)), torch.full((2, 16, 16), float(k)))
    assert buffer.count == 4
    assert sorted(buffer.targets[:, 0, 0].tolist()) == [1.0, 1.0, 2.0, 2.0]
    inputs, targets = buffer.draw(50, torch.Generator().manual_seed(0))
    assert torch.equal(inputs.images[:, 0, 0, 0], targets[:, 0, 0]) and set(targets[:, 0, 0].tolist()) <= {1.0, 2.0}


def test_random_crops_keep_an_anomalous_pixel():
    targets = torch.zeros(5, 32, 32)
    targets[:, 30, 2] = 1.0  # one anomalous pixel near a corner
    targets[4] = 0.0  # a normal sample
    _, cropped = random_crops(_inputs(5, 32), targets, 8, torch.Generator().manual_seed(0))
    assert cropped.shape == (5, 8, 8)
    assert (cropped[:4].flatten(1).amax(1) == 1).all() and not cropped[4].any()


# ---- main_train_head.py end to end ----------------------------------------------------------
def _mae_checkpoint(path: Path, data_path: Path, holdout_files: list[str]) -> Path:
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=4)
    args = {**TRAIN_ARGS, "holdout_files": holdout_files, "data_path": str(data_path)}
    torch.save({"model": unmerged_state_dict(model), "optimizer": {}, "scaler": None, "epoch": 0, "args": args,
                "calibration": {"holdout_files": holdout_files, "note": "kept as it is"}}, path)
    return path


@pytest.fixture(scope="module")
def mae_checkpoint(synthetic_category, tmp_path_factory) -> Path:
    """A tiny MAE checkpoint (random weights) whose calibration names 4 of the 8 train images as held out."""
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    return _mae_checkpoint(tmp_path_factory.mktemp("mae") / "checkpoint-last.pth", synthetic_category, names)


@pytest.fixture(scope="module")
def head_run(synthetic_category, mae_checkpoint):
    """main_train_head.py into the MAE checkpoint's own folder; the MAE file's bytes before the run."""
    torch.set_num_threads(1)
    before = hashlib.sha256(mae_checkpoint.read_bytes()).hexdigest()
    argv = ["--checkpoint", mae_checkpoint, "--data_path", synthetic_category, *HEAD_ARGS, "--eval_every", "30"]
    code = run_cli(main_train_head.main, main_train_head.get_args_parser().parse_args([str(a) for a in argv]))
    assert code == 0
    return mae_checkpoint.parent, before


@pytest.mark.slow
def test_head_checkpoint_holds_the_mae_checkpoint_and_the_evidence(head_run, mae_checkpoint):
    out, before = head_run
    assert hashlib.sha256(mae_checkpoint.read_bytes()).hexdigest() == before  # the MAE file is untouched
    original, extended = _load(mae_checkpoint), _load(out / "checkpoint-head.pth")
    assert set(extended) == set(original) | {"head"}
    assert extended["args"] == original["args"] and extended["calibration"] == original["calibration"]
    assert all(torch.equal(extended["model"][k], v) for k, v in original["model"].items())
    head = extended["head"]
    assert head["input_size"] == SIZE and (head["num_masks"], head["mask_pattern"]) == (4, "grid")
    selection = head["selection"]
    assert selection["holdout_files"] == original["calibration"]["holdout_files"]
    steps = [r["step"] for r in selection["history"]]
    assert steps == [20, 40, 60] and selection["selected_step"] in steps
    best = max(r["holdout_score"] for r in selection["history"])
    assert next(r for r in selection["history"] if r["step"] == selection["selected_step"])["holdout_score"] == best
    assert not any(k.startswith("test_") for r in selection["history"] for k in r)  # test metrics stay out
    log = [json.loads(line) for line in (out / "head_log.txt").read_text().splitlines()]
    assert [r["step"] for r in log if "test_image_auroc" in r] == [30, 60]  # reported, not selected on
    assert head["training"]["simulation"]["kinds"] == ["texture_paste", "stain"]


@pytest.mark.slow
def test_trained_head_beats_chance_on_held_out_simulated_anomalies(head_run):
    out, _ = head_run
    selection = _load(out / "checkpoint-head.pth")["head"]["selection"]
    chosen = next(r for r in selection["history"] if r["step"] == selection["selected_step"])
    assert chosen["holdout_pixel_auroc"] > 0.6


@pytest.mark.slow
def test_head_round_trip_and_scorer_equal_the_training_path(head_run, synthetic_category):
    out, _ = head_run
    checkpoint = _load(out / "checkpoint-head.pth")
    head = head_from_entry(checkpoint["head"]).eval()
    assert all(torch.equal(head.state_dict()[k], v) for k, v in checkpoint["head"]["state_dict"].items())
    model, _, _ = main_infer.build_model(out / "checkpoint-head.pth")
    scorer = AnomalyScorer(model, checkpoint["head"]["num_masks"], checkpoint["head"]["mask_pattern"]).eval()
    images = _images(3, size=SIZE)
    kernel = checkpoint["head"]["image_kernel"]
    inputs = head_inputs(scorer, images, torch.device("cpu"), None)
    with torch.no_grad():
        expected = head_maps(head(*inputs), kernel)
        served = HeadScorer(scorer, head, kernel)(inputs.images)
    assert torch.allclose(served.anomaly_maps, expected[0], atol=1e-6)
    assert torch.allclose(served.scores, expected[2], atol=1e-6)


@pytest.mark.slow
def test_main_infer_loads_the_mae_of_a_head_checkpoint_as_before(head_run, mae_checkpoint):
    out, _ = head_run
    plain, plain_args, plain_calibration = main_infer.build_model(mae_checkpoint)
    with_head, head_args, head_calibration = main_infer.build_model(out / "checkpoint-head.pth")
    assert plain_args == head_args and plain_calibration == head_calibration
    assert all(torch.equal(v, with_head.state_dict()[k]) for k, v in plain.state_dict().items())


def test_checkpoint_without_held_out_images_is_refused(synthetic_category, tmp_path, capsys):
    path = _mae_checkpoint(tmp_path / "checkpoint-last.pth", synthetic_category, [])
    code, _, err = _cli(["--checkpoint", path, "--data_path", synthetic_category, *HEAD_ARGS], capsys)
    assert code == 2 and "held-out" in err and "--holdout" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_earlier_outputs_need_overwrite(head_run, synthetic_category, mae_checkpoint, capsys):
    code, _, err = _cli(["--checkpoint", mae_checkpoint, "--data_path", synthetic_category, *HEAD_ARGS], capsys)
    assert code == 2 and "--overwrite" in err


def test_holdout_evidence_and_metrics_on_a_tiny_model():
    torch.manual_seed(0)
    scorer = AnomalyScorer(create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=0), 4, "grid").eval()
    config = SimulationConfig(kinds=("stain",))
    evidence = main_train_head.holdout_eval_set(scorer, _images(3, size=SIZE), _textures(size=SIZE), config, 2, 0,
                                                torch.device("cpu"), None)
    n_anomalous = int(evidence.labels.sum())
    assert (evidence.labels[:3] == 0).all() and 1 <= n_anomalous <= 6
    assert (evidence.masks.reshape(len(evidence.labels), -1).any(1) == evidence.labels.astype(bool)).all()
    metrics = head_metrics(create_head("head_unet_tiny").eval(), evidence, 5, torch.device("cpu"), None)
    assert selection_score(metrics) == pytest.approx(np.mean([metrics[k] for k in SELECTION_METRICS]))


class _NearestNormal(torch.nn.Module):
    """A stand-in for a HeadScorer: the map is the absolute difference to the nearest of the normal
    images (so 0 on them and exactly the change on a defective copy), the score its maximum; a blind
    one maps everything to 0."""

    def __init__(self, normals: torch.Tensor, blind: bool) -> None:
        super().__init__()
        self.normals, self.blind = normals, blind

    def forward(self, imgs: torch.Tensor) -> AnomalyOutput:
        diff = (imgs[:, None] - self.normals[None]).abs().sum(2)  # [B, n, H, W]
        maps = diff[torch.arange(len(imgs)), diff.flatten(2).sum(-1).argmin(1)] * (0.0 if self.blind else 1.0)
        return AnomalyOutput(maps.flatten(1).amax(1), maps, imgs, maps)


@pytest.mark.parametrize("blind", [False, True])
def test_head_evidence_measures_the_fainter_strengths_only_where_the_full_strength_finds_defects(blind):
    images = _images(4, size=SIZE)
    evidence, maps = head_evidence(_NearestNormal(normalise(images), blind), images, 0, EVIDENCE_STRENGTHS,
                                   torch.device("cpu"), None)
    defects = evidence_defects(images, 0, EVIDENCE_STRENGTHS)
    measured = defects[:1] if blind else defects
    assert evidence["strengths"] == [d.strength for d in measured]
    assert evidence["n_defective"] == sum(len(d.images) for d in measured)  # the recipe choice's defect images
    assert evidence["by_strength"]["1"]["image_auroc"] == (0.5 if blind else 1.0)
    assert (evidence["stopped"] is not None) == blind
    assert maps["pixel"].shape == (4, SIZE, SIZE) and maps["image"].shape == (4, SIZE, SIZE)


# ---- the head in main_infer.py and scripts/export.py ----------------------------------------
def _infer(argv, capsys) -> tuple[int, str, str]:
    code = run_cli(main_infer.main, main_infer.get_args_parser().parse_args([str(a) for a in argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _scores(out: Path) -> dict[str, float]:
    rows = (out / "scores.csv").read_text().splitlines()[1:]
    return {row.split(",")[0]: float(row.split(",")[3]) for row in rows}


def _maps(out: Path) -> list[Path]:
    return sorted((out / "anomaly_maps").rglob("*.npy"))


def _with_head_entry(source: Path, target: Path, **changes) -> Path:
    checkpoint = _load(source)
    torch.save({**checkpoint, "head": {**checkpoint["head"], **changes}}, target)
    return target


@pytest.mark.slow
def test_head_on_scores_both_levels_with_the_head_and_its_threshold(head_run, synthetic_category, tmp_path, capsys):
    out, _ = head_run
    code, stdout, _ = _infer(["--checkpoint", out / "checkpoint-head.pth", "--data_path", synthetic_category,
                              "--output_dir", tmp_path, "--head", "on", "--no_overlays", "--amp", "none"], capsys)
    assert code == 0 and "head on (--head on)" in stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["scoring"]["pixel_map"], metrics["scoring"]["image_map"]) == ("head", "head")
    assert metrics["scoring"]["head"]["pixel"] and metrics["scoring"]["head"]["image"]
    entry = _load(out / "checkpoint-head.pth")["head"]
    model, _, _ = main_infer.build_model(out / "checkpoint-head.pth")
    scorer = HeadScorer(AnomalyScorer(model, entry["num_masks"], entry["mask_pattern"]), head_from_entry(entry),
                        entry["image_kernel"]).eval()
    dataset = main_infer.TestDataset(main_infer.find_test_items(synthetic_category), SIZE)
    with torch.no_grad():
        expected = scorer(torch.stack([dataset[i]["image"] for i in range(len(dataset))])).scores
    scores = _scores(tmp_path)
    assert np.allclose([scores[item.rel_path] for item in dataset.items], expected.numpy(), rtol=1e-5, atol=1e-7)
    held_out = entry["holdout_maps"]["image"].flatten(1).amax(1).double()
    threshold = json.loads((tmp_path / "args.json").read_text())["threshold"]
    assert threshold["image"] == pytest.approx(float(torch.quantile(held_out, 0.95)))


@pytest.mark.slow
def test_head_levels_follow_the_stored_choice_and_off_scores_as_the_mae(head_run, mae_checkpoint, synthetic_category,
                                                                        tmp_path, capsys):
    out, _ = head_run
    common = ["--data_path", synthetic_category, "--no_overlays", "--amp", "none"]
    assert _infer(["--checkpoint", mae_checkpoint, "--output_dir", tmp_path / "mae", *common], capsys)[0] == 0
    head_ckpt = out / "checkpoint-head.pth"
    assert not _load(head_ckpt)["head"]["choice"]["image"]  # trained on stain: the evidence cannot judge it
    for mode in ("off", "auto"):
        assert _infer(["--checkpoint", head_ckpt, "--output_dir", tmp_path / mode, "--head", mode, *common],
                      capsys)[0] == 0
        assert _scores(tmp_path / mode) == _scores(tmp_path / "mae")
        assert all(np.array_equal(np.load(f), np.load(tmp_path / mode / f.relative_to(tmp_path / "mae")))
                   for f in _maps(tmp_path / "mae"))
    pixel_only = _with_head_entry(head_ckpt, tmp_path / "pixel-only.pth",
                                  choice={"pixel": True, "image": False, "reason": "chosen at the pixel level"})
    code, stdout, _ = _infer(["--checkpoint", pixel_only, "--output_dir", tmp_path / "pixel", *common], capsys)
    assert code == 0 and "chosen at the pixel level" in stdout
    metrics = json.loads((tmp_path / "pixel" / "metrics.json").read_text())
    assert (metrics["scoring"]["pixel_map"], metrics["scoring"]["image_map"]) == ("head", "mse")
    assert _scores(tmp_path / "pixel") == _scores(tmp_path / "mae")  # the image level is the MAE's
    changed = [not np.array_equal(np.load(f), np.load(tmp_path / "pixel" / f.relative_to(tmp_path / "mae")))
               for f in _maps(tmp_path / "mae")]
    assert changed and all(changed)


@pytest.mark.parametrize("case", ["no head", "other size", "other masks", "old entry"])
def test_head_flags_that_cannot_hold_are_one_line_errors(case, head_run, mae_checkpoint, synthetic_category,
                                                         tmp_path, capsys):
    out, _ = head_run
    head_ckpt, extra = out / "checkpoint-head.pth", []
    if case == "no head":
        head_ckpt, expected = mae_checkpoint, "main_train_head.py"
    elif case == "other size":
        head_ckpt, expected = _with_head_entry(head_ckpt, tmp_path / "c.pth", input_size=2 * SIZE), "px"
    elif case == "other masks":
        extra, expected = ["--mask_pattern", "stripes"], "--head off"
    else:
        head_ckpt, expected = _with_head_entry(head_ckpt, tmp_path / "c.pth", version=1), "retrain the head"
    code, _, err = _infer(["--checkpoint", head_ckpt, "--data_path", synthetic_category, "--output_dir",
                           tmp_path / "out", "--head", "on", *extra], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_head_exports_to_onnx_with_parity(head_run, tmp_path, capsys):
    import onnx
    from scripts import export

    out, _ = head_run
    target = tmp_path / "head.onnx"
    code = run_cli(export.main, export.get_args_parser().parse_args(
        ["--checkpoint", str(out / "checkpoint-head.pth"), "--output", str(target), "--head", "on"]))
    assert code == 0 and "parity with PyTorch" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    scoring = json.loads(meta["scoring"])
    assert (scoring["pixel_map"], scoring["image_map"], scoring["score"]) == ("head", "head", "max")


@pytest.mark.slow
def test_the_head_choice_compares_the_same_evidence_and_reads_no_test_label(synthetic_category, tmp_path):
    """On a checkpoint with a stored recipe choice: the head's evidence is taken on the choice's own
    defect images, compared with the chosen recipe's evidence; a copy of the category without its
    test/ folder gives the same choice."""
    torch.set_num_threads(1)
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    path = _mae_checkpoint(tmp_path / "checkpoint-last.pth", synthetic_category, names)
    checkpoint = _load(path)
    model, _, _ = main_infer.build_model(path)
    options = ScoringOptions()
    maps, choice = holdout_choice(model, synthetic_category, names, options, torch.device("cpu"), None)
    torch.save({**checkpoint, "calibration": make_calibration(maps, names, SIZE, options, choice)}, path)
    no_test = tmp_path / "no_test"
    shutil.copytree(synthetic_category, no_test, ignore=shutil.ignore_patterns("test", "ground_truth"))
    entries = []
    for root, out in ((synthetic_category, tmp_path / "a"), (no_test, tmp_path / "b")):
        argv = ["--checkpoint", path, "--data_path", root, "--output_dir", out, "--steps", "20", "--batch_size", "4",
                "--select_every", "10", "--num_textures", "4", "--crop_size", "0", "--amp", "none"]
        assert run_cli(main_train_head.main, main_train_head.get_args_parser().parse_args([str(a) for a in argv])) == 0
        entries.append(_load(out / "checkpoint-head.pth")["head"])
    assert entries[0]["evidence"] == entries[1]["evidence"] and entries[0]["choice"] == entries[1]["choice"]
    stored = choice.to_dict()
    head = entries[0]["evidence"]  # the strongest first, the fainter ones unless the strongest ruled the head out
    assert head["strengths"] == stored["evidence"]["strengths"][:len(head["strengths"])]
    holdout = TestDataset(holdout_items(synthetic_category, names), SIZE).images
    measured = evidence_defects(holdout, 0, tuple(stored["evidence"]["strengths"]))[:len(head["strengths"])]
    assert head["n_defective"] == sum(len(d.images) for d in measured)  # the same defect images
    assert entries[0]["choice"]["reconstruction"] == {
        "image": stored["evidence"]["image_auroc"][choice.image.name],
        "pixel": stored["evidence"]["pixel_auroc_aupro_mean"][choice.pixel_map]}
