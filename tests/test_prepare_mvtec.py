"""scripts/prepare_mvtec.py: output layout, counts, warnings, refusals; SRC is never modified."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.prepare_mvtec import prepare
from util.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_mvtec.py"


def _png(path: Path, value: int = 128, mode: str = "RGB", ext: str = ".png") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (16, 12)
    img = Image.new(mode, size, value if mode == "L" else (value, value // 2, 255 - value))
    img.save(path.with_suffix(ext), format="PNG")


def _mask(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((12, 16), np.uint8)
    m[3:6, 4:9] = 255
    Image.fromarray(m).save(path)


@pytest.fixture
def mvtec(tmp_path) -> Path:
    """A fake MVTec AD root: two RGB categories with masks, one grayscale category, an uppercase
    .PNG, a stray text file, a missing mask, and a non-category file at the root."""
    src = tmp_path / "mvtec"
    b = src / "bottle"
    _png(b / "train/good/000.png", 10)
    _png(b / "train/good/001.png", 20)
    _png(b / "test/good/000.png", 30)
    for i in range(2):
        _png(b / f"test/broken_large/00{i}.png", 40 + i)
        _mask(b / f"ground_truth/broken_large/00{i}_mask.png")
    c = src / "capsule"
    _png(c / "train/good/000.PNG", 50, ext=".PNG")
    _png(c / "train/good/001.png", 60)
    (c / "train/good/notes.txt").write_text("not an image")
    _png(c / "test/good/000.png", 70)
    _png(c / "test/faulty_imprint/000.png", 80)
    _png(c / "test/faulty_imprint/001.png", 90)  # no mask for this one
    _mask(c / "ground_truth/faulty_imprint/000_mask.png")
    g = src / "grid"
    _png(g / "train/good/000.png", 100, mode="L")
    _png(g / "test/good/000.png", 110, mode="L")
    _png(g / "test/bent/000.png", 120, mode="L")
    _mask(g / "ground_truth/bent/000_mask.png")
    (src / "readme.txt").write_text("MVTec AD")
    return src


def _tree(root: Path) -> dict:
    """relative path -> sha256 of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_root_layout_counts_and_warnings(mvtec, tmp_path, capsys):
    before = _tree(mvtec)
    dst = tmp_path / "out"
    plans = prepare(mvtec, dst)
    assert _tree(mvtec) == before  # SRC untouched
    out = set(_tree(dst))
    assert out == {
        "bottle/train/good/000.png", "bottle/train/good/001.png", "bottle/test/good/000.png",
        "bottle/test/bad/broken_large_000.png", "bottle/test/bad/broken_large_001.png",
        "bottle/ground_truth/bad/broken_large_000_mask.png",
        "bottle/ground_truth/bad/broken_large_001_mask.png",
        "capsule/train/good/000.PNG", "capsule/train/good/001.png", "capsule/test/good/000.png",
        "capsule/test/bad/faulty_imprint_000.png", "capsule/test/bad/faulty_imprint_001.png",
        "capsule/ground_truth/bad/faulty_imprint_000_mask.png",
        "grid/train/good/000.png", "grid/test/good/000.png", "grid/test/bad/bent_000.png",
        "grid/ground_truth/bad/bent_000_mask.png",
    }
    counts = {p.name: (p.train, p.test_good, p.test_bad, p.masks, p.warnings) for p in plans}
    assert counts == {"bottle": (2, 1, 2, 2, 0), "capsule": (2, 1, 2, 1, 2), "grid": (1, 1, 1, 1, 0)}
    # copies are byte-identical
    assert (dst / "bottle/test/bad/broken_large_001.png").read_bytes() == \
        (mvtec / "bottle/test/broken_large/001.png").read_bytes()
    err = capsys.readouterr()
    assert "faulty_imprint/001.png" in err.err and "without a mask" in err.err
    assert "notes.txt" in err.err
    assert "category" in err.out and "test bad" in err.out  # the summary table


def test_single_category_and_link(mvtec, tmp_path):
    before = _tree(mvtec)
    dst = tmp_path / "bottle_out"
    prepare(mvtec / "bottle", dst, link=True, log=lambda m: None)
    assert _tree(mvtec) == before
    a = dst / "test/bad/broken_large_000.png"
    b = mvtec / "bottle/test/broken_large/000.png"
    assert a.stat().st_ino == b.stat().st_ino  # hard link
    assert (dst / "train/good/001.png").is_file()
    # --overwrite on a linked output must not write through the links into SRC
    prepare(mvtec / "bottle", dst, overwrite=True, log=lambda m: None)
    assert (dst / "test/bad/broken_large_000.png").stat().st_ino != b.stat().st_ino
    assert _tree(mvtec) == before


def test_dry_run_writes_nothing(mvtec, tmp_path, capsys):
    dst = tmp_path / "dry"
    prepare(mvtec, dst, dry_run=True)
    assert not dst.exists()
    out = capsys.readouterr().out
    assert "would copy" in out and "test/bad/broken_large_*" in out


def test_refusals(mvtec, tmp_path):
    with pytest.raises(UserError, match="inside --src"):
        prepare(mvtec, mvtec / "prepared", log=lambda m: None)
    with pytest.raises(UserError, match="inside --src"):
        prepare(mvtec / "bottle", mvtec / "bottle", log=lambda m: None)
    with pytest.raises(UserError, match="available in --src: bottle, capsule, grid"):
        prepare(mvtec, tmp_path / "o", categories="bottle,nope", log=lambda m: None)
    with pytest.raises(UserError, match="--strict"):
        prepare(mvtec, tmp_path / "strict", strict=True, log=lambda m: None)
    assert not (tmp_path / "strict").exists()


def test_categories_subset(mvtec, tmp_path):
    plans = prepare(mvtec, tmp_path / "o", categories="grid, bottle", log=lambda m: None)
    assert [p.name for p in plans] == ["grid", "bottle"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["bottle", "grid"]


def test_unreadable_and_orphan(mvtec, tmp_path, capsys):
    (mvtec / "bottle/test/broken_large/002.png").write_bytes(b"")  # zero bytes
    _mask(mvtec / "bottle/ground_truth/broken_large/007_mask.png")  # no image
    plans = prepare(mvtec, tmp_path / "o", categories="bottle", log=lambda m: None)
    err = capsys.readouterr().err
    assert "unreadable" in err and "002.png" in err
    assert "without an image" in err and "007_mask.png" in err
    assert plans[0].test_bad == 2 and plans[0].masks == 2
    assert not (tmp_path / "o/bottle/test/bad/broken_large_002.png").exists()


def _cli(capsys, *args) -> tuple:
    """Run the script's main in-process through util.cli.run_cli -> (exit code, stdout, stderr)."""
    from scripts.prepare_mvtec import get_args_parser, main
    from util.cli import run_cli

    a = get_args_parser().parse_args([str(x) for x in args])
    code = run_cli(main, a, a.debug)
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_overwrite_idempotent(mvtec, tmp_path, capsys):
    before = _tree(mvtec)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user file")
    line = _one_error_line(*_cli(capsys, "--src", mvtec, "--dst", dst)[::2])
    assert "--overwrite" in line
    code, out, err = _cli(capsys, "--src", mvtec, "--dst", dst, "--overwrite")
    assert code == 0, err
    first = _tree(dst)
    assert _cli(capsys, "--src", mvtec, "--dst", dst, "--overwrite")[0] == 0
    assert _tree(dst) == first  # same tree twice
    assert (dst / "keep.txt").read_text() == "user file"  # only category outputs are replaced
    assert "capsule" in out and "warnings" in out
    assert _tree(mvtec) == before


def test_cli_malformed_sources(tmp_path, mvtec, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/a.txt").write_text("x")
    line = _one_error_line(*_cli(capsys, "--src", tmp_path / "junk", "--dst", tmp_path / "o")[::2])
    assert "neither" in line
    empty = tmp_path / "empty_cat"
    (empty / "train/good").mkdir(parents=True)
    (empty / "test/good").mkdir(parents=True)
    line = _one_error_line(*_cli(capsys, "--src", empty, "--dst", tmp_path / "o")[::2])
    assert "no readable images" in line
    line = _one_error_line(*_cli(capsys, "--src", mvtec, "--dst", tmp_path / "o", "--categories",
                                 "zipper")[::2])
    assert "zipper" in line and "bottle, capsule, grid" in line
    line = _one_error_line(*_cli(capsys, "--src", mvtec, "--dst", mvtec / "bottle" / "x")[::2])
    assert "inside --src" in line
    assert not (tmp_path / "o").exists()


def test_script_subprocess(tmp_path):
    """The real entry point (one run: importing torch costs seconds): a malformed source gives
    one line on stderr, exit code 2 and no traceback."""
    proc = _run("--src", tmp_path / "missing", "--dst", tmp_path / "o")
    assert "does not exist" in _assert_one_line_error(proc)
    assert not (tmp_path / "o").exists()
