"""The per-category recipe choice: synthetic defects with exact masks, a choice that follows the
evidence, prefers the original recipe on a tie, reads no test label, is stored in the checkpoint and
can be overridden; checkpoints made before it score exactly as before."""
import json
import shutil

import numpy as np
import pytest
import torch

import main_infer
from models_mae import create_model
from scoring import LEGACY_OPTIONS, ScoringOptions, checkpoint_defaults, holdout_choice
from util.defects import EVIDENCE_KINDS as DEFECT_KINDS, synthetic_defects
from util.recipe_choice import PIXEL_MARGIN, TOLERANCE, ImageRecipe, choose_recipes

from test_scoring_cli import INFER, SIZE, _checkpoint, _cli, _rows


def _normals(n=6, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)


def test_synthetic_defects_are_deterministic_with_masks_exactly_where_pixels_changed():
    normals = _normals()
    a, b = synthetic_defects(normals, seed=3), synthetic_defects(normals, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and a.kinds == b.kinds
    assert not torch.equal(a.images, synthetic_defects(normals, seed=4).images)
    assert set(a.kinds) == set(DEFECT_KINDS) and a.images.dtype == torch.uint8
    for img, mask, src in zip(a.images, a.masks, a.source):
        changed = (img != normals[src]).any(dim=0)
        assert torch.equal(changed, mask) and mask.any()
    with pytest.raises(ValueError, match="at least 2"):
        synthetic_defects(normals[:1])


def _maps(n, s, rng, fixed):
    """{mse, msgms} maps [n, s, s]: noise, plus (aligned) a bright fixed pattern every image shares."""
    base = rng.random((n, s, s)) * 0.2
    if fixed:
        base[:, 4:8, 4:8] += 3.0  # a part of the object that always reconstructs badly
    m = torch.from_numpy(base).float()
    return {"mse": m, "msgms": m.clone()}


def _with_bumps(maps, source, rng, s):
    out = {e: m[source].clone() for e, m in maps.items()}
    masks = torch.zeros((len(source), s, s), dtype=torch.bool)
    for i in range(len(source)):
        y, x = rng.integers(12, s - 6, size=2)
        for m in out.values():
            m[i, y:y + 4, x:x + 4] += 1.0  # a defect: weaker than the fixed pattern, far above the noise
        masks[i, y:y + 4, x:x + 4] = True
    return out, masks


@pytest.mark.parametrize("aligned", [True, False])
def test_the_choice_follows_the_evidence_and_prefers_raw_on_a_tie(aligned):
    rng, s, n = np.random.default_rng(0), 32, 10
    normal = _maps(n, s, rng, fixed=aligned)
    source = torch.arange(n).repeat(2)
    defective, masks = _with_bumps(normal, source, rng, s)
    choice = choose_recipes(normal, defective, source, masks, pixel_sigma=0.0)
    again = choose_recipes(normal, defective, source, masks, pixel_sigma=0.0)
    assert choice == again  # deterministic
    assert choice.per_pixel_eligible == aligned  # a fixed pattern makes the maps consistent
    if aligned:
        # the raw maximum is the fixed bright part in every image; standardising removes it
        assert choice.map_consistency > 0.9 and choice.image_evidence["mse max s4"] < 0.75
        assert choice.image.image_map.endswith("absz") and choice.image_evidence[choice.image.name] > 0.95
        # a calibrated pixel map leads, but by less than PIXEL_MARGIN: the pixel map stays raw
        assert 0 < choice.pixel_evidence["mse-absz"] - choice.pixel_evidence["mse"] < PIXEL_MARGIN
        assert choice.pixel_map == "mse"
    else:
        # nothing fixed to remove: per-pixel statistics are not eligible, the original recipe wins the tie
        assert choice.map_consistency < 0.2 and choice.image == ImageRecipe("mse", 4.0) and choice.pixel_map == "mse"
        assert "mse-absz" in choice.pixel_evidence  # still measured and reported
    best = max(choice.image_evidence.values())
    assert choice.image_evidence[choice.image.name] >= best - TOLERANCE


def test_a_calibrated_pixel_map_is_chosen_only_with_a_clear_lead():
    rng, s, n = np.random.default_rng(0), 32, 10
    normal = _maps(n, s, rng, fixed=True)
    for m in normal.values():
        m[:, :10] += 3.0  # a large fixed bright band: the raw map's false alarms cover a third of the image
    source = torch.arange(n).repeat(2)
    defective, masks = _with_bumps(normal, source, rng, s)
    choice = choose_recipes(normal, defective, source, masks, pixel_sigma=0.0)
    assert choice.pixel_evidence[choice.pixel_map] - choice.pixel_evidence["mse"] >= PIXEL_MARGIN
    assert choice.pixel_map.endswith("absz") and choice.to_dict()["evidence"]["pixel_margin"] == PIXEL_MARGIN


def test_checkpoint_defaults_use_the_stored_choice_and_old_checkpoints_the_old_defaults():
    stored = {"choice": {"image_map": "mse"}, "defaults": {**ScoringOptions().to_dict(), "image_map": "mse-absz"}}
    options, source = checkpoint_defaults(stored, {"scoring_version": 3})
    assert options.image_map == "mse-absz" and "chosen" in source
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
    assert choice_a.n_normal == 4 and choice_a.n_defective == 4 * len(DEFECT_KINDS)


@pytest.mark.slow
def test_a_stored_choice_is_used_recorded_and_overridden_by_flags(synthetic_category, tmp_path, capsys, one_thread):
    names = sorted(p.name for p in (synthetic_category / "train" / "good").iterdir())[:4]
    ckpt = _checkpoint(tmp_path / "c.pth", names, synthetic_category)
    checkpoint = torch.load(ckpt, weights_only=True)
    model, _, _ = main_infer.build_model(str(ckpt))
    from scoring import make_calibration

    maps, choice = holdout_choice(model, synthetic_category, names, ScoringOptions(), torch.device("cpu"), None)
    checkpoint["calibration"] = make_calibration(maps, names, SIZE, ScoringOptions(), choice)
    checkpoint["args"]["scoring_version"] = 3
    torch.save(checkpoint, ckpt)
    infer = [a for a in INFER if a not in ("--sigma", "2")]
    code, stdout, err = _cli(main_infer, ["--checkpoint", ckpt, "--data_path", synthetic_category,
                                          "--output_dir", tmp_path / "a", *infer], capsys)
    assert code == 0, err
    assert "chosen for this category" in stdout and "calibration: stored in the checkpoint" in stdout
    scoring = json.loads((tmp_path / "a" / "metrics.json").read_text())["scoring"]
    assert scoring["image_map"] == choice.image.image_map and scoring["pixel_map"] == choice.pixel_map
    assert scoring["choice"]["evidence"]["image_auroc"] == pytest.approx(choice.image_evidence)
    assert scoring["mask_pattern"] == "grid" and scoring["overridden_by_flags"] == []
    other = "mse-absz" if choice.image.image_map != "mse-absz" else "mse"
    code, stdout, err = _cli(main_infer, ["--checkpoint", ckpt, "--data_path", synthetic_category, "--output_dir",
                                          tmp_path / "b", "--image_map", other, *infer], capsys)
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
