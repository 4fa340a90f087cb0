"""Small shared helpers: atomic saves, device and mixed-precision choice, the CPU's bf16 features."""
import functools
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from util.cli import UserError


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`.

    A process killed mid-write leaves the previous file intact (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> the first CUDA GPU when there is one, else the CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


class CpuFeatures(NamedTuple):
    """What the CPU offers bf16 work, as PyTorch detects it."""

    avx512_bf16: bool  # AVX-512 BF16 instructions (bf16 dot products in the vector units)
    amx: bool  # AMX tiles: bf16 matrix units
    onednn_bf16: bool  # oneDNN has bf16 kernels here (util.cpu_kernels.linear_gelu runs on them)

    @property
    def bf16(self) -> bool:
        """bf16 runs natively; without it PyTorch emulates bf16 maths, slower than fp32."""
        return self.avx512_bf16 or self.amx

    @property
    def kind(self) -> str:
        """The CPU kind the speed tables are measured per (docs/SPEED.md): amx, avx512_bf16 or no_bf16."""
        return "amx" if self.amx else "avx512_bf16" if self.avx512_bf16 else "no_bf16"


@functools.cache
def cpu_features() -> CpuFeatures:
    """This CPU's bf16 features: the one place they are detected. Every branch on the CPU kind (the
    autocast dtype and with it the frozen weights' storage, the CPU kernels, the benchmark's peaks)
    calls this at run time through the module, so a test that replaces it fakes the machine."""
    try:
        onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        onednn = False
    return CpuFeatures(avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
                       amx=bool(torch.cpu._is_amx_tile_supported()), onednn_bf16=onednn)


def bf16_supported(device: torch.device) -> bool:
    """bf16 runs fast here: a CUDA GPU with bf16 support, or a CPU with AVX-512 BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_features().bf16
    return False


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` (None = full fp32). 'auto' picks bf16 where it is fast."""
    if amp not in AMP_CHOICES:
        raise UserError(f"--amp {amp}: choose one of {', '.join(AMP_CHOICES)}")
    if amp == "auto":
        return torch.bfloat16 if bf16_supported(device) else None
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for the device type, or a no-op context when dtype is None."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)
