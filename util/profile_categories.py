"""Where a profiled step's device time goes: every device kernel (and memcpy/memset) is put in one
category by its name, and the device time is the sum of these kernel events alone.

The operator events of torch.profiler (aten::mm, aten::linear, ...) carry the device time of the
kernels they launched, nested operators again, so adding up operators counts a kernel several
times, and operator names say little about the kernels under them. Kernel events are leaves: each
is counted once. The sum is device busy time; kernels that overlap on several streams add up.

Categories are matched in the order below, first match wins (case-insensitive substrings of the
kernel name): attention before matrix multiplies (flash / cuDNN attention kernels are GEMM-like and
named after sm90/cutlass too), normalisation before reductions (layer norm kernels reduce).
"""
from dataclasses import dataclass
from typing import Iterable

CATEGORY_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("communication", ("nccl",)),  # DDP's all-reduce, before 'reduce' of the reductions
    ("optimizer", ("multi_tensor_apply", "adam", "_foreach_", "sgd")),
    ("attention", ("flash", "fmha", "sdpa", "attention", "softmax")),
    ("normalization", ("layer_norm", "layernorm", "gammabeta", "rms_norm", "rmsnorm", "batch_norm", "group_norm")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "s16816", "s1688", "cublas", "splitkreduce", "wgrad", "dgrad",
                "fprop", "convolve", "conv2d", "triton_tem")),
    ("copy", ("memcpy", "memset", "copy", "cat_array", "catarray", "index_select", "indexselect", "gather",
              "scatter", "index_kernel", "transpose")),
    ("reduction", ("reduce", "norm_kernel", "argmax", "sort", "cub::", "triton_red", "triton_per")),
    ("elementwise", ("elementwise", "fill", "gelu", "where", "pointwise", "triton_poi")),
)
CATEGORIES = tuple(name for name, _ in CATEGORY_PATTERNS) + ("other",)


@dataclass(frozen=True)
class KernelEvent:
    name: str
    duration_us: float


def kernel_category(name: str) -> str:
    """The category of one device kernel name (CATEGORIES; 'other' when nothing matches)."""
    lowered = name.lower()
    for category, patterns in CATEGORY_PATTERNS:
        if any(p in lowered for p in patterns):
            return category
    return "other"


def kernel_events(events: Iterable) -> list[KernelEvent]:
    """The device events of torch.profiler's `prof.events()` (FunctionEvents whose device_type is
    not the CPU: kernels, memcpy, memset), each with its own duration. CPU operator events are
    dropped, whatever device time they carry."""
    from torch.autograd import DeviceType

    return [KernelEvent(e.name, float(e.time_range.elapsed_us())) for e in events
            if e.device_type != DeviceType.CPU]


def device_breakdown(kernels: Iterable[KernelEvent], top: int = 5) -> dict:
    """Device time per category: total_s, <category>_s and <category>_share for every category,
    kernel count, and the `top` most expensive kernels of 'other' (name -> seconds)."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    others: dict[str, float] = {}
    count = 0
    for kernel in kernels:
        category = kernel_category(kernel.name)
        t = kernel.duration_us / 1e6
        seconds[category] += t
        count += 1
        if category == "other":
            others[kernel.name] = others.get(kernel.name, 0.0) + t
    total = sum(seconds.values())
    return {"total_s": total, "kernels": count, **{f"{k}_s": v for k, v in seconds.items()},
            **{f"{k}_share": v / total if total > 0 else 0.0 for k, v in seconds.items()},
            "top_other_kernels_s": dict(sorted(others.items(), key=lambda kv: -kv[1])[:top])}


def format_device_breakdown(b: dict) -> str:
    parts = [f"{k} {b[f'{k}_share']:.0%}" for k in CATEGORIES if b[f"{k}_s"] > 0]
    return f"device time {b['total_s'] * 1e3:.2f} ms in {b['kernels']} kernels: " + ", ".join(parts)
