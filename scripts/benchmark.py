"""Speed benchmark: the project's default fast path against a naive fp32 baseline, in ONE run.

    python scripts/benchmark.py --model mae_vit_large_patch7 --input_size 224 --batch_size 2 --output out.json

Measured phases (same model, same weights, same batch of B random images):

inference, naive   fp32, LoRA unmerged, torch.no_grad, one encoder+decoder pass PER MASK (a plain
                   Python loop over the K masks), then the same smoothing and max score.
inference, fast    what main_infer.py does: merge_lora, eval, requires_grad off, frozen linear
                   weights stored in the autocast dtype (lora_utils.cast_frozen_weights),
                   torch.inference_mode, util.misc.autocast(resolve_amp('auto')), AnomalyScorer
                   reconstructing all K views of all B images as one batch (optionally torch.compile).
train, naive       fp32 MAE step (mask ratio 0.75): forward, backward, AdamW (default kernel).
train, fast        what main_train.py does: the same frozen base and trainable set
                   (--freeze_non_lora), autocast bf16 where supported, the frozen linears stored
                   once in bf16 for compute while their exact fp32 tensors stay in host memory for
                   the checkpoints (cast_frozen_weights(keep_exact=True)), AdamW fused.

Both training phases freeze what an official MAE checkpoint would fill (every non-LoRA parameter
except the 7x7 patch embedding and decoder_pred, whose shapes differ from the official 16x16 ones).

Each path first runs --warmup untimed steps alone (its memory is measured there); the --steps timed
steps then alternate naive/fast (ABBA), so load from other processes on a shared machine hits both
alike. Steps are timed with time.perf_counter (after torch.cuda.synchronize on CUDA); images/s =
B / median step time.

FLOPs are counted analytically from the architecture (multiply-add = 2 FLOPs; the same count is
used for the naive and the fast run, i.e. the useful work of the batched, merged algorithm):
  linear of T tokens, fan-in a, fan-out b:          2*T*a*b
  transformer block of width D, MLP hidden H, T tokens: 2*T*(3D*D + D*D + 2*D*H) + 4*T*T*D (QK^T, AV)
  patch embedding (a linear of the p*p*C patch):    2*L*p*p*C*D per image (once per image, not per view)
  encoder: T = 1 + L_visible tokens per sequence;   decoder: T = 1 + L, plus decoder_embed/pred
  inference: B*K sequences, + the two separable Gaussian passes 2*H*W*taps each
  training:  forward (with the LoRA adapters, 2*T*r*(a+b) per adapted linear) + backward:
             input gradients of every linear (2*T*a*b; none for the patch embedding, whose input is
             the image), weight gradients of trainable tensors only, attention backward 8*T*T*D,
             LoRA backward 2x its forward. Norms, softmax, GELU, the loss and the optimizer are not
             counted. tests/test_benchmark.py checks these counts against FlopCounterMode.
Peaks: the best of several timed square matmuls (2048^3 on the CPU, 4096^3 on CUDA) in fp32 and
bf16, measured at the start and at the end of the same run (the better of the two; on a CPU without
bf16 instructions, where the fast path runs fp32, the fp32 peak stands for the bf16 one); achieved
TFLOP/s are reported as fractions of both. Each path's share of the peak of the dtype it computes in
(naive: fp32, fast: bf16 where supported) is at most 1; a bf16 fast path's share of the fp32 peak
can exceed 1. Targets (TARGET_FRAC_BF16_PEAK, for ViT-L/7 at 224 px on the CPU): the fast training
step at >= 70% of the bf16 peak, fast inference at >= 62%.
--profile N profiles one fast inference call and one fast training step (torch.profiler). On the
CPU: self time per op, split into linears (mm/addmm, the fused fc1 + GELU of CPU inference and the
patch-embedding convolution, forward and backward), attention (QK^T and AV matmuls, softmax, fused
SDPA, forward and backward) and everything else (norms, GELU, residual adds, casts and copies,
masking, optimizer, ...), with the N largest ops of the rest. On CUDA: the device kernels alone
(operators would count their kernels' time again), split by kernel name into matmul, attention,
normalization, elementwise, reduction, copy, optimizer, communication and other
(util.profile_categories), with the N largest kernels of 'other'.
Memory ("peak MiB") = the path's own model tensors (parameters + buffers, counted exactly) + the
growth of peak memory during its isolated warmup (activations, autocast copies, optimizer state,
workspaces): on CUDA max_memory_allocated minus memory_allocated at the start; on the CPU the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim) minus the RSS
at the start; without /proc, the lifetime ru_maxrss (an upper bound).
On CUDA the run also counts the synchronising calls of one fast inference call and one fast
training step (torch.cuda.set_sync_debug_mode), which should both be 0.
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lora_utils import cast_frozen_weights, freeze_non_lora, is_lora_name, lora_layers, merge_lora  # noqa: E402
from models_mae import MODELS, AnomalyScorer, MaskedAutoencoderViT, create_model  # noqa: E402
from util import misc  # noqa: E402  (misc.cpu_features is looked up at run time: tests fake the CPU there)
from util.cli import DefaultsHelpFormatter, UserError, run_cli  # noqa: E402
from util.masks import MASK_PATTERNS, make_inference_masks  # noqa: E402
from util.misc import autocast, bf16_supported, resolve_amp, resolve_device  # noqa: E402
from util.profile_categories import device_breakdown, format_device_breakdown, kernel_events  # noqa: E402
from util.smoothing import GaussianSmoothing  # noqa: E402

MASK_RATIO = 0.75
# Fast path's share of the bf16 matmul peak for ViT-L/7 at 224 px on a CPU (the speed targets, docs/SPEED.md).
TARGET_FRAC_BF16_PEAK = {"inference": 0.62, "train": 0.70}
TARGET_MODEL, TARGET_SIZE = "mae_vit_large_patch7", 224


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "benchmark.py",
        description="Benchmark the default fast path (bf16 where supported, merged LoRA, all masks in one "
                    "batch, fused attention and AdamW) against a naive fp32 per-mask baseline, for inference "
                    "and for a training step, in one run. Prints a table; --output writes the numbers.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="mae_vit_large_patch7", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--input_size", type=int, default=224, help="image side in pixels (a multiple of 7)")
    p.add_argument("--batch_size", type=int, default=2, help="images per inference call and per training step")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--steps", type=int, default=3, help="timed steps per path, alternating naive/fast (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path, run alone before the timed ones (memory is measured there)")
    p.add_argument("--output", "--json", default=None, metavar="PATH",
                   help="also write the results as JSON here")
    p.add_argument("--lora_rank", type=int, default=8, help="LoRA rank on the attention qkv/proj linears")
    p.add_argument("--num_masks", type=int, default=4, help="K inference views")
    p.add_argument("--mask_pattern", default="grid", choices=MASK_PATTERNS)
    p.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of the anomaly maps")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path (compile time not timed)")
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend for --compile (eager: traced by dynamo, no code generation; "
                        "scripts/gpu_check.sh's CPU mode uses it to stay quick)")
    p.add_argument("--no_cast_frozen", action="store_true",
                   help="ablation: keep the frozen (inference: merged) weights in fp32 under autocast, "
                        "re-cast at every call")
    p.add_argument("--only", choices=("all", "inference", "train"), default="all", help="phases to run")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one fast inference and one fast training step with "
                        "torch.profiler: time split into linears / attention / everything else (in the "
                        "JSON too) and the N most expensive ops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# ---- building blocks (also used by tests/test_benchmark.py) ------------------------------------
def build_model(name: str, img_size: int, lora_rank: int, seed: int = 0) -> MaskedAutoencoderViT:
    """The model with deterministic weights and non-zero LoRA B, so merging changes the weights."""
    torch.manual_seed(seed)
    model = create_model(name, img_size=img_size, lora_rank=lora_rank)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.02)  # as after some training; zero B would make merging a no-op
    return model


def official_keys(model: torch.nn.Module) -> set[str]:
    """Parameters an official MAE checkpoint would fill: all but LoRA, the 7x7 patch embed, decoder_pred."""
    return {n for n, _ in model.named_parameters()
            if not is_lora_name(n) and not n.startswith(("patch_embed.", "decoder_pred."))}


@torch.no_grad()
def naive_anomaly(model: MaskedAutoencoderViT, imgs: torch.Tensor, masks: torch.Tensor,
                  smoothing: GaussianSmoothing) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive baseline: one full encoder+decoder pass per mask. Returns scores [N], maps [N, H, W]."""
    n = imgs.shape[0]
    target, mean, std = model.patch_targets(imgs)
    error = torch.zeros(n, imgs.shape[-2], imgs.shape[-1], device=imgs.device)
    for view in masks:  # view: [L] bool, True = hidden
        keep = (~view).nonzero().squeeze(1)
        hidden = view.nonzero().squeeze(1)
        latent = model.forward_encoder(model.embed_patches(imgs), keep.expand(n, -1))
        ids_restore = torch.argsort(torch.cat([keep, hidden])).expand(n, -1)
        pred = model.forward_decoder(latent, ids_restore).float() * std + mean
        sq = (pred - (target * std + mean)) ** 2 * view[None, :, None]
        error += model.unpatchify(sq).mean(dim=1)
    maps = smoothing(error)
    return maps.flatten(1).amax(dim=1), maps


def fast_scorer(model: MaskedAutoencoderViT, num_masks: int, mask_pattern: str, sigma: float,
                amp_dtype: Optional[torch.dtype], cast_frozen: bool = True) -> AnomalyScorer:
    """main_infer's preparation: merge LoRA, freeze, store weights in the autocast dtype, scorer."""
    merge_lora(model)
    model.eval().requires_grad_(False)
    if amp_dtype is not None and cast_frozen:
        cast_frozen_weights(model, amp_dtype)
    return AnomalyScorer(model, num_masks=num_masks, mask_pattern=mask_pattern, sigma=sigma).eval()


def fast_anomaly(scorer: Callable, imgs: torch.Tensor, device: torch.device, amp_dtype: Optional[torch.dtype]):
    with torch.inference_mode(), autocast(device, amp_dtype):
        return scorer(imgs)


def make_optimizer(model: torch.nn.Module, device: torch.device, fused: bool) -> torch.optim.AdamW:
    """AdamW as main_train builds it: trainable tensors only, weight decay on weight matrices only."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or is_lora_name(name) or name.endswith("_token") else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.001}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4, betas=(0.9, 0.95),
                             fused=True if fused else None)


def train_step(model: Callable, optimizer: torch.optim.Optimizer, imgs: torch.Tensor, device: torch.device,
               amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """One MAE step as engine.train_one_epoch takes it (no host sync: the loss stays on the device)."""
    with autocast(device, amp_dtype):
        loss, _, _ = model(imgs, mask_ratio=MASK_RATIO)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ---- FLOPs -------------------------------------------------------------------------------------
def _dims(model: MaskedAutoencoderViT) -> dict:
    blk, dblk = model.blocks[0], model.decoder_blocks[0]
    return {"D": model.cls_token.shape[-1], "H": blk.mlp.fc1.out_features, "depth": len(model.blocks),
            "Dd": model.mask_token.shape[-1], "Hd": dblk.mlp.fc1.out_features, "ddepth": len(model.decoder_blocks),
            "L": model.num_patches, "P": model.patch_size ** 2 * model.in_chans}


def _block_linears(D: int, H: int) -> list[tuple[str, int, int]]:
    return [("qkv", D, 3 * D), ("proj", D, D), ("fc1", D, H), ("fc2", H, D)]


def inference_flops(model: MaskedAutoencoderViT, num_images: int, num_masks: int, smoothing_taps: int,
                    smoothed_maps: int = 2) -> float:
    """FLOPs of scoring num_images images with K views, batched and merged (see the module docstring).

    The scorer smooths `smoothed_maps` maps per image (the pixel-level and the image-level map)."""
    d = _dims(model)
    L, D, Dd, P = d["L"], d["D"], d["Dd"], d["P"]
    hidden = L // num_masks
    te, td = 1 + L - hidden, 1 + L

    def block(T, width, mlp):
        return 2 * T * sum(a * b for _, a, b in _block_linears(width, mlp)) + 4 * T * T * width

    per_seq = (d["depth"] * block(te, D, d["H"]) + 2 * te * D * Dd
               + d["ddepth"] * block(td, Dd, d["Hd"]) + 2 * td * Dd * P)
    side = model.img_size
    smooth = smoothed_maps * 2 * 2 * side * side * smoothing_taps
    return float(num_images * (2 * L * P * D + num_masks * per_seq + smooth))


def train_flops(model: MaskedAutoencoderViT, num_images: int, mask_ratio: float = MASK_RATIO) -> float:
    """FLOPs of one training step (forward + backward, see the module docstring) for this model's
    current trainable set and LoRA layers."""
    d = _dims(model)
    L, D, Dd, P = d["L"], d["D"], d["Dd"], d["P"]
    te, td = 1 + int(L * (1 - mask_ratio)), 1 + L
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ranks = {name: layer.r for name, layer in lora_layers(model).items()}

    def linear(name, T, a, b):
        fwd = 2 * T * a * b
        bwd = fwd + (fwd if f"{name}.weight" in trainable else 0)  # input grad + weight grad
        r = ranks.get(name, 0)
        lora = 2 * T * r * (a + b)
        return fwd + bwd + 3 * lora

    total = 0.0
    for prefix, depth, T, width, mlp in (("blocks", d["depth"], te, D, d["H"]),
                                         ("decoder_blocks", d["ddepth"], td, Dd, d["Hd"])):
        for i in range(depth):
            for lname, a, b in _block_linears(width, mlp):
                mod = f"{prefix}.{i}.{'attn' if lname in ('qkv', 'proj') else 'mlp'}.{lname}"
                total += linear(mod, T, a, b)
            total += 3 * 4 * T * T * width  # attention: forward 4*T*T*D, backward twice that
    total += linear("decoder_embed", te, D, Dd) + linear("decoder_pred", td, Dd, P)
    pe = 2 * L * P * D
    total += pe + (pe if "patch_embed.proj.weight" in trainable else 0)  # no input grad for the image
    return float(num_images * total)


# ---- measuring ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_mib(module: torch.nn.Module) -> float:
    """Parameters and buffers of a module (shared tensors counted once), in MiB."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}
    return sum(seen.values()) / 2**20


class PeakMemory:
    """Working memory of one path: growth of the peak above the level at reset(), in MiB.

    CUDA: torch.cuda.max_memory_allocated - memory_allocated at reset. CPU: the process's peak
    resident set size (VmHWM, reset through /proc/self/clear_refs after returning freed heap to
    the system with malloc_trim) minus the RSS at reset; without /proc, the lifetime ru_maxrss.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0.0
        try:
            import ctypes
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None
        if device.type == "cuda":
            self.kind = "CUDA: max_memory_allocated growth during the path's warmup + its model tensors"
        elif self._reset_rss():
            self.kind = ("CPU: peak RSS growth (VmHWM reset via /proc/self/clear_refs) during the path's "
                         "warmup + its model tensors")
        else:
            self.kind = "CPU: lifetime ru_maxrss (no per-path reset possible) + model tensors; an upper bound"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    @staticmethod
    def _status_mib(field: str) -> Optional[float]:
        try:
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        if self._trim is not None:
            self._trim(0)  # freed heap goes back to the system, so reuse does not hide growth
        self.base = (self._status_mib("VmRSS") or 0.0) if self._reset_rss() else 0.0

    def growth_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        peak = self._status_mib("VmHWM")
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return max(peak - self.base, 0.0)


def measure_paths(paths: dict[str, tuple[Callable[[], object], float]], steps: int, warmup: int,
                  device: torch.device, mem: PeakMemory) -> dict[str, tuple[list[float], float]]:
    """Time several paths fairly on a shared machine; returns {name: (step times s, peak MiB)}.

    paths: {name: (one step, MiB of that path's model tensors)}. Each path first runs its
    `warmup` steps alone (untimed; its working memory is measured there). The timed steps then
    alternate between the paths (ABBA order), so a burst of load from other processes hits all
    of them alike instead of one phase.
    """
    names, peaks = list(paths), {}
    for name in names:
        mem.reset()
        for _ in range(warmup):
            paths[name][0]()
        _sync(device)
        peaks[name] = paths[name][1] + mem.growth_mib()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            _sync(device)
            start = time.perf_counter()
            paths[name][0]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], peaks[name]) for name in names}


def peak_matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, min_time: float = 0.5) -> float:
    """Best observed GFLOP/s of an n x n x n matmul (at least 3 timed runs and about min_time s)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or spent < min_time:
        start = time.perf_counter()
        a @ b
        _sync(device)
        t = time.perf_counter() - start
        best, spent, runs = min(best, t), spent + t, runs + 1
    return 2 * n**3 / best / 1e9


def matmul_peaks(device: torch.device, n: int, best: Optional[dict[str, float]] = None) -> dict[str, float]:
    """The fp32 and bf16 matmul peaks (GFLOP/s), each the better of this measurement and `best`'s.

    A CPU without bf16 instructions (no AVX-512 BF16 / AMX) emulates bf16 matmuls at ~1 GFLOP/s (a
    2048^3 one: ~10 s) and autocast runs fp32 there: its fp32 peak stands for both."""
    best = best or {}
    fp32 = max(peak_matmul_gflops(device, torch.float32, n), best.get("fp32", 0.0))
    if not bf16_supported(device):
        return {"fp32": fp32, "bf16": fp32}
    return {"fp32": fp32, "bf16": max(peak_matmul_gflops(device, torch.bfloat16, n), best.get("bf16", 0.0))}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": str(device), "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1min": _load_avg(),
            "torch": torch.__version__, "python": platform.python_version(), "bf16_supported": bf16_supported(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        features = misc.cpu_features()
        info.update(amx=features.amx, avx512_bf16=features.avx512_bf16, cpu_kind=features.kind)
    return info


def _load_avg() -> Optional[float]:
    """The 1-minute load average at this moment (other work on a shared machine), where known."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def fused_attention_on(model: torch.nn.Module) -> bool:
    """Every timm Attention in the model calls F.scaled_dot_product_attention."""
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    return bool(flags) and all(flags)


def _phase(name: str, times: list[float], mem: float, batch: int, flops: float) -> dict:
    median = statistics.median(times)
    return {f"{name}_img_s": batch / median, f"{name}_s_per_step": times, f"{name}_tflops": flops / median / 1e12,
            f"{name}_peak_mem_mib": mem}


def _add_peak_fractions(result: dict, peaks: dict) -> None:
    for phase in ("inference", "train"):
        for name in ("naive", "fast"):
            if phase in result:
                gflops = result[phase][f"{name}_tflops"] * 1e3
                result[phase][f"{name}_frac_fp32_peak"] = gflops / peaks["fp32"]
                result[phase][f"{name}_frac_bf16_peak"] = gflops / peaks["bf16"]


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """CUDA only: how many synchronising CUDA calls one run of fn makes (torch's sync debug mode)."""
    if device.type != "cuda":
        return None
    import warnings
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# Self-time categories of a profiled step (op names, forward and backward). oneDNN's linear with a
# fused GELU (util.cpu_kernels.linear_gelu, CPU inference) counts as a linear, its GELU included.
LINEAR_OPS = ("aten::mm", "aten::addmm", "aten::mkldnn_convolution", "aten::convolution_backward",
              "aten::_convolution", "aten::cudnn_convolution", "aten::cudnn_convolution_backward",
              "mkldnn::_linear_pointwise")
ATTENTION_OPS = ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data")
ATTENTION_PREFIX = "aten::_scaled_dot_product"  # fused SDPA kernels and their backward, any backend


def op_category(name: str) -> str:
    if name in LINEAR_OPS:
        return "linears"
    if name in ATTENTION_OPS or name.startswith(ATTENTION_PREFIX) or name.startswith("aten::_flash_attention") \
            or name.startswith("aten::_efficient_attention"):
        return "attention"
    return "other"


def profile_step(fn: Callable[[], object], device: torch.device, top: int) -> tuple[dict, str]:
    """Profile one call of fn; returns the breakdown and torch.profiler's table of the top ops.

    CUDA: the device kernels' time by category, each kernel counted once
    (util.profile_categories). CPU: self time of the operators in linears, attention and
    everything else, with the `top` largest other ops."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    if device.type == "cuda":
        return (device_breakdown(kernel_events(prof.events()), top),
                events.table(sort_by="self_device_time_total", row_limit=top))
    attr = "self_cpu_time_total"
    seconds = {"linears": 0.0, "attention": 0.0, "other": 0.0}
    other_ops: dict[str, float] = {}
    for event in events:
        t = getattr(event, attr) / 1e6  # profiler times are in microseconds
        category = op_category(event.key)
        seconds[category] += t
        if category == "other" and t > 0:
            other_ops[event.key] = t
    total = max(sum(seconds.values()), 1e-12)
    breakdown = {"total_s": total, **{f"{k}_s": v for k, v in seconds.items()},
                 **{f"{k}_share": v / total for k, v in seconds.items()},
                 "top_other_ops_s": dict(sorted(other_ops.items(), key=lambda kv: -kv[1])[:top])}
    return breakdown, events.table(sort_by=attr, row_limit=top)


def format_breakdown(b: dict) -> str:
    if "kernels" in b:  # CUDA: kernel categories
        return format_device_breakdown(b)
    others = ", ".join(f"{name.removeprefix('aten::')} {t:.3f}s" for name, t in b["top_other_ops_s"].items())
    return (f"linears {b['linears_share']:.0%} ({b['linears_s']:.3f}s), attention {b['attention_share']:.0%} "
            f"({b['attention_s']:.3f}s), everything else {b['other_share']:.0%} ({b['other_s']:.3f}s; "
            f"largest: {others})")


# ---- the run -----------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    if args.model not in MODELS:
        raise UserError(f"--model {args.model}: unknown; choose one of {', '.join(MODELS)}")
    if args.input_size <= 0 or args.input_size % 7:
        raise UserError(f"--input_size {args.input_size}: must be a positive multiple of the patch size 7 (e.g. 224)")
    for flag, low in (("batch_size", 1), ("steps", 1), ("warmup", 1), ("lora_rank", 1), ("profile", 0)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least {low}")
    if args.sigma < 0:
        raise UserError(f"--sigma {args.sigma}: must be >= 0")
    try:
        make_inference_masks(args.input_size // 7, args.num_masks, args.mask_pattern)
    except ValueError as e:
        raise UserError(f"--num_masks {args.num_masks} / --mask_pattern {args.mask_pattern}: {e}") from e
    if args.output:
        parent = Path(args.output).resolve().parent
        if not parent.is_dir():
            raise UserError(f"--output {args.output}: folder {parent} does not exist")


def run_benchmark(args: argparse.Namespace) -> dict:
    check_args(args)
    device = resolve_device(args.device)
    amp_dtype = resolve_amp("auto", device)
    cast_frozen = amp_dtype is not None and not args.no_cast_frozen
    batch, steps, warmup = args.batch_size, args.steps, args.warmup
    mem = PeakMemory(device)
    n_mm = 4096 if device.type == "cuda" else 2048
    bf16_native = bf16_supported(device)
    # measured at the start and again at the end; the better of the two is the peak, so a burst of
    # load from other processes during one of them does not lower it
    peaks = matmul_peaks(device, n_mm)
    torch.manual_seed(args.seed + 1)
    imgs = torch.randn(batch, 3, args.input_size, args.input_size, device=device)
    result = {
        "model": args.model, "input_size": args.input_size, "batch_size": batch, "num_masks": args.num_masks,
        "mask_pattern": args.mask_pattern, "lora_rank": args.lora_rank, "steps": steps, "warmup": warmup,
        "machine": machine_info(device), "peak_gflops": {**peaks, "matmul_size": n_mm, "bf16_native": bf16_native},
        "memory_kind": mem.kind,
        "fast_path": {"amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
                      "cast_frozen_weights": cast_frozen,
                      "compile": args.compile_backend if args.compile else False,
                      "fused_adamw": True},
        "flops_method": "analytic, see scripts/benchmark.py docstring (same count for naive and fast)",
    }
    build = lambda: build_model(args.model, args.input_size, args.lora_rank, args.seed).to(device)  # noqa: E731

    if args.only in ("all", "inference"):
        naive_model = build().eval()
        result["fast_path"]["fused_attention"] = fused_attention_on(naive_model)
        smoothing = GaussianSmoothing(args.sigma).to(device)
        masks = make_inference_masks(naive_model.grid_size, args.num_masks, args.mask_pattern).to(device)
        flops = inference_flops(naive_model, batch, args.num_masks, smoothing.kernel.numel() if args.sigma > 0 else 0)
        scorer = fast_scorer(build(), args.num_masks, args.mask_pattern, args.sigma, amp_dtype, cast_frozen).to(device)
        run = torch.compile(scorer, backend=args.compile_backend) if args.compile else scorer
        if args.compile:
            fast_anomaly(run, imgs, device, amp_dtype)  # compile outside the measured steps
        measured = measure_paths({
            "naive": (lambda: naive_anomaly(naive_model, imgs, masks, smoothing), tensor_mib(naive_model)),
            "fast": (lambda: fast_anomaly(run, imgs, device, amp_dtype), tensor_mib(scorer)),
        }, steps, warmup, device, mem)
        naive = _phase("naive", *measured["naive"], batch, flops)
        fast = _phase("fast", *measured["fast"], batch, flops)
        result["fast_path"]["inference_host_syncs"] = count_host_syncs(
            lambda: fast_anomaly(run, imgs, device, amp_dtype), device)
        pe_times, _ = measure_paths({"pe": (lambda: fast_anomaly(scorer.model.patch_embed, imgs, device, amp_dtype),
                                            0.0)}, 3, 1, device, mem)["pe"]
        result["inference"] = {**naive, **fast, "speedup": fast["fast_img_s"] / naive["naive_img_s"],
                               "gflop_per_step": flops / 1e9,
                               "patch_embed_share_of_fast": statistics.median(pe_times) / statistics.median(measured["fast"][0])}
        if args.profile:
            result["inference_breakdown"], result["inference_profile"] = profile_step(
                lambda: fast_anomaly(run, imgs, device, amp_dtype), device, args.profile)
        del naive_model, scorer, run, measured
        gc.collect()

    if args.only in ("all", "train"):
        paths, keep = {}, []
        host_copies_mib = 0.0
        for name in ("naive", "fast"):
            model = build().train()
            freeze_non_lora(model, official_keys(model))
            dtype = amp_dtype if name == "fast" else None
            flops = train_flops(model, batch)
            model_mib = tensor_mib(model)
            if name == "fast" and cast_frozen:  # main_train.build_model's storage for a frozen base
                fp32_mib = model_mib
                cast_frozen_weights(model, amp_dtype, keep_exact=True)
                model_mib = tensor_mib(model)
                host_copies_mib = 2 * (fp32_mib - model_mib)  # exact fp32 copies of the (2-byte) cast tensors
                if device.type == "cpu":
                    model_mib += host_copies_mib
            opt = make_optimizer(model, device, fused=name == "fast")
            run = torch.compile(model, backend=args.compile_backend) if args.compile and name == "fast" else model
            if args.compile and name == "fast":
                train_step(run, opt, imgs, device, dtype)  # compile outside the measured steps
            paths[name] = (partial(train_step, run, opt, imgs, device, dtype), model_mib)
            keep.append((model, opt, run))
        measured = measure_paths(paths, steps, warmup, device, mem)
        phases = {**_phase("naive", *measured["naive"], batch, flops),
                  **_phase("fast", *measured["fast"], batch, flops)}
        result["fast_path"]["train_step_host_syncs"] = count_host_syncs(paths["fast"][0], device)
        if args.profile:
            result["train_breakdown"], result["train_profile"] = profile_step(paths["fast"][0], device, args.profile)
        result["train"] = {**phases, "speedup": phases["fast_img_s"] / phases["naive_img_s"],
                           "gflop_per_step": flops / 1e9, "fast_exact_copies_mib": host_copies_mib}
        del paths, keep, measured
        gc.collect()
    peaks = matmul_peaks(device, n_mm, best=peaks)
    result["peak_gflops"].update(peaks)
    _add_peak_fractions(result, peaks)
    result["load_avg_1min_end"] = _load_avg()
    if args.model == TARGET_MODEL and args.input_size == TARGET_SIZE and device.type == "cpu":
        result["targets"] = {phase: {"fast_frac_bf16_peak": target,
                                     "met": result[phase]["fast_frac_bf16_peak"] >= target}
                             for phase, target in TARGET_FRAC_BF16_PEAK.items() if phase in result}
    return result


def format_table(r: dict) -> str:
    m = r["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} threads"
    pk = r["peak_gflops"]
    lines = [f"{r['model']} @ {r['input_size']} px, batch {r['batch_size']}, K={r['num_masks']} masks, "
             f"{m['device']} ({where}), torch {m['torch']}",
             f"fast path: amp {r['fast_path']['amp']}, cast frozen weights {r['fast_path']['cast_frozen_weights']}, "
             f"fused attention {r['fast_path'].get('fused_attention', '-')}, compile {r['fast_path']['compile']}",
             f"peak matmul {pk['matmul_size']}^3: fp32 {pk['fp32']:.0f} GFLOP/s, bf16 {pk['bf16']:.0f} GFLOP/s",
             f"{'':<10}{'path':<7}{'img/s':>9}{'speedup':>9}{'TFLOP/s':>9}{'%fp32pk':>9}{'%bf16pk':>9}{'peak MiB':>10}"]
    for phase in ("inference", "train"):
        if phase not in r:
            continue
        p = r[phase]
        for name in ("naive", "fast"):
            speed = f"{p['speedup']:.2f}x" if name == "fast" else ""
            lines.append(f"{phase if name == 'naive' else '':<10}{name:<7}{p[f'{name}_img_s']:>9.3f}{speed:>9}"
                         f"{p[f'{name}_tflops']:>9.3f}{100 * p[f'{name}_frac_fp32_peak']:>8.0f}%"
                         f"{100 * p[f'{name}_frac_bf16_peak']:>8.0f}%{p[f'{name}_peak_mem_mib']:>10.0f}")
    if "inference" in r:
        lines.append(f"patch embedding: {100 * r['inference']['patch_embed_share_of_fast']:.2f}% of a fast inference step")
    fp = r["fast_path"]
    if fp.get("inference_host_syncs") is not None or fp.get("train_step_host_syncs") is not None:
        lines.append(f"host-device syncs in one fast call (CUDA sync debug mode): inference "
                     f"{fp.get('inference_host_syncs', '-')}, training step {fp.get('train_step_host_syncs', '-')}")
    for phase, target in r.get("targets", {}).items():
        lines.append(f"target ({phase}): fast path >= {target['fast_frac_bf16_peak']:.0%} of the bf16 peak: "
                     f"{'met' if target['met'] else 'NOT met'}")
    lines.append(f"memory: {r['memory_kind']}")
    lines.append(f"load average (1 min) at start/end: {m['load_avg_1min']} / {r['load_avg_1min_end']}")
    for phase in ("inference", "train"):
        if f"{phase}_breakdown" in r:
            lines += [f"-- {phase} profile (one fast step): {format_breakdown(r[f'{phase}_breakdown'])}",
                      r[f"{phase}_profile"]]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    result = run_benchmark(args)
    print(format_table(result), flush=True)
    if args.output:
        out = {k: v for k, v in result.items() if not k.endswith("_profile")}
        write_json_atomic(out, Path(args.output))
        print(f"wrote {args.output}")


def write_json_atomic(obj: dict, path: Path) -> None:
    """JSON to a temporary file next to `path`, then renamed over it (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    sys.exit(run_cli(main, _args, _args.debug))
