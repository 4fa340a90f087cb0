"""scripts/make_photo_mvtec.py: determinism, layout, exact masks, alignment, disjoint crops, refusals."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage", reason="scikit-image ships the photographs")

from scripts.make_photo_mvtec import (ALL_CATEGORIES, DISJOINT_PARTS, HOLDOUT,  # noqa: E402
                                      HOLDOUT_SUFFIX, MARKER, PHOTOS, TEST, TRAIN, _rng, _source,
                                      check_categories, crop_box, data_dir, defects_of,
                                      get_args_parser, main, make_category, make_holdout,
                                      render_from, render_image)
from util.cli import UserError, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_photo_mvtec.py"
SMALL = dict(size=64, n_train=2, n_test_good=1, n_per_defect=1)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _load(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p))


def test_photos_come_from_the_installed_package():
    import skimage

    assert data_dir() == Path(skimage.__file__).parent / "data"
    for name, ph in PHOTOS.items():
        assert (data_dir() / ph.file).is_file(), name
    assert not {"brick", "coins"} & set(PHOTOS)
    assert not {"brick.png", "coins.png"} & {ph.file for ph in PHOTOS.values()}


def test_kinds():
    kinds = {n: p.kind for n, p in PHOTOS.items()}
    assert sum(k == "texture" for k in kinds.values()) >= 2
    assert sum(k == "object" for k in kinds.values()) >= 2
    for name, kind in kinds.items():
        assert ("missing" in defects_of(name)) == (kind == "object")


@pytest.mark.parametrize("name", ["gravel", "coffee"])
def test_deterministic_for_a_seed(tmp_path, name):
    make_category(tmp_path / "a", name, seed=3, **SMALL)
    make_category(tmp_path / "b", name, seed=3, **SMALL)
    make_category(tmp_path / "c", name, seed=4, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if "ground_truth" not in k)
    # one image's random stream does not depend on the other counts
    make_category(tmp_path / "d", name, seed=3, **{**SMALL, "n_train": 3})
    assert _files(tmp_path / "d")["test/good/000.png"] == a["test/good/000.png"]


def test_cli_layout_counts_and_marker(tmp_path, capsys):
    args = get_args_parser().parse_args(
        ["--dst", str(tmp_path), "--categories", "grass,page", "--size", "48", "--n_train", "3",
         "--n_test_good", "2", "--n_per_defect", "2", "--seed", "5"])
    main(args)
    out = capsys.readouterr().out
    assert "grass" in out and "page" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grass", "page"]
    for name in ("grass", "page"):
        root = tmp_path / name
        meta = json.loads((root / MARKER).read_text())
        assert meta["kind"] == PHOTOS[name].kind and meta["source"] == PHOTOS[name].file
        assert meta["seed"] == 5
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(("good",) + defects_of(name))
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(defects_of(name))
        assert len(list((root / "train/good").glob("*.png"))) == 3
        assert len(list((root / "test/good").glob("*.png"))) == 2
        for defect in defects_of(name):
            imgs = sorted((root / "test" / defect).glob("*.png"))
            masks = sorted((root / "ground_truth" / defect).glob("*.png"))
            assert [p.stem + "_mask" for p in imgs] == [p.stem for p in masks] and len(imgs) == 2
            for m in masks:
                m = _load(m)
                assert m.shape == (48, 48) and set(np.unique(m)) == {0, 255}, defect
        assert _load(root / "train/good/000.png").shape[:2] == (48, 48)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_masks_are_exactly_where_the_defect_changed_the_image(name):
    size = 112
    for code, defect in enumerate(defects_of(name), start=1):
        for i in range(2):
            img, mask = render_image(name, size, 0, 1, defect, i)
            assert mask.dtype == bool and mask.shape == (size, size)
            # realistic sizes: small, never empty
            assert 0.0005 < mask.mean() < 0.06, (name, defect, mask.mean())
            # the same random stream without the defect: the normal image it was drawn on
            clean, none = render_from(name, size, TEST, _rng(0, name, 1, code, i), None)
            assert none is None and clean.shape == img.shape
            diff = np.abs(img.astype(int) - clean.astype(int))
            if diff.ndim == 3:
                diff = diff.max(axis=2)
            assert np.array_equal(diff > 0, mask), (name, defect)
            assert diff[mask].min() >= 2, (name, defect)  # above the 2/255 tolerance


def _grey(a: np.ndarray) -> np.ndarray:
    return (a.mean(axis=2) if a.ndim == 3 else a).astype(float)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_objects_are_aligned_and_textures_vary(name):
    imgs = [_grey(render_image(name, 96, 0, 0, None, i)[0]) for i in range(6)]
    mean = np.mean(imgs, axis=0)
    corr = [_corr(im, mean) for im in imgs]
    pair = [_corr(imgs[i], imgs[i + 1]) for i in range(5)]
    for a, b in zip(imgs, imgs[1:]):  # no two normal images alike
        assert np.abs(a - b).mean() > 1.0, name
    if PHOTOS[name].kind == "object":
        # the same framing: only a shift of a pixel, a turn below 1 degree, light and noise
        assert min(corr) > 0.85, (name, corr)
        assert min(pair) > 0.75, (name, pair)
    else:
        assert max(pair) < 0.3, (name, pair)
        assert max(corr) < 0.7, (name, corr)
        assert min(im.std() for im in imgs) > 10  # a texture, not a flat area


DISJOINT = sorted(n for n, p in PHOTOS.items() if p.disjoint)


def _boxes(name, split, defect, n):
    return np.array([crop_box(name, 64, 0, split, defect, i) for i in range(n)])  # [n, 4] y0 x0 y1 x1


@pytest.mark.parametrize("name", DISJOINT)
def test_disjoint_parts_crops_do_not_overlap(name):
    h, w = _source(name, 64).shape[:2]
    parts = {TRAIN: [_boxes(name, TRAIN, None, 60)], HOLDOUT: [_boxes(name, HOLDOUT, None, 30)],
             TEST: [_boxes(name, TEST, None, 30)] + [_boxes(name, TEST, d, 10) for d in defects_of(name)]}
    boxes = {split: np.concatenate(b) for split, b in parts.items()}
    for split, b in boxes.items():
        y0, x0, y1, x1 = DISJOINT_PARTS[split]
        assert (b[:, 0] >= y0 * h).all() and (b[:, 1] >= x0 * w).all(), split
        assert (b[:, 2] <= y1 * h).all() and (b[:, 3] <= x1 * w).all(), split
        assert np.allclose(b[:, 2] - b[:, 0], PHOTOS[name].side) and np.allclose(b[:, 3] - b[:, 1], PHOTOS[name].side)
        assert b[:, 0].std() > 10 and b[:, 1].std() > 10, split  # crops at many places of their part
    for a, b in ((TRAIN, TEST), (TRAIN, HOLDOUT), (TEST, HOLDOUT)):
        p, q = boxes[a][:, None], boxes[b][None]  # every pair
        overlap = (np.minimum(p[..., 2], q[..., 2]) > np.maximum(p[..., 0], q[..., 0])) & \
                  (np.minimum(p[..., 3], q[..., 3]) > np.maximum(p[..., 1], q[..., 1]))
        assert not overlap.any(), (a, b)


@pytest.mark.parametrize("split", [TRAIN, TEST, HOLDOUT])
def test_a_disjoint_image_shows_its_crop_box(split):
    name, side = "gravel_disjoint", PHOTOS["gravel_disjoint"].side
    photo = _source(name, side)[..., 0]  # at the crop's own scale: no resampling blur
    for i in range(2):
        img = render_image(name, side, 0, split, None, i)[0].astype(float)
        y0, x0, _, _ = (int(round(v)) for v in crop_box(name, side, 0, split, None, i))
        crop = photo[y0:y0 + side, x0:x0 + side]
        views = [np.rot90(c, k) for c in (crop, crop[:, ::-1]) for k in range(4)]  # the 8 turns/mirrors
        assert max(_corr(img, v) for v in views) > 0.9, (split, i)


def test_disjoint_categories_write_a_holdout_root_and_stay_out_of_all(tmp_path, capsys):
    assert check_categories("all") == list(ALL_CATEGORIES) and not set(DISJOINT) & set(ALL_CATEGORIES)
    args = get_args_parser().parse_args(
        ["--dst", str(tmp_path), "--categories", "grass_disjoint", "--size", "48", "--n_train", "3",
         "--n_test_good", "2", "--n_per_defect", "1", "--n_holdout", "6"])
    main(args)
    assert "--holdout_root" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grass_disjoint", "grass_disjoint" + HOLDOUT_SUFFIX]
    meta = json.loads((tmp_path / "grass_disjoint" / MARKER).read_text())
    assert meta["kind"] == "texture" and meta["holdout_root"] == "grass_disjoint" + HOLDOUT_SUFFIX
    assert meta["parts"]["test"] == list(DISJOINT_PARTS[TEST])
    holdout = tmp_path / ("grass_disjoint" + HOLDOUT_SUFFIX)
    hmeta = json.loads((holdout / MARKER).read_text())
    assert hmeta["kind"] == "texture" and hmeta["holdout"] and hmeta["holdout_for"] == "grass_disjoint"
    assert sorted(p.name for p in holdout.iterdir()) == [MARKER, "train"]
    files = sorted((holdout / "train/good").glob("*.png"))
    assert len(files) == 6 and _load(files[0]).shape == (48, 48)
    train = {p.read_bytes() for p in (tmp_path / "grass_disjoint/train/good").glob("*.png")}
    assert not train & {p.read_bytes() for p in files}
    with pytest.raises(UserError, match="--overwrite"):
        make_holdout(holdout, "grass_disjoint", size=48, n_holdout=5)
    assert make_holdout(holdout, "grass_disjoint", size=48, n_holdout=5, overwrite=True) == 5
    assert len(list((holdout / "train/good").glob("*.png"))) == 5
    with pytest.raises(UserError, match="no held-out part"):
        make_holdout(tmp_path / "g", "grass", size=48)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@pytest.mark.parametrize("argv, words", [
    (["--categories", "wood"], ["unknown", "grass", "page"]),
    (["--categories", "brick"], ["kept aside"]),
    (["--categories", "grass,coins"], ["kept aside"]),
    (["--n_train", "0"], ["--n_train"]),
    (["--n_per_defect", "-1"], ["--n_per_defect"]),
    (["--size", "400", "--categories", "page"], ["--size", "page"]),
    (["--size", "256", "--categories", "grass_disjoint"], ["--size", "grass_disjoint"]),
    (["--categories", "gravel_disjoint", "--n_holdout", "2"], ["--n_holdout"]),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, argv, words):
    args = get_args_parser().parse_args(["--dst", str(tmp_path / "out"), *argv])
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_non_empty_destination_needs_overwrite(tmp_path):
    dst = tmp_path / "grass"
    dst.mkdir()
    (dst / "x.txt").write_text("user data")
    with pytest.raises(UserError, match="--overwrite"):
        make_category(dst, "grass", **SMALL)
    r = _cli("--dst", str(tmp_path), "--categories", "grass", "--size", "40", "--n_train", "1",
             "--n_test_good", "1", "--n_per_defect", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "file").write_text("x")
    args = get_args_parser().parse_args(["--dst", str(tmp_path / "file")])
    assert run_cli(main, args) == 2
    make_category(dst, "grass", overwrite=True, **SMALL)
    assert (dst / MARKER).is_file() and (dst / "x.txt").is_file()
    assert len(list((dst / "train/good").glob("*.png"))) == 2


def test_missing_package_is_one_line(tmp_path):
    code = ("import sys, importlib.util; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'skimage' else real(n, *a); "
            f"sys.argv = ['x', '--dst', {str(tmp_path)!r}]; sys.path.insert(0, 'scripts'); "
            "import runpy; runpy.run_path('scripts/make_photo_mvtec.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "pip install scikit-image" in r.stderr


def test_nothing_is_downloaded(tmp_path):
    # reading the photos imports neither scikit-image nor its downloader
    code = ("import sys; sys.path.insert(0, '.'); "
            "from scripts.make_photo_mvtec import make_category; "
            f"make_category({str(tmp_path / 'c')!r}, 'coffee', size=40, n_train=1, n_test_good=1, "
            "n_per_defect=1); "
            "assert not any(m == 'pooch' or m.startswith('skimage') for m in sys.modules), "
            "sorted(m for m in sys.modules if 'skimage' in m or 'pooch' in m)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_help_mentions_everything():
    text = get_args_parser().format_help()
    for word in ("--dst", "--categories", "--seed", "--size", "--n_train", "--n_test_good",
                 "--n_per_defect", "--n_holdout", "--overwrite", "brick", "coins", "missing", *PHOTOS,
                 *defects_of("page")):
        assert word in text
