"""scripts/make_photo_mvtec.py: determinism, layout, exact masks, alignment, refusals."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage", reason="scikit-image ships the photographs")

from scripts.make_photo_mvtec import (MARKER, PHOTOS, _rng, data_dir, defects_of,  # noqa: E402
                                      get_args_parser, main, make_category, render_from,
                                      render_image)
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
            clean, none = render_from(name, size, _rng(0, name, 1, code, i), None)
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
                 "--n_per_defect", "--overwrite", "brick", "coins", "missing", *PHOTOS,
                 *defects_of("page")):
        assert word in text
