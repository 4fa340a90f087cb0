"""Reading the verdict: report.html lists every scored and every skipped file, skipped.csv gives the
reasons, every format Pillow decodes is read, non-square images get one note, a non-empty output folder
needs --overwrite (which deletes only this script's outputs), and the verdict words are the same in the
console, the overlay titles and the report.
"""
import csv
import json
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_infer
from image_files import random_rgb, save_image
from lora_utils import unmerged_state_dict
from models_mae import create_model
from scoring import ScoringOptions, holdout_error_maps, make_calibration
from util.cli import UserError, run_cli
from util.datasets import list_images
from util.files import prepare_output_dir
from util.report import ANOMALOUS, NORMAL, ScoredImage, Skipped, console_lines, render_report

SIZE = 56
TRAIN_ARGS = {"model": "mae_vit_tiny_patch7", "input_size": SIZE, "norm_pix_loss": False, "lora_rank": 4,
              "lora_alpha": None, "lora_dropout": 0.0, "lora_targets": ["qkv", "proj"], "epochs": 1}


class Tables(HTMLParser):
    """The text of each cell of each table row, by table id."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_report(path: Path) -> dict[str, list[dict[str, str]]]:
    parser = Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return {name: [dict(zip(rows[0], r)) for r in rows[1:]] for name, rows in parser.tables.items() if rows}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def calibrated_checkpoint(synthetic_category, tmp_path_factory) -> Path:
    """A random tiny model with the calibration main_train.py stores (4 held-out images): it has a threshold."""
    path = tmp_path_factory.mktemp("ckpt") / "calibrated.pth"
    names = [p.name for p in list_images(synthetic_category / "train" / "good")[:4]]
    train_args = {**TRAIN_ARGS, "holdout_files": names, "data_path": str(synthetic_category)}

    def save(**extra):
        torch.manual_seed(0)
        model = create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=4)
        torch.save({"model": unmerged_state_dict(model), "optimizer": {}, "scaler": None, "epoch": 0,
                    "args": train_args, **extra}, path)

    save()
    model, _, _ = main_infer.build_model(str(path))
    maps = holdout_error_maps(model, synthetic_category, names, ScoringOptions(), torch.device("cpu"), None)
    save(calibration=make_calibration(maps, names, SIZE, ScoringOptions()))
    return path


@pytest.fixture(scope="module")
def user_folder(synthetic_category, tmp_path_factory) -> Path:
    """What a new user points --images at: PNG, WebP, GIF, a wide photo, a corrupt and a truncated file, notes."""
    folder = tmp_path_factory.mktemp("user") / "photos"
    good = Image.open(synthetic_category / "test" / "good" / "000.png").convert("RGB")
    folder.mkdir()
    good.save(folder / "a.png")
    good.save(folder / "b.webp")
    good.save(folder / "c.gif")
    save_image(random_rgb(36, 64, seed=3), folder / "sub" / "wide.jpg")  # 64x36: squashed to a square
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    png = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "notes.txt").write_text("not an image")
    return folder


def _infer(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli(main_infer.main, main_infer.get_args_parser().parse_args([str(a) for a in argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_every_file_is_scored_or_listed_with_its_reason(calibrated_checkpoint, user_folder, tmp_path, capsys,
                                                         monkeypatch):
    titles = {}  # the verdict each overlay is titled with
    save_overlay = main_infer.save_overlay

    def recording(path, *args, **kwargs):
        titles[kwargs["title"]] = kwargs["verdict"]
        return save_overlay(path, *args, **kwargs)

    monkeypatch.setattr(main_infer, "save_overlay", recording)
    out = tmp_path / "out"
    code, stdout, stderr = _infer(capsys, "--checkpoint", calibrated_checkpoint, "--images", user_folder,
                                  "--output_dir", out, "--num_workers", "0", "--amp", "none")
    assert code == 0, stderr
    scored = {r["path"]: r for r in read_csv(out / "scores.csv")}
    assert sorted(scored) == ["a.png", "b.webp", "c.gif", "sub/wide.jpg"]
    skipped = {r["path"]: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert sorted(skipped) == ["corrupt.png", "notes.txt", "truncated.png"]
    assert skipped["truncated.png"] == "cannot read image (image file is truncated)"
    assert skipped["corrupt.png"].startswith("cannot read image") and "extension .txt" in skipped["notes.txt"]
    assert "4 images" in stdout and "3 files not scored" in stdout
    notes = [line for line in stderr.splitlines() if "not square" in line]
    assert len(notes) == 1 and "1 of 4 images" in notes[0] and "sub/wide.jpg, 64x36" in notes[0]

    tables = parse_report(out / "report.html")
    assert sorted(r["path"] for r in tables["scored"]) == sorted(scored)
    assert {r["path"]: r["reason"] for r in tables["skipped"]} == skipped
    # one vocabulary: the console line, the report row and the overlay title of each image agree with pred_label
    lines = {line.split()[-1]: line.split()[0] for line in stdout.splitlines()
             if line.startswith((ANOMALOUS + " ", NORMAL + " "))}
    for path, row in scored.items():
        word = ANOMALOUS if row["pred_label"] == "1" else NORMAL
        assert lines[path] == word == titles[path]
        assert next(r["verdict"] for r in tables["scored"] if r["path"] == path) == word
        assert (out / "overlays" / Path(path).with_suffix(".png")).is_file()


@pytest.mark.slow
def test_a_used_output_dir_needs_overwrite_which_deletes_only_known_outputs(calibrated_checkpoint, user_folder,
                                                                            tmp_path, capsys):
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "old_image.png").write_bytes(b"an earlier run's picture")
    (out / "scores.csv").write_text("an earlier run's scores")
    (out / "mine.txt").write_text("keep")
    argv = ("--checkpoint", calibrated_checkpoint, "--images", user_folder / "a.png", "--output_dir", out,
            "--num_workers", "0", "--amp", "none")
    code, _, stderr = _infer(capsys, *argv)
    assert code == 2 and stderr.count("\n") == 1 and "--overwrite" in stderr and "not empty" in stderr
    assert (out / "scores.csv").read_text() == "an earlier run's scores"
    code, _, stderr = _infer(capsys, *argv, "--overwrite")
    assert code == 0, stderr
    assert (out / "mine.txt").read_text() == "keep"
    assert not (out / "overlays" / "old_image.png").exists()
    assert [r["path"] for r in read_csv(out / "scores.csv")] == ["a.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png"]


def test_prepare_output_dir_removes_only_the_named_outputs(tmp_path):
    out = tmp_path / "out"
    (out / "anomaly_maps" / "deep").mkdir(parents=True)
    (out / "anomaly_maps" / "deep" / "x.npy").write_bytes(b"")
    (out / "report.html").write_text("old")
    (out / "keep.csv").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        prepare_output_dir(str(out), overwrite=False, outputs=("anomaly_maps", "report.html"))
    assert prepare_output_dir(str(out), overwrite=True, outputs=("anomaly_maps", "report.html", "absent.png")) == out
    assert sorted(p.name for p in out.iterdir()) == ["keep.csv"]
    with pytest.raises(UserError, match="not a folder"):
        prepare_output_dir(str(out / "keep.csv"))
    assert prepare_output_dir(str(tmp_path / "new" / "deeper")).is_dir()  # absent or empty: fine


def test_report_without_threshold_or_labels_still_lists_everything(tmp_path):
    images = [ScoredImage("b<&>.png", 0.25), ScoredImage("a b.png", 0.75, overlay="overlays/a b.png")]
    html = render_report("MAE-AD report", "--images x", images, [Skipped("z.bmp", "cannot read image (bad)")],
                         "none (no threshold)")
    (tmp_path / "report.html").write_text(html, encoding="utf-8")
    tables = parse_report(tmp_path / "report.html")
    assert [r["path"] for r in tables["scored"]] == ["a b.png", "b<&>.png"]  # highest score first
    assert all(r["verdict"] == "-" and "label" not in r for r in tables["scored"])
    assert tables["skipped"] == [{"path": "z.bmp", "reason": "cannot read image (bad)"}]
    assert 'src="overlays/a%20b.png"' in html and "http" not in html.replace("http-equiv", "")
    assert "Threshold</b>: none (no threshold)." in html and "at or above" not in html


def test_console_lines_line_up_at_fixed_precision():
    lines = console_lines([ScoredImage("x.png", 12.5, 0.91, 1), ScoredImage("y.png", 0.1234567, 0.2, 0)], "1 (test)")
    assert lines[0] == "threshold: 1 (test)" and lines[1].split() == ["verdict", "score", "normalised", "path"]
    assert lines[2].split() == [ANOMALOUS, "12.50000", "0.910", "x.png"]
    assert lines[3].split() == [NORMAL, "0.12346", "0.200", "y.png"]
    assert len({len(line) - len(line.split()[-1]) for line in lines[2:]}) == 1  # the paths start in one column


def test_non_image_and_hidden_files(tmp_path):
    from util.images import IMG_EXTENSIONS, is_image_file, other_files

    for ext in (".png", ".webp", ".gif", ".jpg", ".tif", ".bmp"):
        assert ext in IMG_EXTENSIONS
    assert not is_image_file(tmp_path / "x.txt") and not is_image_file(tmp_path / ".hidden.png")
    (tmp_path / "x.txt").write_text("")
    (tmp_path / ".DS_Store").write_text("")
    save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "y.png")
    assert [rel for _, rel in other_files(tmp_path)] == ["x.txt"]


def test_old_flag_names_are_still_accepted_but_not_shown():
    from scripts import benchmark, benchmark_export, export, predict_onnx

    cases = [(export, ["--checkpoint", "c", "--output", "m.onnx"], "--batch", "3", "batch", 3),
             (predict_onnx, ["--images", "x", "--output_dir", "o"], "--model", "m.onnx", "onnx", "m.onnx"),
             (benchmark, [], "--json", "b.json", "output", "b.json"),
             (benchmark_export, ["--data_path", "d"], "--json", "b.json", "output", "b.json")]
    for module, argv, old, value, dest, expected in cases:
        parser = module.get_args_parser()
        assert getattr(parser.parse_args([*argv, old, value]), dest) == expected, (module.__name__, old)
        shown = parser.format_help()
        assert old + " " not in shown.replace(f"{old}_", "") and old + "," not in shown, (module.__name__, old)
        assert parser.prog == Path(module.__file__).name  # the usage line names the script
    assert predict_onnx.get_args_parser().parse_args(["--onnx", "m.onnx", "--images", "x", "--output_dir", "o"]).onnx \
        == "m.onnx"
    assert main_infer.get_args_parser().prog == "main_infer.py"


# ---- warnings: the threshold against the test normals, the stored choice's note ----------------
CHOICE_WARNING = "the held-out evidence could not tell the image candidates apart"


@pytest.fixture(scope="module")
def scaled_checkpoints(synthetic_category, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints whose held-out maps are the real ones scaled by 1e-3 ('low': every test image scores
    above the threshold; its stored choice carries a warning) and by 1e3 ('high': none does)."""
    folder = tmp_path_factory.mktemp("scaled")
    names = [p.name for p in list_images(synthetic_category / "train" / "good")[:4]]
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=4)
    base = {"model": unmerged_state_dict(model), "optimizer": {}, "scaler": None, "epoch": 0,
            "args": {**TRAIN_ARGS, "holdout_files": names, "data_path": str(synthetic_category),
                     "scoring_version": 3}}
    torch.save(base, folder / "plain.pth")
    model, _, _ = main_infer.build_model(str(folder / "plain.pth"))
    maps = holdout_error_maps(model, synthetic_category, names, ScoringOptions(), torch.device("cpu"), None)
    paths = {}
    for name, scale in (("low", 1e-3), ("high", 1e3)):
        calibration = make_calibration({e: m * scale for e, m in maps.items()}, names, SIZE, ScoringOptions())
        if name == "low":  # the stored choice of a checkpoint whose evidence could not decide
            calibration["choice"] = {"image_map": "mse", "image_sigma": 4.0, "score": "max", "topk_fraction": 0.01,
                                     "pixel_map": "mse", "evidence": {}, "warning": CHOICE_WARNING}
        paths[name] = folder / f"{name}.pth"
        torch.save({**base, "calibration": calibration}, paths[name])
    return paths


@pytest.mark.slow
def test_false_alarms_above_the_promise_and_the_choice_warning_show_everywhere(scaled_checkpoints,
                                                                              synthetic_category, tmp_path, capsys):
    runs = {}
    for name, path in scaled_checkpoints.items():
        out = tmp_path / name
        code, stdout, stderr = _infer(capsys, "--checkpoint", path, "--data_path", synthetic_category, "--output_dir",
                                      out, "--num_workers", "0", "--amp", "none", "--no_overlays")
        assert code == 0, stderr
        runs[name] = (json.loads((out / "metrics.json").read_text()), stdout, stderr,
                      (out / "report.html").read_text(encoding="utf-8"))

    metrics, stdout, stderr, page = runs["low"]
    check = metrics["threshold_check"]
    assert (check["n_normal"], check["n_flagged"], check["false_alarm_rate"]) == (4, 4, 1.0)
    assert check["promised_rate"] == pytest.approx(0.05) and "--holdout_root" in check["warning"]
    assert metrics["warnings"] == [CHOICE_WARNING, check["warning"]]
    for text in metrics["warnings"]:  # the same words in the console and on the page
        assert f"warning: {text}" in stderr.splitlines()
        assert html_escape(text) in page
    assert page.count('class="warning"') == 2 and "4 of 4 good test images" in stdout

    metrics, stdout, stderr, page = runs["high"]
    check = metrics["threshold_check"]
    assert (check["n_normal"], check["n_flagged"], check["warning"]) == (4, 0, None)
    assert metrics["warnings"] == [] and 'class="warning"' not in page and "warning:" not in stderr
    assert "0 of 4 good test images" in stdout and "0 of 4 good test images" in page


@pytest.mark.slow
def test_the_choice_warning_shows_on_unlabelled_runs(scaled_checkpoints, user_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = _infer(capsys, "--checkpoint", scaled_checkpoints["low"], "--images", user_folder / "a.png",
                             "--output_dir", out, "--num_workers", "0", "--amp", "none", "--no_overlays")
    assert code == 0, stderr
    assert f"warning: {CHOICE_WARNING}" in stderr.splitlines()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('class="warning"') == 1 and CHOICE_WARNING in page and not (out / "metrics.json").exists()


def test_report_shows_each_warning_in_a_box():
    html = render_report("MAE-AD report", "--images x", [ScoredImage("a.png", 1.0, 0.7, 1)], [], "0.5 (test)",
                         notes=["a note"], warnings=["first <one>", "second"])
    assert html.count('<p class="warning"><b>Warning</b>: ') == 2 and "first &lt;one&gt;" in html
    assert html.index("first &lt;one&gt;") < html.index("second") < html.index("a note")
