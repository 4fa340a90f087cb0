"""util.profile_categories on profiler events: every kernel in its category, device time counted once.

tests/data/cuda_profile_events.json is hand-written from kernel names as they appear in CUDA
profiles of PyTorch 2.x (cuBLAS/cuBLASLt nvjet and sm90_xmma GEMMs, cutlass, cuDNN, flash and
memory-efficient attention, native elementwise/reduction/layer-norm kernels, fused AdamW, memcpy),
with made-up durations: no CUDA profile can be recorded on the CPU test machines.
"""
import json
from pathlib import Path

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from util.profile_categories import (CATEGORIES, KernelEvent, device_breakdown, format_device_breakdown,
                                     kernel_category, kernel_events)

FIXTURE = json.loads((Path(__file__).parent / "data" / "cuda_profile_events.json").read_text())


def _events() -> list[FunctionEvent]:
    """The fixture as torch.profiler's FunctionEvents: device kernels, and CPU operators carrying the
    device time of the kernels under them (the ones a per-operator sum counts again)."""
    events, t = [], 0.0
    for i, e in enumerate(FIXTURE["device_events"]):
        events.append(FunctionEvent(i, e["name"], 0, t, t + e["dur_us"], use_device="cuda",
                                    device_type=DeviceType.CUDA))
        t += e["dur_us"]
    for i, e in enumerate(FIXTURE["cpu_events"], start=len(events)):
        op = FunctionEvent(i, e["name"], 1, 0.0, e["dur_us"], use_device="cuda", device_type=DeviceType.CPU)
        op.append_kernel(e["name"], 0, e["device_time_us"])
        events.append(op)
    return events


@pytest.mark.parametrize("event", FIXTURE["device_events"], ids=lambda e: e["name"][:40])
def test_every_kernel_lands_in_its_category(event):
    assert kernel_category(event["name"]) == event["expected"]


def test_device_time_is_the_sum_of_the_kernels_alone():
    events = _events()
    kernels = kernel_events(events)
    assert [k.name for k in kernels] == [e["name"] for e in FIXTURE["device_events"]]  # no CPU operator
    b = device_breakdown(kernels)
    kernel_total_s = sum(e["dur_us"] for e in FIXTURE["device_events"]) / 1e6
    assert b["total_s"] == pytest.approx(kernel_total_s) and b["kernels"] == len(FIXTURE["device_events"])
    # what adding up every event's device time would give: the operators' time again, and more
    counted_twice = sum(e.device_time_total for e in events) / 1e6
    assert counted_twice > kernel_total_s * 1.5
    for category in CATEGORIES:
        expected = sum(e["dur_us"] for e in FIXTURE["device_events"] if e["expected"] == category) / 1e6
        assert b[f"{category}_s"] == pytest.approx(expected), category
    assert sum(b[f"{c}_share"] for c in CATEGORIES) == pytest.approx(1.0)
    assert b["matmul_share"] > 0.4 and b["attention_share"] > 0.25  # the fixture's step is GEMM and attention bound
    assert list(b["top_other_kernels_s"]) == [e["name"] for e in FIXTURE["device_events"] if e["expected"] == "other"]
    text = format_device_breakdown(b)
    assert text.startswith("device time 2.05 ms in 31 kernels: ") and "matmul" in text and "attention" in text


def test_empty_profile():
    b = device_breakdown([])
    assert b["total_s"] == 0 and all(b[f"{c}_share"] == 0 for c in CATEGORIES)
    assert device_breakdown([KernelEvent("triton_tem_fused_addmm_0", 5.0)])["matmul_share"] == 1.0
