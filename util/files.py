"""Output files without torch: atomic writes, the output name of an image, one run per output folder."""
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from util.cli import UserError


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary file next to `path`, then rename it over `path`.

    An interruption (Ctrl-C, a crash) leaves either the old file or none, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_stem(rel_path: str) -> str:
    """'test/crack/000.png' -> 'test/crack/000': where the image's .npy and .png go."""
    return Path(rel_path).with_suffix("").as_posix()


def _entries(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir()) if out.is_dir() else []


def check_output_dir(output_dir: str, overwrite: bool = False) -> None:
    """Refuse --output_dir when it is a file, or a folder that holds anything and `overwrite` is off:
    one run per folder, so the pictures of an earlier run never sit beside new scores. Writes nothing
    (call it before slow work; prepare_output_dir repeats it)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    present = _entries(out)
    if present and not overwrite:
        raise UserError(f"--output_dir {out} is not empty ({len(present)} entries, e.g. {present[0].name}); "
                        f"pass --overwrite to replace this script's earlier outputs there (other files are kept), "
                        f"or choose another folder")


def prepare_output_dir(output_dir: str, overwrite: bool = False, outputs: Sequence[str] = ()) -> Path:
    """Create --output_dir (and its parents) for one run, after check_output_dir; with `overwrite`, the
    files and folders named in `outputs` (what the calling script writes, relative to the folder) are
    deleted first and anything else in the folder is left alone."""
    check_output_dir(output_dir, overwrite)
    out = Path(output_dir)
    if overwrite:
        remove_outputs(out, outputs)
    out.mkdir(parents=True, exist_ok=True)
    return out


def remove_outputs(out: Path, outputs: Sequence[str]) -> list[Path]:
    """Delete out/<name> for each name in `outputs` (a file, or a folder with all it holds); returns
    what was deleted. Names must stay inside `out`."""
    removed = []
    root = out.resolve()
    for name in outputs:
        path = out / name
        if root not in path.resolve().parents:
            raise ValueError(f"{name!r} is not inside {out}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed
