"""scripts/make_synthetic_mvtec.py: determinism, layout, counts, masks on the object."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from scripts.make_synthetic_mvtec import (DEFECTS, MARKER, _rng, get_args_parser, main,
                                          make_category, render_from, render_image)
from util.cli import UserError


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*.png"))}


def _load(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p))


@pytest.mark.parametrize("kind", sorted(DEFECTS))
def test_deterministic_for_a_seed(tmp_path, kind):
    kw = dict(size=48, n_train=2, n_test_good=1, n_per_defect=1, kind=kind)
    make_category(tmp_path / "a", seed=3, **kw)
    make_category(tmp_path / "b", seed=3, **kw)
    make_category(tmp_path / "c", seed=4, **kw)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if "/good/" in k)
    # one image's random stream does not depend on the other counts
    make_category(tmp_path / "d", seed=3, **{**kw, "n_train": 3})
    assert _files(tmp_path / "d")["test/good/000.png"] == a["test/good/000.png"]


def test_capsule_layout_counts_and_masks(synthetic_category):
    root = synthetic_category
    assert (root / MARKER).is_file()
    assert len(list((root / "train/good").glob("*.png"))) == 8
    assert len(list((root / "test/good").glob("*.png"))) == 4
    img = _load(root / "train/good/000.png")
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # the object: pixels of a good image that differ from the background colour (corner median)
    good = _load(root / "test/good/000.png").astype(float)
    bg = np.median(good[:6, :6].reshape(-1, 3), axis=0)
    obj = np.abs(good - bg).max(axis=2) > 25
    obj = ndimage.binary_dilation(ndimage.binary_fill_holes(obj), iterations=3)
    for defect in DEFECTS["capsule"]:
        for i in range(2):
            im = _load(root / f"test/{defect}/{i:03d}.png")
            m = _load(root / f"ground_truth/{defect}/{i:03d}_mask.png")
            assert m.shape == (64, 64) and set(np.unique(m)) == {0, 255}, defect
            mask = m > 0
            frac = mask.mean()
            assert 0.001 < frac < 0.06, (defect, frac)
            assert (mask & obj).sum() >= 0.95 * mask.sum(), defect  # lies on the object
            if defect != "squeeze":  # a squeeze turns part of the capsule into background
                differs = np.abs(im[mask].astype(float) - bg).max(axis=1) > 8
                assert differs.mean() > 0.8, defect


def test_texture_kind(tmp_path):
    counts = make_category(tmp_path / "t", size=64, n_train=3, n_test_good=2, n_per_defect=2,
                           kind="texture", seed=1)
    assert counts["train/good"] == 3 and counts["test/good"] == 2
    for defect in DEFECTS["texture"]:
        assert counts[f"test/{defect}"] == counts[f"ground_truth/{defect}"] == 2
        for i in range(2):
            m = _load(tmp_path / f"t/ground_truth/{defect}/{i:03d}_mask.png") > 0
            assert 0.001 < m.mean() < 0.06, (defect, m.mean())
    good = _load(tmp_path / "t/train/good/000.png").astype(float)
    assert good.std() > 5  # a texture, not a flat colour


@pytest.mark.parametrize("kind", sorted(DEFECTS))
def test_normal_images_vary_and_defects_change_only_their_mask(kind):
    size = 96
    goods = [render_image(kind, size, 0, 0, None, i)[0].astype(float) for i in range(3)]
    for a, b in ((0, 1), (1, 2)):  # part-to-part variation: no two normal images alike
        assert np.abs(goods[a] - goods[b]).mean() > 1.0, kind
    for code, defect in enumerate(DEFECTS[kind], start=1):
        for i in range(2):
            img, mask = render_image(kind, size, 0, 1, defect, i)
            assert mask.shape == (size, size) and mask.dtype == bool, defect
            assert 0 < mask.sum() < 0.1 * mask.size, (defect, mask.mean())
            # the same random stream without its defect: the normal board it was drawn on
            clean, none = render_from(kind, size, _rng(0, kind, 1, code, i), None)
            assert none is None
            changed = np.abs(img.astype(float) - clean.astype(float)).max(axis=2) > 8
            assert changed.any(), defect
            near = ndimage.binary_dilation(mask, iterations=1)
            assert not (changed & ~near).any(), defect
            assert changed[mask].mean() > 0.2, defect  # the mask is where the defect shows


def test_counts_rerun_and_refusal(tmp_path):
    dst = tmp_path / "cat"
    counts = make_category(dst, size=40, n_train=2, n_test_good=1, n_per_defect=1)
    assert counts == {"train/good": 2, "test/good": 1,
                      **{k: 1 for d in DEFECTS["capsule"]
                         for k in (f"test/{d}", f"ground_truth/{d}")}}
    on_disk = {f"{p.parent.parent.name}/{p.parent.name}": 0 for p in dst.rglob("*.png")}
    for p in dst.rglob("*.png"):
        on_disk[f"{p.parent.parent.name}/{p.parent.name}"] += 1
    assert on_disk == counts
    make_category(dst, size=40, n_train=1, n_test_good=1, n_per_defect=1)  # its own output: replaced
    assert len(list((dst / "train/good").glob("*.png"))) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("user data")
    with pytest.raises(UserError, match="not empty"):
        make_category(other, size=40, n_train=1, n_test_good=0, n_per_defect=0)
    with pytest.raises(UserError, match="kind"):
        make_category(tmp_path / "k", kind="wood")


def test_help_mentions_everything():
    text = get_args_parser().format_help()
    for word in ("--dst", "--seed", "--size", "--n_train", "--n_test_good", "--n_per_defect",
                 "--category", "--kind", "crack", "faulty_imprint", "texture", "hole", "pcb",
                 "solder_bridge", "broken_trace"):
        assert word in text


def test_cli_writes_a_pcb_category(tmp_path, capsys):
    args = get_args_parser().parse_args(["--dst", str(tmp_path), "--kind", "pcb", "--size", "48",
                                         "--n_train", "2", "--n_test_good", "1", "--n_per_defect", "1"])
    main(args)
    root = tmp_path / "pcb_synth"
    assert "pcb" in capsys.readouterr().out
    assert len(list((root / "train/good").glob("*.png"))) == 2
    for defect in DEFECTS["pcb"]:
        img = _load(root / f"test/{defect}/000.png")
        m = _load(root / f"ground_truth/{defect}/000_mask.png")
        assert img.shape == (48, 48, 3) and m.shape == (48, 48) and m.max() == 255, defect
