"""The GPU check: one command, about 8 minutes on one GPU, one JSON (run by scripts/gpu_check.sh).

    scripts/gpu_check.sh --output gpu_check.json             one CUDA GPU: mae_vit_large_patch7 at 224 px
    scripts/gpu_check.sh --mode cpu --output cpu_check.json  the small CPU mode the tests run

Parts, each in its own process with its own time limit (a part that fails or runs out of time is
recorded with its error and the others still run; the whole check stays within --budget_s):
  train_eager, inference_eager      scripts/benchmark.py in bf16 (autocast 'auto'): the training step
                                    at batch 32 (--only train) and scoring at batch 64 (--only
                                    inference), naive vs fast, with the fraction of the matmul peaks,
                                    peak memory and, on CUDA, the host synchronisations of one fast
                                    training step and one scoring batch (torch.cuda.set_sync_debug_mode;
                                    both should be 0)
  train_compile, inference_compile  the same with --compile
  ddp                               torchrun --nproc_per_node 1 running this script's DDP worker: a few
                                    steps of main_train's training (frozen pretrained base stored in
                                    bf16, LoRA trained) in DistributedDataParallel over an NCCL process
                                    group (gloo in the CPU mode), the replica check, and whether the
                                    frozen tensors of the checkpoint equal the weights file bit for bit.
                                    (main_train.py itself creates no process group for one process.)
The CPU mode runs the same parts with a tiny model at 28 px, batch 2, one timed step, gloo, and
the eager compile backend (dynamo traces the model, no code generation), so that it takes about
a minute, not many.

JSON: mode, machine, elapsed_s, ok (every part succeeded), benchmark (phase -> eager/compile ->
the benchmark's numbers), host_syncs {train_step, scoring_batch} (null off CUDA), ddp,
peak_memory_mib, parts (per part: ok, returncode, wall_s, error).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from util.cli import DefaultsHelpFormatter, OneLineArgumentParser, UserError, run_cli  # noqa: E402


@dataclass(frozen=True)
class Mode:
    device: str
    model: str
    input_size: int
    train_batch: int
    infer_batch: int
    steps: int  # timed benchmark steps per path
    compile_backend: str
    ddp_steps: int
    limits_s: dict  # per part


MODES = {
    "gpu": Mode("cuda", "mae_vit_large_patch7", 224, 32, 64, 3, "inductor", 4,
                {"train_eager": 50, "inference_eager": 50, "train_compile": 170, "inference_compile": 120,
                 "ddp": 80}),
    "cpu": Mode("cpu", "mae_vit_tiny_patch7", 28, 2, 2, 1, "eager", 2,
                {"train_eager": 120, "inference_eager": 120, "train_compile": 180, "inference_compile": 180,
                 "ddp": 180}),
}
BENCH_PARTS = ("train_eager", "inference_eager", "train_compile", "inference_compile")


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description="GPU check: the large/224 benchmark at GPU batch sizes (eager and "
                                          "torch.compile), host syncs, a 1-process torchrun DDP training, "
                                          "peak memory; writes one JSON. --mode cpu: the tiny version the tests run.",
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("--mode", choices=list(MODES), default="gpu", help="gpu: one CUDA GPU; cpu: tiny smoke run")
    p.add_argument("--output", default="gpu_check.json", help="the JSON file to write")
    p.add_argument("--budget_s", type=float, default=450.0,
                   help="wall-clock budget of all parts together (each part also has its own limit)")
    p.add_argument("--ddp_worker", action="store_true", help=argparse.SUPPRESS)  # run under torchrun by the check
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# ---- the DDP worker (runs under torchrun) ---------------------------------------------------------
def ddp_worker(mode_name: str, output: Path) -> None:
    """A few DDP training steps through main_train's building blocks over a real process group."""
    import torch.distributed as dist

    import main_train
    from benchmark import PeakMemory, tensor_mib, write_json_atomic
    from engine import train_one_epoch
    from lora_utils import unmerged_state_dict
    from models_mae import create_model
    from util import distributed as dist_util
    from util.misc import resolve_amp

    mode = MODES[mode_name]
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if mode.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        # the "pretrained" weights: a freshly initialised model's own tensors, in a file as --pretrained reads it
        weights = output.with_suffix(".weights.pth")
        torch.manual_seed(0)
        reference = create_model(mode.model, img_size=mode.input_size, lora_rank=0).state_dict()
        torch.save({"model": reference}, weights)
        amp_dtype = resolve_amp("auto", device)
        model = main_train.build_model(mode.model, mode.input_size, False, 8, 8.0, 0.0, ["qkv", "proj"], str(weights),
                                       "random", freeze=True, verbose=False, amp_dtype=amp_dtype).to(device)
        wrapped = main_train.wrap_model(model, device, distributed=True, compile_model=False)
        optimizer = main_train.build_optimizer(model, 1e-4, 0.001, device)
        batches = [torch.randn(mode.train_batch, 3, mode.input_size, mode.input_size) for _ in range(mode.ddp_steps)]
        mem = PeakMemory(device)
        mem.reset()
        stats = train_one_epoch(wrapped, batches, optimizer, device=device, epoch=0, epochs=1, base_lr=1e-4,
                                min_lr=0.0, warmup_epochs=0, mask_ratio=0.75, amp_dtype=amp_dtype,
                                print_freq=mode.ddp_steps, show_progress=False)
        peak_mib = tensor_mib(model) + mem.growth_mib()
        fingerprint = dist_util.check_replicas_in_sync(model)
        saved = unmerged_state_dict(model)
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        result = {
            "backend": dist.get_backend(), "world_size": dist.get_world_size(), "device": str(device),
            "model": mode.model, "input_size": mode.input_size, "batch_size": mode.train_batch,
            "steps": stats["steps"], "train_loss": stats["train_loss"], "images_per_s": stats["images_per_s"],
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
            "frozen_stored_as": str(model.blocks[0].attn.qkv.weight.dtype).replace("torch.", ""),
            "replica_fingerprint": fingerprint,
            "frozen_tensors": len(frozen),
            "checkpoint_frozen_exact": bool(frozen) and all(torch.equal(saved[k].cpu(), reference[k]) for k in frozen),
            "peak_mem_mib": peak_mib,
        }
        weights.unlink()
        write_json_atomic(result, output)
    finally:
        dist.destroy_process_group()


# ---- the check -----------------------------------------------------------------------------------
def part_command(mode_name: str, name: str, workdir: Path) -> list[str]:
    mode = MODES[mode_name]
    if name == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                str(ROOT / "scripts" / "gpu_check.py"), "--ddp_worker", "--mode", mode_name,
                "--output", str(workdir / "ddp.json")]
    phase, kind = name.split("_")
    batch = mode.train_batch if phase == "train" else mode.infer_batch
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", mode.model,
           "--input_size", str(mode.input_size), "--batch_size", str(batch), "--device", mode.device,
           "--only", phase, "--steps", str(mode.steps), "--warmup", "1", "--json", str(workdir / f"{name}.json")]
    if kind == "compile":
        cmd += ["--compile", "--compile_backend", mode.compile_backend]
    return cmd


def run_part(cmd: list[str], limit_s: float) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        lines = [line for line in proc.stderr.splitlines() if line.strip(" =-_")]  # torchrun draws rules
        error = None if proc.returncode == 0 else (lines or ["(no output)"])[-1].strip()
        code: Optional[int] = proc.returncode
    except subprocess.TimeoutExpired:
        error, code = f"timed out after {limit_s:.0f}s", None
    return {"ok": error is None, "returncode": code, "wall_s": time.perf_counter() - start, "error": error}


def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def summarise(mode_name: str, parts: dict, results: dict, elapsed_s: float) -> dict:
    mode = MODES[mode_name]
    bench = {}
    for name in BENCH_PARTS:
        phase, kind = name.split("_")
        if results.get(name) is not None:
            bench.setdefault(phase, {})[kind] = {**results[name][phase], "peak_gflops": results[name]["peak_gflops"],
                                                  "batch_size": results[name]["batch_size"]}
    machine = next((r["machine"] for r in results.values() if r and "machine" in r), None)
    eager_train, eager_infer = results.get("train_eager"), results.get("inference_eager")
    peak_memory = {f"{name}_fast": results[name][name.split("_")[0]]["fast_peak_mem_mib"]
                   for name in BENCH_PARTS if results.get(name) is not None}
    if results.get("ddp") is not None:
        peak_memory["ddp_train"] = results["ddp"]["peak_mem_mib"]
    return {
        "mode": mode_name, "model": mode.model, "input_size": mode.input_size,
        "train_batch": mode.train_batch, "inference_batch": mode.infer_batch,
        "ok": all(p["ok"] for p in parts.values()), "elapsed_s": elapsed_s, "machine": machine,
        "benchmark": bench,
        "host_syncs": {"train_step": eager_train["fast_path"].get("train_step_host_syncs") if eager_train else None,
                       "scoring_batch": eager_infer["fast_path"].get("inference_host_syncs") if eager_infer else None},
        "ddp": results.get("ddp"),
        "peak_memory_mib": peak_memory,
        "parts": parts,
    }


def run_check(mode_name: str, output: Path, budget_s: float) -> dict:
    from benchmark import write_json_atomic

    mode = MODES[mode_name]
    if mode.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--mode gpu: no CUDA GPU is visible to PyTorch; use --mode cpu for the CPU smoke run")
    if not output.resolve().parent.is_dir():
        raise UserError(f"--output {output}: folder {output.resolve().parent} does not exist")
    start = time.perf_counter()
    parts, results = {}, {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)
        for name in (*BENCH_PARTS, "ddp"):
            left = budget_s - (time.perf_counter() - start)
            if left < 5:
                parts[name] = {"ok": False, "returncode": None, "wall_s": 0.0, "error": "skipped: --budget_s spent"}
                continue
            print(f"gpu_check: {name} (limit {min(mode.limits_s[name], left):.0f}s)", flush=True)
            parts[name] = run_part(part_command(mode_name, name, workdir), min(mode.limits_s[name], left))
            results[name] = read_json(workdir / f"{name}.json") if parts[name]["ok"] else None
            if not parts[name]["ok"]:
                print(f"gpu_check: {name} failed: {parts[name]['error']}", file=sys.stderr, flush=True)
    summary = summarise(mode_name, parts, results, time.perf_counter() - start)
    write_json_atomic(summary, output)
    return summary


def main(args: argparse.Namespace) -> int:
    if args.ddp_worker:
        ddp_worker(args.mode, Path(args.output))
        return 0
    summary = run_check(args.mode, Path(args.output), args.budget_s)
    failed = [name for name, part in summary["parts"].items() if not part["ok"]]
    verdict = f"failed parts: {', '.join(failed)}" if failed else "all parts ok"
    print(f"gpu_check ({args.mode}): {verdict} in {summary['elapsed_s']:.0f}s; wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    sys.exit(run_cli(main, _args))
