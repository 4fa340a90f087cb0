"""Deployment engines on the CPU, in ONE run: parity with PyTorch fp32 and speed.

    python scripts/benchmark_export.py --data_path /work/data/capsule --models tiny,small,base \
        --input_size 224 --batch_size 2 --output export_bench.json

A sibling of scripts/benchmark.py (it reuses its model builder and its fair timing). Per model
(random weights with non-zero LoRA adapters, merged, as after training), the default scorer of
scripts/export.py (the default map recipes, calibrated on --holdout_images training images of the
category; uint8 RGB in, score, normalised score, label, map out) runs on:

pytorch_fp32       the reference: PyTorch, fp32 (the parity baseline, also timed)
pytorch_fast       main_infer.py's fast path: merged weights stored in bf16 (cast_frozen_weights) under
                   bf16 autocast where the CPU supports it (resolve_amp('auto')), torch.inference_mode
onnxruntime_fp32   the exported ONNX file (dynamic batch), onnxruntime CPU execution provider
onnxruntime_int8   the same file with dynamic int8 quantisation of its MatMul weights
                   (onnxruntime.quantization.quantize_dynamic, QInt8, per channel)
torchscript_fp32   the exported TorchScript file (--engines all)

onnxruntime offers no bf16 kernels on x86 CPUs (its bf16 GEMM option is for ARM64 only), so there is
no onnxruntime bf16 engine.

Parity: each engine's outputs on --parity_images test images of --data_path (decoded and resized as
main_infer.py does), called one image at a time (batch 1) and with all of them at once (a dynamic
batch), against pytorch_fp32: max |map difference|, max relative score difference, labels that
differ. The exact engines must meet scripts/export.py's tolerances (maps 1e-4 absolute, scores 1e-5
relative, identical labels); pytorch_fast and int8 are approximations and report their numbers
against APPROX_TOLERANCE (a relative map/score difference), which decides `within_tolerance`.

Speed: --batch_size images per call; each engine first runs --warmup calls alone, then --steps timed
calls alternating between the engines (benchmark.measure_paths); img/s = batch / median call time,
ms/img = 1000 median / batch. Run it alone (`flock /tmp/mae_cpu.lock ...` on a shared machine).
"""
import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import export  # noqa: E402
from benchmark import PeakMemory, build_model, machine_info, measure_paths  # noqa: E402
from lora_utils import cast_frozen_weights, merge_lora  # noqa: E402
from models_mae import MODELS  # noqa: E402
from scoring import ScoringOptions, build_scorer, holdout_error_maps  # noqa: E402
from util.calibration import Threshold  # noqa: E402
from util.cli import DefaultsHelpFormatter, UserError, run_cli  # noqa: E402
from util.datasets import TestDataset, find_test_items, list_images, train_folder  # noqa: E402
from util.files import write_atomic  # noqa: E402
from util.misc import autocast, resolve_amp  # noqa: E402

EXACT_ENGINES = ("onnxruntime_fp32", "torchscript_fp32")
# What an approximate engine (int8, bf16) may differ by, relative to the fp32 map maximum / score, for
# `within_tolerance`: 2%, a small fraction of the gap between normal and anomalous scores in practice.
APPROX_TOLERANCE = 0.02


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("benchmark_export.py", description="Parity and CPU speed of the deployment engines (PyTorch fp32, "
                                            "the PyTorch fast path, onnxruntime fp32/int8, TorchScript), one run.",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--data_path", required=True, metavar="ROOT", help="category root; its test images are used")
    p.add_argument("--models", default="tiny,small,base",
                   help="comma-separated: tiny, small, base, large, huge (mae_vit_<name>_patch7)")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=2, help="images per timed call")
    p.add_argument("--parity_images", type=int, default=4, help="test images compared per engine")
    p.add_argument("--holdout_images", type=int, default=8,
                   help="training images the scorer is calibrated on (the default map recipes need them)")
    p.add_argument("--steps", type=int, default=3, help="timed calls per engine (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per engine before timing")
    p.add_argument("--engines", choices=("onnx", "all"), default="onnx",
                   help="onnx: PyTorch fp32/fast and onnxruntime fp32/int8; all: also TorchScript")
    p.add_argument("--opset", type=int, default=export.DEFAULT_OPSET)
    p.add_argument("--output", "--json", metavar="PATH", help="also write the results here (JSON)")
    p.add_argument("--debug", action="store_true")
    return p


def load_images(data_path: str, n: int, size: int) -> np.ndarray:
    """The first n test images of the category as main_infer.py reads them: uint8 [n, S, S, 3]."""
    items = find_test_items(data_path)
    picked = [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]  # good and defective
    return TestDataset(picked, size).images.permute(0, 2, 3, 1).contiguous().numpy()


def deployed(model_name: str, size: int, data_path: str, n_holdout: int) -> tuple[export.DeployedScorer, Threshold]:
    """The default calibrated scorer of a random model (as scripts/export.py exports it), calibrated
    on the first n_holdout training images of the category."""
    model = build_model(model_name, size, lora_rank=8)
    merge_lora(model)
    model.eval().requires_grad_(False)
    options = ScoringOptions()
    names = [p.name for p in list_images(train_folder(data_path))[:n_holdout]]
    maps = holdout_error_maps(model, data_path, names, options, torch.device("cpu"), None)
    scorer, threshold = build_scorer(model, options, maps)
    return export.DeployedScorer(scorer.eval(), threshold.image, threshold.image_low).eval(), threshold


def fast_runner(module: export.DeployedScorer) -> export.Runner:
    """main_infer.py's fast path for the same module: weights stored in the autocast dtype, autocast."""
    fast = copy.deepcopy(module)
    device = torch.device("cpu")
    amp_dtype = resolve_amp("auto", device)
    if amp_dtype is not None:
        cast_frozen_weights(fast.scorer.model, amp_dtype)

    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode(), autocast(device, amp_dtype):
            return tuple(t.float().numpy() if t.is_floating_point() else t.numpy()
                         for t in fast(torch.from_numpy(images)))
    return run


def int8_onnx(fp32: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
        return dst.read_bytes()


def build_engines(module: export.DeployedScorer, size: int, opset: int, engines: str) -> dict[str, export.Runner]:
    example = torch.from_numpy(export.random_images(2, size))
    metadata = {"benchmark": "scripts/benchmark_export.py"}
    fp32 = export.onnx_bytes(module, example, dynamic_batch=True, opset=opset, metadata=metadata)
    runners = {"pytorch_fp32": export.torch_runner(module), "pytorch_fast": fast_runner(module),
               "onnxruntime_fp32": export.onnx_runner(fp32), "onnxruntime_int8": export.onnx_runner(int8_onnx(fp32))}
    if engines == "all":
        runners["torchscript_fp32"] = export.torchscript_runner(export.torchscript_bytes(module, example, metadata))
    return runners


def batch_1(runner: export.Runner, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each image alone through the engine, outputs concatenated."""
    return tuple(np.concatenate(parts) for parts in zip(*[runner(images[i:i + 1]) for i in range(len(images))]))


def parity(reference: tuple[np.ndarray, ...], candidate: export.Runner, images: np.ndarray) -> dict[str, Any]:
    """Batch 1 (each image alone) and the whole set at once, against the reference's batch-1 outputs."""
    out: dict[str, Any] = {}
    for name, got in (("batch_1", batch_1(candidate, images)), ("batch_n", candidate(images))):
        p = export.compare(reference, got)
        out[name] = {"map_max_abs": p.map_max_abs, "map_max_rel": p.map_max_abs / float(np.abs(reference[3]).max()),
                     "score_max_rel": p.score_max_rel, "labels_differ": p.labels_differ, "n_images": p.n_images,
                     "exact": p.ok}
    return out


def within_tolerance(name: str, result: dict[str, Any]) -> bool:
    cases = result.values()
    if name in EXACT_ENGINES or name == "pytorch_fp32":
        return all(c["exact"] for c in cases)
    return all(c["map_max_rel"] <= APPROX_TOLERANCE and c["score_max_rel"] <= APPROX_TOLERANCE
               and c["labels_differ"] == 0 for c in cases)


def run_model(name: str, args: argparse.Namespace, images: np.ndarray) -> dict[str, Any]:
    full = f"mae_vit_{name}_patch7"
    module, threshold = deployed(full, args.input_size, args.data_path, args.holdout_images)
    print(f"{full}: exporting ...", file=sys.stderr, flush=True)
    runners = build_engines(module, args.input_size, args.opset, args.engines)
    result: dict[str, Any] = {"model": full, "threshold": threshold.to_dict(),
                              "scoring": export.scoring_options(module.scorer), "engines": {}}
    reference = batch_1(runners["pytorch_fp32"], images)
    for engine, runner in runners.items():
        p = parity(reference, runner, images)
        result["engines"][engine] = {"parity": p, "within_tolerance": within_tolerance(engine, p)}
    batch = np.ascontiguousarray(images[np.arange(args.batch_size) % len(images)])
    paths: dict[str, tuple[Callable[[], object], float]] = {
        engine: ((lambda r=runner: r(batch)), 0.0) for engine, runner in runners.items()}
    timed = measure_paths(paths, args.steps, args.warmup, torch.device("cpu"), PeakMemory(torch.device("cpu")))
    for engine, (times, _) in timed.items():
        median = statistics.median(times)
        result["engines"][engine].update(img_s=args.batch_size / median, ms_per_img=1000 * median / args.batch_size,
                                         s_per_call=times)
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["model   engine             img/s   ms/img  map max|diff|  score max rel  labels  parity"]
    for r in results:
        for engine, e in r["engines"].items():
            worst = max(e["parity"].values(), key=lambda c: c["map_max_abs"])
            lines.append(f"{r['model'].split('_')[2]:<7} {engine:<18} {e['img_s']:6.3f} {e['ms_per_img']:8.1f} "
                         f"{worst['map_max_abs']:13.2e} {max(c['score_max_rel'] for c in e['parity'].values()):14.2e} "
                         f"{sum(c['labels_differ'] for c in e['parity'].values()):7d}  "
                         f"{'ok' if e['within_tolerance'] else 'OUT'}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if f"mae_vit_{n}_patch7" not in MODELS]
    if unknown:
        raise UserError(f"--models {','.join(unknown)}: choose from tiny, small, base, large, huge")
    if args.batch_size < 1 or args.parity_images < 1 or args.steps < 1:
        raise UserError("--batch_size, --parity_images and --steps must be at least 1")
    export.require_packages("onnx")
    export.check_opset(args.opset)
    images = load_images(args.data_path, args.parity_images, args.input_size)
    results = [run_model(name, args, images) for name in names]
    report = {"machine": machine_info(torch.device("cpu")), "input_size": args.input_size,
              "batch_size": args.batch_size, "steps": args.steps, "approx_tolerance": APPROX_TOLERANCE,
              "exact_tolerance": {"map_atol": export.PARITY_MAP_ATOL, "score_rtol": export.PARITY_SCORE_RTOL},
              "onnxruntime": __import__("onnxruntime").__version__, "results": results}
    print(format_table(results))
    if args.output:
        write_atomic(Path(args.output), lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
