"""scripts/quality_table.py: the demo recipe it trains is the Makefile's, and its rows are the
candidates' metrics on the same checkpoint (the original method's row equals main_infer.py's)."""
import json
import shutil

import pytest

import main_infer
import main_train
from scripts import quality_table

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
        choice = {"image": "mse max s4", "oracle_image": "mse max s4", "pixel": "mse", "held_out_pixel": "mse",
                  "oracle_pixel": "mse", "evidence": {"map_consistency": 0.5}}
        return {**{key: row for key, _ in quality_table.ROWS}, "choice": choice}

    table = quality_table.markdown({"scratch": {"grass": run(0.25), "capsule": run(0.75)}},
                                   {"grass": "texture", "capsule": "object"}, ["grass"])
    header = next(line for line in table.splitlines() if line.startswith("| recipe"))
    assert header.endswith("| mean texture | mean object | mean photo |")
    first = next(line for line in table.splitlines() if line.startswith("| original method"))
    assert first.split(" | ")[-1] == "0.250 / 0.250 / 0.250 |"  # the photo mean: grass only
