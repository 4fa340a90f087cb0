"""The per-category recipe choice: graded evidence that separates candidates where full-strength defects
saturate, a choice that follows it, prefers the original recipe on a tie, warns when the evidence
decides nothing, reads no test label, is stored in the checkpoint and can be overridden; checkpoints
made before it (or before graded evidence) score exactly as before."""
import json
import shutil

import numpy as np
import pytest
import torch

import main_infer
from models_mae import create_model
from scoring import (CALIBRATION_VERSION, LEGACY_OPTIONS, ScoringOptions, checkpoint_defaults, holdout_choice,
                     holdout_error_maps, make_calibration)
from util.defects import EVIDENCE_KINDS
from util.recipe_choice import (EVIDENCE_STRENGTHS, HEAD_MARGINS, IMAGE_CANDIDATES, PIXEL_CANDIDATES, PIXEL_MARGIN,
                                TOLERANCE, DefectMaps, ImageRecipe, chance_level, check_strengths, choose_head,
                                choose_recipes)

from test_scoring_cli import INFER, SIZE, _checkpoint, _cli, _rows

INFER_STORED_DEFAULTS = [a for a in INFER if a not in ("--sigma", "2")]  # the stored recipe sets sigma


def _maps(n, s, rng, fixed):
    """{mse, msgms} maps [n, s, s]: noise, plus (aligned) a bright fixed pattern every image shares."""
    base = rng.random((n, s, s)) * 0.2
    if fixed:
        base[:, 4:8, 4:8] += 3.0  # a part of the object that always reconstructs badly
    m = torch.from_numpy(base).float()
    return {"mse": m, "msgms": m.clone()}


def _graded(maps, rng, s, amplitude, size=4, low=12, strengths=EVIDENCE_STRENGTHS, copies=2):
    """The same square bump defects (size x size, one place per copy, beyond `low` in both axes) at each
    strength, amplitude x strength high."""
    n = next(iter(maps.values())).shape[0]
    source = torch.arange(n).repeat(copies)
    places = rng.integers(low, s - size - 2, size=(len(source), 2))
    out = []
    for strength in strengths:
        defective = {e: m[source].clone() for e, m in maps.items()}
        masks = torch.zeros((len(source), s, s), dtype=torch.bool)
        for i, (y, x) in enumerate(places):
            for m in defective.values():
                m[i, y:y + size, x:x + size] += amplitude * strength
            masks[i, y:y + size, x:x + size] = True
        out.append(DefectMaps(strength, defective, source, masks))
    return out


def test_graded_evidence_finds_the_calibrated_recipe_where_every_candidate_saturates_at_full_strength():
    rng, s, n = np.random.default_rng(0), 64, 10
    base = rng.random((n, s, s)) * 0.2
    base[:, 4:24, 4:24] += 3.0  # a large part of the object that always reconstructs badly (> top 5%)
    normal = {"mse": torch.from_numpy(base).float(), "msgms": torch.from_numpy(base).float()}
    # at full strength an 8x8 defect outshines the fixed pattern at every smoothing: every candidate finds
    # it; at 1/4 and below it is fainter, and the raw maps' top pixels are the fixed pattern again
    graded = _graded(normal, rng, s, amplitude=8.0, size=8, low=30)
    full = choose_recipes(normal, graded[:1], pixel_sigma=0.0)
    assert min(full.image_evidence.values()) > 0.99  # saturated: nothing to choose between
    assert full.image == ImageRecipe("mse", 4.0) and full.warning and "cannot tell them apart" in full.warning
    choice = choose_recipes(normal, graded, pixel_sigma=0.0)
    assert choice == choose_recipes(normal, graded, pixel_sigma=0.0)  # deterministic
    assert choice.warning is None and choice.per_pixel_eligible and choice.map_consistency > 0.9
    assert choice.image.image_map.endswith("absz")
    weakest = choice.image_by_strength["0.125"]
    assert weakest[choice.image.name] > 0.95 and weakest["mse max s4"] < 0.75  # raw mse is fooled when faint
    assert choice.image_evidence["mse max s4"] < choice.image_evidence[choice.image.name] - TOLERANCE
    best = max(choice.image_evidence.values())
    assert choice.image_evidence[choice.image.name] >= best - TOLERANCE
    stored = choice.to_dict()
    assert stored["warning"] is None and stored["evidence"]["strengths"] == list(EVIDENCE_STRENGTHS)
    for key, values in stored["evidence"]["by_strength"].items():  # the mean is over the stored strengths
        assert set(values["image_auroc"]) == set(choice.image_evidence)
    assert stored["evidence"]["image_auroc"]["mse max s4"] == pytest.approx(
        np.mean([v["image_auroc"]["mse max s4"] for v in stored["evidence"]["by_strength"].values()]))


def test_a_texture_keeps_raw_maps_and_the_original_recipe_on_a_tie():
    rng, s, n = np.random.default_rng(0), 32, 10
    normal = _maps(n, s, rng, fixed=False)
    choice = choose_recipes(normal, _graded(normal, rng, s, amplitude=1.0), pixel_sigma=0.0)
    # nothing fixed to remove: per-pixel statistics are not eligible, the original recipe wins the tie
    assert choice.map_consistency < 0.2 and not choice.per_pixel_eligible
    assert not choice.image.image_map.endswith("absz") and choice.pixel_map == "mse"
    assert "mse-absz" in choice.pixel_evidence  # still measured and reported
    raw = {c.name for c in IMAGE_CANDIDATES if not c.image_map.endswith("absz")}
    top = max(v for k, v in choice.image_evidence.items() if k in raw)
    first = next(k for k, v in choice.image_evidence.items() if k in raw and v >= top - TOLERANCE)
    assert choice.image.name == first


def test_a_warning_when_the_synthetic_defects_are_not_found_and_the_original_method_is_kept():
    rng, s, n = np.random.default_rng(1), 32, 10
    normal = _maps(n, s, rng, fixed=False)
    # defects far fainter than the noise: the best candidate finds them at little better than chance
    choice = choose_recipes(normal, _graded(normal, rng, s, amplitude=0.02), pixel_sigma=0.0)
    strongest = choice.image_by_strength["1"]
    assert max(strongest.values()) < choice.chance_level == chance_level(10, 20)
    assert choice.image == IMAGE_CANDIDATES[0] and choice.pixel_map == PIXEL_CANDIDATES[0]
    assert "decides nothing" in choice.warning and "\n" not in choice.warning
    assert choice.to_dict()["warning"] == choice.warning


def test_a_calibrated_pixel_map_is_chosen_only_with_a_clear_lead():
    rng, s, n = np.random.default_rng(0), 32, 10
    normal = _maps(n, s, rng, fixed=True)
    small = choose_recipes(normal, _graded(normal, rng, s, amplitude=1.0), pixel_sigma=0.0)
    # a calibrated pixel map leads, but by less than PIXEL_MARGIN: the pixel map stays raw
    assert 0 < small.pixel_evidence["mse-absz"] - small.pixel_evidence["mse"] < PIXEL_MARGIN
    assert small.pixel_map == "mse"
    for m in normal.values():
        m[:, :10] += 3.0  # a large fixed bright band: the raw map's false alarms cover a third of the image
    choice = choose_recipes(normal, _graded(normal, rng, s, amplitude=1.0), pixel_sigma=0.0)
    assert choice.pixel_evidence[choice.pixel_map] - choice.pixel_evidence["mse"] >= PIXEL_MARGIN
    assert choice.pixel_map.endswith("absz") and choice.to_dict()["evidence"]["pixel_margin"] == PIXEL_MARGIN


def test_chance_level_is_two_null_standard_deviations_above_half_and_falls_with_more_images():
    # 8 held-out photo images with 7 defects each: 0.72; 20 held-out images: 0.64
    assert chance_level(8, 56) == pytest.approx(0.720, abs=1e-3) and chance_level(20, 140) == pytest.approx(0.638, abs=1e-3)
    # the pcb's best held-out AUROC (0.69 from 20 images) is evidence; the same from 8 images is not
    assert chance_level(20, 140) < 0.69 < chance_level(8, 56)


def test_evidence_strengths_out_of_range_are_errors():
    assert check_strengths([0.25, 1, 0.5]) == (1.0, 0.5, 0.25)
    for bad in ([], [0.0], [1.5], [-0.5], [0.5, 0.5]):
        with pytest.raises(ValueError, match="in \\(0, 1\\]"):
            check_strengths(bad)


def _head_evidence(image, pixel, full_strength_image=None, n_normal=8, per_strength=56):
    by_strength = {f"{s:g}": {"image_auroc": image, "pixel_auroc_aupro_mean": pixel} for s in EVIDENCE_STRENGTHS}
    if full_strength_image is not None:
        by_strength["1"]["image_auroc"] = full_strength_image
    return {"image_auroc": image, "pixel_auroc_aupro_mean": pixel, "strengths": list(EVIDENCE_STRENGTHS),
            "by_strength": by_strength, "n_normal": n_normal, "n_defective": per_strength * len(EVIDENCE_STRENGTHS)}


def _stored_choice(image, pixel):
    """A RecipeChoice.to_dict() whose chosen recipes (mse max s4, pixel mse) have this evidence."""
    other = {"image_auroc": {ImageRecipe("mse", 4.0).name: image, ImageRecipe("mse", 2.0).name: 0.99},
             "pixel_auroc_aupro_mean": {"mse": pixel, "fusion": 0.99}}
    return {"image_map": "mse", "image_sigma": 4.0, "score": "max", "topk_fraction": 0.01, "pixel_map": "mse",
            "evidence": {"strengths": list(EVIDENCE_STRENGTHS), "by_strength": {}, **other}}


@pytest.mark.parametrize("head_image, head_pixel, full, expected", [
    (0.80, 0.80, None, (True, True)),  # leads both levels by more than the margin
    (0.70 + HEAD_MARGINS["image"] - 0.005, 0.60 + HEAD_MARGINS["pixel"], None, (False, True)),  # image lead short
    (0.70 + HEAD_MARGINS["image"], 0.60 + HEAD_MARGINS["pixel"] - 0.005, None, (True, False)),  # pixel lead short
    (0.73, 0.60 + 0.06, None, (False, False)),  # the capsule's misleading pixel lead (docs/QUALITY.md)
    (0.90, 0.50, 0.55, (False, False)),  # the image lead comes from faint defects, full strength is chance
    (0.50, 0.80, 0.50, (False, False)),  # a pixel lead from a head that finds nothing at full strength
])
def test_the_head_takes_a_level_only_when_it_clearly_leads_the_chosen_recipe(head_image, head_pixel, full, expected):
    decision = choose_head(_head_evidence(head_image, head_pixel, full), _stored_choice(0.70, 0.60))
    assert (decision["image"], decision["pixel"]) == expected
    assert decision["reconstruction"] == {"image": 0.70, "pixel": 0.60}  # the chosen recipes', not the best ones
    assert "0.700" in decision["reason"] and "mse max s4" in decision["reason"]
    assert ("within chance" in decision["reason"]) == (full is not None)  # both fulls are below 0.72


@pytest.mark.parametrize("full, expected", [(0.55, (False, False)), (0.74, (False, True))])
def test_a_head_measured_at_the_strongest_strength_only_is_judged_on_its_own_counts(full, expected):
    """scoring.head_evidence stops after the strongest strength when the head finds nothing there: its
    chance level is then that of its own 56 defects (0.72), not of a quarter of them."""
    one = {"image_auroc": full, "pixel_auroc_aupro_mean": 0.90, "strengths": [1.0], "n_normal": 8, "n_defective": 56,
           "by_strength": {"1": {"image_auroc": full, "pixel_auroc_aupro_mean": 0.90}}}
    decision = choose_head(one, _stored_choice(0.70, 0.60))
    assert (decision["image"], decision["pixel"]) == expected
    assert ("within chance (0.72)" in decision["reason"]) == (full < 0.72)


def test_no_head_without_graded_evidence_to_compare_it_with():
    old = {**_stored_choice(0.5, 0.5), "evidence": {"image_auroc": {}, "pixel_auroc_aupro_mean": {}}}
    for stored in (None, old):
        decision = choose_head(_head_evidence(0.99, 0.99), stored)
        assert not decision["image"] and not decision["pixel"] and "--head on" in decision["reason"]


def test_checkpoint_defaults_use_the_stored_choice_and_old_checkpoints_the_old_defaults():
    stored = {"version": CALIBRATION_VERSION, "choice": {"image_map": "mse"},
              "defaults": {**ScoringOptions().to_dict(), "image_map": "mse-absz"}}
    options, source = checkpoint_defaults(stored, {"scoring_version": 3})
    assert options.image_map == "mse-absz" and source == "chosen for this category from its held-out normal images"
    # a choice made from full-strength defects only (calibration version 3): the same options, with a note
    old_options, old_source = checkpoint_defaults({**stored, "version": 3}, {"scoring_version": 3})
    assert old_options == options and "note:" in old_source and "scored as before" in old_source
    assert checkpoint_defaults(None, {"scoring_version": 3}) == (ScoringOptions(), "the global defaults")
    options, source = checkpoint_defaults({"version": 2, "defaults": LEGACY_OPTIONS.to_dict()}, {})
    assert options == LEGACY_OPTIONS and options.mask_pattern == "stripes" and source.startswith("note:")
    assert checkpoint_defaults(None, {})[0] == LEGACY_OPTIONS


@pytest.mark.slow
def test_the_choice_reads_no_test_label(synthetic_category, tmp_path, one_thread):
    swapped = tmp_path / "swapped"  # the same images with the test labels permuted
    shutil.copytree(synthetic_category, swapped)
    (swapped / "test" / "good").rename(swapped / "test" / "tmp")
    (swapped / "test" / "crack").rename(swapped / "test" / "good")
    (swapped / "test" / "tmp").rename(swapped / "test" / "crack")
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=SIZE, lora_rank=0).eval()
    results = [holdout_choice(model, root, names, ScoringOptions(), torch.device("cpu"), None)
               for root in (synthetic_category, swapped)]
    (maps_a, choice_a), (maps_b, choice_b) = results
    assert choice_a == choice_b and all(torch.equal(maps_a[e], maps_b[e]) for e in maps_a)
    assert choice_a.n_normal == 4 and choice_a.strengths == EVIDENCE_STRENGTHS
    assert 0 < choice_a.n_defective <= 4 * len(EVIDENCE_KINDS) * len(EVIDENCE_STRENGTHS)


def _store_and_score(checkpoint, calibration, ckpt, category, out, capsys):
    """Store `calibration` in the checkpoint (a scoring-version-3 run) and score `category` with its defaults."""
    checkpoint["calibration"] = calibration
    checkpoint["args"]["scoring_version"] = 3
    torch.save(checkpoint, ckpt)
    return _cli(main_infer, ["--checkpoint", ckpt, "--data_path", category, "--output_dir", out,
                             *INFER_STORED_DEFAULTS], capsys)


@pytest.mark.slow
def test_a_stored_choice_is_used_recorded_and_overridden_by_flags(synthetic_category, tmp_path, capsys, one_thread):
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    ckpt = _checkpoint(tmp_path / "c.pth", names, synthetic_category)
    checkpoint = torch.load(ckpt, weights_only=True)
    model, _, _ = main_infer.build_model(str(ckpt))
    maps, choice = holdout_choice(model, synthetic_category, names, ScoringOptions(), torch.device("cpu"), None)
    code, stdout, err = _store_and_score(checkpoint, make_calibration(maps, names, SIZE, ScoringOptions(), choice),
                                         ckpt, synthetic_category, tmp_path / "a", capsys)
    assert code == 0, err
    assert "chosen for this category" in stdout and "calibration: stored in the checkpoint" in stdout
    scoring = json.loads((tmp_path / "a" / "metrics.json").read_text())["scoring"]
    assert scoring["image_map"] == choice.image.image_map and scoring["pixel_map"] == choice.pixel_map
    assert scoring["choice"]["evidence"]["image_auroc"] == pytest.approx(choice.image_evidence)
    assert scoring["mask_pattern"] == "grid" and scoring["overridden_by_flags"] == []
    other = "mse-absz" if choice.image.image_map != "mse-absz" else "mse"
    code, stdout, err = _cli(main_infer, ["--checkpoint", ckpt, "--data_path", synthetic_category, "--output_dir",
                                          tmp_path / "b", "--image_map", other, *INFER_STORED_DEFAULTS], capsys)
    assert code == 0, err
    scoring = json.loads((tmp_path / "b" / "metrics.json").read_text())["scoring"]
    assert scoring["image_map"] == other and scoring["overridden_by_flags"] == ["image_map"]
    assert "overridden by flags: image_map" in stdout


@pytest.mark.slow
def test_checkpoints_made_before_the_choice_score_exactly_as_before(synthetic_category, tmp_path, capsys,
                                                                     one_thread):
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    ckpt = _checkpoint(tmp_path / "old.pth", names, synthetic_category)  # no scoring_version: made before
    code, stdout, err = _cli(main_infer, ["--checkpoint", ckpt, "--data_path", synthetic_category,
                                          "--output_dir", tmp_path / "a", *INFER], capsys)
    assert code == 0, err
    assert "predates the per-category recipe choice" in stdout
    explicit = ["--mask_pattern", "stripes", "--image_map", "fusion-absz", "--pixel_map", "mse", "--image_sigma", "2"]
    code, _, err = _cli(main_infer, ["--checkpoint", ckpt, "--data_path", synthetic_category,
                                     "--output_dir", tmp_path / "b", *INFER, *explicit], capsys)
    assert code == 0, err
    assert [r["score"] for r in _rows(tmp_path / "a" / "scores.csv")] == \
        [r["score"] for r in _rows(tmp_path / "b" / "scores.csv")]


@pytest.mark.slow
def test_a_choice_from_before_graded_evidence_scores_exactly_as_before(synthetic_category, tmp_path, capsys,
                                                                        one_thread):
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    ckpt = _checkpoint(tmp_path / "c.pth", names, synthetic_category)
    checkpoint = torch.load(ckpt, weights_only=True)
    model, _, _ = main_infer.build_model(str(ckpt))
    options = ScoringOptions(image_map="mse-absz", image_sigma=2.0)
    maps = holdout_error_maps(model, synthetic_category, names, options, torch.device("cpu"), None)
    old_choice = {"image_map": "mse-absz", "image_sigma": 2.0, "score": "max", "topk_fraction": 0.01,
                  "pixel_map": "mse", "evidence": {"image_auroc": {"mse max s4": 0.9, "mse-absz max s2": 1.0},
                                                   "pixel_auroc_aupro_mean": {"mse": 0.8}, "map_consistency": 0.9,
                                                   "per_pixel_eligible": True, "pixel_margin": 0.15,
                                                   "n_normal": 4, "n_defective": 12}}
    calibration = {**make_calibration(maps, names, SIZE, options), "version": 3, "choice": old_choice}
    code, stdout, err = _store_and_score(checkpoint, calibration, ckpt, synthetic_category, tmp_path / "a", capsys)
    assert code == 0, err
    assert "before graded strengths" in stdout and "calibration: stored in the checkpoint" in stdout
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["scoring"]["choice"] == old_choice
    explicit = ["--mask_pattern", "grid", "--image_map", "mse-absz", "--image_sigma", "2", "--pixel_map", "mse"]
    code, _, err = _cli(main_infer, ["--checkpoint", ckpt, "--data_path", synthetic_category,
                                     "--output_dir", tmp_path / "b", *INFER_STORED_DEFAULTS, *explicit], capsys)
    assert code == 0, err
    assert [r["score"] for r in _rows(tmp_path / "a" / "scores.csv")] == \
        [r["score"] for r in _rows(tmp_path / "b" / "scores.csv")]
