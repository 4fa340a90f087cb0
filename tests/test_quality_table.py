"""scripts/quality_table.py: the demo recipe it trains is the Makefile's, its rows are the
candidates' metrics on the same checkpoint (the original method's row equals main_infer.py's), its
cached maps are recomputed when the evidence changes, and it reports the choice's false alarms."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import main_infer
import main_train
import main_train_head
from scoring import ScoringOptions, holdout_choice, make_calibration
from scripts import quality_table
from util.calibration import image_scores
from util.recipe_choice import EVIDENCE_STRENGTHS, ImageRecipe
from util.smoothing import GaussianSmoothing

from test_scoring_cli import INFER, _checkpoint, _cli


def test_the_table_trains_the_makefile_cpu_demo_recipe(tmp_path):
    from test_makefile import _demo_commands

    train = main_train.get_args_parser().parse_args(_demo_commands(f"OUT={tmp_path}", "RECIPE=cpu")["main_train.py"])
    assert {k: getattr(train, k) for k in quality_table.DEMO_RECIPE} == quality_table.DEMO_RECIPE


def test_bad_category_lists_are_one_line_errors(capsys):
    code, _, err = _cli(quality_table, ["--categories", "capsule", "--output_dir", "x"], capsys)
    assert code == 2 and "NAME=VALUE" in err


@pytest.mark.slow
def test_rows_are_the_candidates_on_one_checkpoint(synthetic_category, tmp_path, capsys, one_thread):
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    run = tmp_path / "out" / "scratch_cat"
    run.mkdir(parents=True)
    _checkpoint(run / "checkpoint-last.pth", names, synthetic_category)
    code, stdout, err = _cli(quality_table, ["--categories", f"cat={synthetic_category}", "--output_dir",
                                             tmp_path / "out", "--no_train"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "quality.json").read_text())["results"]["scratch"]["cat"]
    assert (run / "maps_grid.pt").is_file() and (run / "maps_stripes.pt").is_file()
    # the original method's row is what main_infer.py gives for that recipe
    infer = [a for a in INFER if a not in ("--sigma", "2")]
    code, _, err = _cli(main_infer, ["--checkpoint", run / "checkpoint-last.pth", "--data_path", synthetic_category,
                                     "--output_dir", tmp_path / "o", "--mask_pattern", "stripes", "--image_map", "mse",
                                     "--image_sigma", "4", "--pixel_map", "mse", *infer], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    for key in quality_table.METRICS:
        assert result["original"][key] == pytest.approx(metrics[key], abs=1e-6)
    # auto is one of the candidates, and the oracle is at least as good as auto on the test labels
    assert result["auto"]["image_auroc"] == result["image_candidates"][result["choice"]["image"]]
    assert result["oracle"]["image_auroc"] >= result["auto"]["image_auroc"]
    assert "| original method" in (tmp_path / "out" / "quality.md").read_text()
    # a rerun reads the cached maps and gives the same table
    shutil.copy(tmp_path / "out" / "quality.json", tmp_path / "first.json")
    code, _, err = _cli(quality_table, ["--categories", f"cat={synthetic_category}", "--output_dir",
                                        tmp_path / "out", "--no_train"], capsys)
    assert code == 0 and (tmp_path / "out" / "quality.json").read_text() == (tmp_path / "first.json").read_text()
    # maps made for other evidence (here: other strengths) are recomputed, not re-read
    stale = torch.load(run / "maps_grid.pt", weights_only=True)
    stale["key"]["strengths"] = [1.0]
    stale["defective"] = stale["defective"][:1]
    torch.save(stale, run / "maps_grid.pt")
    code, _, err = _cli(quality_table, ["--categories", f"cat={synthetic_category}", "--output_dir",
                                        tmp_path / "out", "--no_train"], capsys)
    assert code == 0 and (tmp_path / "out" / "quality.json").read_text() == (tmp_path / "first.json").read_text()
    assert torch.load(run / "maps_grid.pt", weights_only=True)["key"]["strengths"] == list(EVIDENCE_STRENGTHS)
    # the choice's evidence per strength and its false alarms are reported
    evidence = result["choice"]["evidence"]
    assert list(evidence["by_strength"]) == [f"{s:g}" for s in EVIDENCE_STRENGTHS] and "warning" in result["choice"]
    alarms = result["false_alarms"]
    assert 0.0 <= alarms["rate"] <= 1.0 and alarms["promised"] == pytest.approx(0.05) and alarms["n_normal"] == 4


def test_kinds_and_the_photo_mean_come_from_the_generators_markers(tmp_path):
    photo, drawn, bare = tmp_path / "grass", tmp_path / "capsule", tmp_path / "bare"
    for root, meta in ((photo, {"kind": "texture", "generator": "scripts/make_photo_mvtec.py"}),
                       (drawn, {"kind": "capsule"})):
        root.mkdir()
        (root / ".synthetic_mvtec.json").write_text(json.dumps(meta))
    bare.mkdir()
    assert [quality_table.kind_of(r) for r in (photo, drawn, bare)] == [("texture", True), ("object", False),
                                                                        ("object", False)]

    def run(value):
        row = dict.fromkeys(quality_table.METRICS, value)
        values = {"image_auroc": {"mse max s4": value}, "pixel_auroc_aupro_mean": {"mse": value}}
        evidence = {"map_consistency": 0.5, "strengths": [1.0, 0.5], **values, "by_strength": {"1": values, "0.5": values}}
        choice = {"image": "mse max s4", "oracle_image": "mse max s4", "pixel": "mse", "held_out_pixel": "mse",
                  "oracle_pixel": "mse", "warning": None, "evidence": evidence}
        alarms = {"rate": 0.1, "promised": 0.05, "n_normal": 20}
        return {**{key: row for key, _ in quality_table.ROWS}, "choice": choice, "false_alarms": alarms}

    table = quality_table.markdown({"scratch": {"grass": run(0.25), "capsule": run(0.75)}},
                                   {"grass": "texture", "capsule": "object"}, ["grass"])
    header = next(line for line in table.splitlines() if line.startswith("| recipe"))
    assert header.endswith("| mean texture | mean object | mean photo |")
    first = next(line for line in table.splitlines() if line.startswith("| original method"))
    assert first.split(" | ")[-1] == "0.250 / 0.250 / 0.250 |"  # the photo mean: grass only


def test_false_alarms_are_the_test_normals_at_or_above_the_learnt_threshold():
    rng = np.random.default_rng(0)
    normal = torch.from_numpy(rng.random((8, 16, 16))).float()
    # test normals: four copies of held-out images and four images far above every held-out one
    test = torch.cat([normal[:4], normal[:4] + 10.0])
    maps = {"normal": {"mse": normal, "msgms": normal}, "test": {"mse": test, "msgms": test},
            "labels": torch.zeros(8, dtype=torch.long)}
    choice = {"image_map": "mse", "image_sigma": 4.0, "score": "max", "topk_fraction": 0.01, "pixel_map": "mse"}
    alarms = quality_table.false_alarms(maps, choice)
    threshold = torch.quantile(image_scores(GaussianSmoothing(4.0)(normal), "max").double(), 0.95)
    assert alarms["threshold"] == pytest.approx(float(threshold))
    assert alarms["rate"] == pytest.approx(float((quality_table.scores_of_test_images(maps, ImageRecipe("mse", 4.0))
                                                  >= alarms["threshold"]).mean()))
    assert 0.5 <= alarms["rate"] < 1.0 and alarms["n_normal"] == 8 and alarms["promised"] == pytest.approx(0.05)


def test_holdout_roots_name_the_held_out_images(tmp_path, capsys):
    own = {"data_path": str(tmp_path / "cat"), "holdout_files": ["a.png"], "holdout_root": None}
    assert quality_table.held_out(own, None) == (own["data_path"], ["a.png"])
    root = tmp_path / "apart"
    (root / "train" / "good").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (8, 8)).save(root / "train" / "good" / f"{i}.png")
    assert quality_table.held_out(own, root) == (str(root), [f"{i}.png" for i in range(6)])
    trained = {**own, "holdout_root": str(root), "holdout_files": ["0.png", "1.png"]}
    assert quality_table.held_out(trained, None) == (str(root), ["0.png", "1.png"])
    assert quality_table.held_out(trained, root) == (str(root), ["0.png", "1.png"])
    code, _, err = _cli(quality_table, ["--categories", f"cat={tmp_path}", "--holdout_roots", f"other={root}",
                                        "--output_dir", tmp_path / "out"], capsys)
    assert code == 2 and "--holdout_roots" in err and len(err.strip().splitlines()) == 1


def test_bad_strengths_are_one_line_errors(capsys):
    for bad in ("0", "1,1.5", "a", ""):
        code, _, err = _cli(quality_table, ["--categories", "cat=x", "--output_dir", "x", "--strengths", bad], capsys)
        assert code == 2 and "--strengths" in err and len(err.strip().splitlines()) == 1


def test_cached_maps_are_recomputed_when_the_evidence_changes(tmp_path, monkeypatch):
    run = tmp_path / "prior_cat"
    run.mkdir()
    (run / "checkpoint-last.pth").write_bytes(b"weights")
    args = {"data_path": str(tmp_path / "cat"), "holdout_files": ["a.png"], "seed": 0}
    monkeypatch.setattr(quality_table, "read_checkpoint", lambda path: {"args": args})
    computed = []

    def collect(checkpoint, root, holdout, seed, strengths, pattern, device):
        computed.append(strengths)
        return {"strengths": list(strengths)}

    monkeypatch.setattr(quality_table, "collect_maps", collect)
    maps = [quality_table.cached_maps(run, tmp_path / "cat", None, s, "grid", "cpu")
            for s in ((1.0, 0.5), (1.0, 0.5), (1.0,), (1.0,))]
    assert computed == [(1.0, 0.5), (1.0,)]  # re-read while the key matches, recomputed when it changes
    assert [m["strengths"] for m in maps] == [[1.0, 0.5], [1.0, 0.5], [1.0], [1.0]]
    assert maps[2]["key"]["strengths"] == [1.0] and maps[2]["key"]["kinds"]


@pytest.mark.slow
def test_head_rows_are_what_main_infer_scores_with_the_head(synthetic_category, tmp_path, capsys, one_thread):
    """The head's row at both levels equals main_infer.py --head on; the chosen row (here the head at the
    image level only) equals main_infer.py's default scoring of the head checkpoint, false alarms included."""
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    run = tmp_path / "out" / "scratch_cat"
    run.mkdir(parents=True)
    path = _checkpoint(run / "checkpoint-last.pth", names, synthetic_category)
    model, _, _ = main_infer.build_model(path)
    options = ScoringOptions()
    maps, choice = holdout_choice(model, synthetic_category, names, options, torch.device("cpu"), None)
    torch.save({**torch.load(path, weights_only=True),
                "calibration": make_calibration(maps, names, model.img_size, options, choice)}, path)
    code, _, err = _cli(main_train_head, ["--checkpoint", path, "--data_path", synthetic_category, "--steps", "20",
                                          "--batch_size", "4", "--select_every", "10", "--eval_every", "5",
                                          "--num_textures", "4", "--crop_size", "0", "--amp", "none"], capsys)
    assert code == 0, err
    head_ckpt = torch.load(run / "checkpoint-head.pth", weights_only=True)
    head_ckpt["head"]["choice"] = {**head_ckpt["head"]["choice"], "image": True, "pixel": False}
    torch.save(head_ckpt, run / "checkpoint-head.pth")
    code, _, err = _cli(quality_table, ["--categories", f"cat={synthetic_category}", "--output_dir",
                                        tmp_path / "out", "--no_train", "--head"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "quality.json").read_text())["results"]["scratch"]["cat"]
    infer = [a for a in INFER if a not in ("--sigma", "2")]
    scored = {}
    for mode in ("on", "auto"):
        code, _, err = _cli(main_infer, ["--checkpoint", run / "checkpoint-head.pth", "--data_path",
                                         synthetic_category, "--output_dir", tmp_path / mode, "--head", mode,
                                         *infer], capsys)
        assert code == 0, err
        scored[mode] = json.loads((tmp_path / mode / "metrics.json").read_text())
    for key in quality_table.METRICS:
        assert result["head"]["head"][key] == pytest.approx(scored["on"][key], abs=1e-6)
        assert result["head"]["chosen"][key] == pytest.approx(scored["auto"][key], abs=1e-6)
    assert result["head"]["chosen"]["pixel_auroc"] == result["auto"]["pixel_auroc"]  # the recipe's pixel level
    assert result["head"]["false_alarms"]["rate"] == pytest.approx(scored["auto"]["threshold_check"]["false_alarm_rate"])
    assert all(v >= 0 for v in result["head"]["spread"].values())
    table = (tmp_path / "out" / "quality.md").read_text()
    assert "Discriminative head" in table
    assert ("(strongest only)" in table) == bool(head_ckpt["head"]["evidence"]["stopped"])
