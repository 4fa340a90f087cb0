"""The CPU kinds the project runs on, faked through util.misc.cpu_features (the one place the CPU's
bf16 features are detected), and the invariants of the benchmark's peak shares that hold on each."""
import pytest
import torch.nn.functional as F

import models_mae
from util import misc
from util.misc import CpuFeatures

CPU_KINDS = {
    "no_bf16": CpuFeatures(avx512_bf16=False, amx=False, onednn_bf16=False),  # e.g. AVX2 only: fp32
    "avx512_bf16": CpuFeatures(avx512_bf16=True, amx=False, onednn_bf16=True),  # e.g. AMD EPYC (Zen 4)
    "amx": CpuFeatures(avx512_bf16=True, amx=True, onednn_bf16=True),  # Intel Xeon, Sapphire Rapids and later
}
BF16_KINDS = {name for name, features in CPU_KINDS.items() if features.bf16}  # autocast 'auto' picks bf16


def fake_cpu(monkeypatch: pytest.MonkeyPatch, kind: str) -> CpuFeatures:
    """Make every branch on the CPU kind see `kind`. A kernel the real CPU lacks (oneDNN's bf16 matmul,
    util.cpu_kernels.linear_gelu, on an AVX2-only CPU) is replaced by its eager maths: the choice of
    kernel is what the fake tests, not the kernel's numbers (tests/test_cpu_kernels.py checks those
    where the CPU has it)."""
    features = CPU_KINDS[kind]
    real = misc.cpu_features()
    monkeypatch.setattr(misc, "cpu_features", lambda: features)
    if features.onednn_bf16 and not real.onednn_bf16:
        monkeypatch.setattr(models_mae, "linear_gelu",
                            lambda x, w, b: F.gelu(F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype))))
    return features


def check_peak_shares(numbers: dict, bf16_native: bool, paths: tuple[str, ...] = ("naive", "fast")) -> None:
    """One phase's shares of the matmul peaks, as scripts/benchmark.py writes them.

    Each path's share of the peak of the dtype it computes in is in (0, 1]: the naive path runs fp32,
    the fast path bf16 where the CPU has bf16 instructions and fp32 elsewhere (where the fp32 peak
    stands for the bf16 one, so both shares are the same number). A share of a peak the work does not
    run in only has to be positive: a bf16 fast path can exceed the fp32 peak (1.16 on an AVX-512 BF16
    CPU), and a bf16 peak a CPU reaches poorly could be below its fp32 one."""
    for name in paths:
        bf16, fp32 = numbers[f"{name}_frac_bf16_peak"], numbers[f"{name}_frac_fp32_peak"]
        own = bf16 if name == "fast" else fp32
        assert 0 < own <= 1, (name, own)
        assert bf16 > 0 and fp32 > 0, (name, bf16, fp32)
        if not bf16_native:
            assert bf16 == pytest.approx(fp32), (name, bf16, fp32)
