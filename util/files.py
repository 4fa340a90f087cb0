"""Output files without torch: atomic writes and the output name of an image."""
import os
from pathlib import Path
from typing import BinaryIO, Callable

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


def prepare_output_dir(output_dir: str) -> Path:
    """Create --output_dir (and its parents); a one-line error when it exists and is not a folder."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out
