"""The GPU check: one command, at most 8 minutes on one GPU, one JSON (run by scripts/gpu_check.sh).

    scripts/gpu_check.sh --output gpu_check.json             one CUDA GPU: mae_vit_large_patch7 at 224 px
    scripts/gpu_check.sh --mode cpu --output cpu_check.json  the small CPU mode the tests run

Parts, each in its own process with its own time limit (a part that fails or runs out of time is
recorded with its error and the others still run; the whole check stays within --budget_s). The GPU
mode runs inference_eager, inference_compile, ddp, train_cli, jobs and demo; the CPU mode all of them:
  train_eager, inference_eager      scripts/benchmark.py in bf16 (autocast 'auto'): the training step
                                    at batch 32 (--only train) and scoring at batch 64 (--only
                                    inference), naive vs fast, with the fraction of the matmul peaks,
                                    peak memory and, on CUDA, the host synchronisations of one fast
                                    training step and one scoring batch (torch.cuda.set_sync_debug_mode;
                                    both should be 0)
  train_compile, inference_compile  the same with --compile
  train_cli                         the original recipe through main_train.py itself (run in-process):
                                    mae_vit_large_patch7 at 224 px, batch 32, --pretrained weights with
                                    --freeze_non_lora (LoRA trained), bf16, on 219 images (a category's
                                    size) resident on the GPU, fused AdamW (--train_compile_mode adds a
                                    torch.compile mode): images/s over the epochs after the first (wall
                                    clock, device synchronised at both ends), the projected time of the
                                    original recipe (4000 epochs x 219 images = 876,000 images), the
                                    host syncs per training step counted in every epoch after the first
                                    (sync debug mode, with the source lines that caused them), then the
                                    host syncs per scoring batch of engine.run_inference (batch 64)
  jobs                              scripts/run_mvtec.py --gpus 0 --jobs_per_gpu 3 over 3 categories with
                                    the same recipe for a few epochs: results.json's aggregate images/s
                                    (start-up and scoring included) and the sum of the jobs' per-epoch
                                    images/s after their first epoch (training side by side)
  demo                              `make demo RECIPE=gpu`'s commands (from make -n) with this Python:
                                    the time of each step and in all, and the demo's metrics
  ddp                               torchrun --nproc_per_node 1 running this script's DDP worker: a few
                                    steps of main_train's training (frozen pretrained base stored in
                                    bf16, LoRA trained) in DistributedDataParallel over an NCCL process
                                    group (gloo in the CPU mode), the replica check, and whether the
                                    frozen tensors of the checkpoint equal the weights file bit for bit.
                                    (main_train.py itself creates no process group for one process.)
The CPU mode runs the same parts with a tiny model at 28 px, batch 2, one timed step, gloo, the
eager compile backend (dynamo traces the model, no code generation), a few epochs, run_mvtec without
--gpus and the CPU demo recipe cut to one epoch at 28 px and ten head steps, so that it takes
minutes, not many.

JSON: mode, machine, elapsed_s, ok (every part succeeded), benchmark (phase -> eager/compile ->
the benchmark's numbers), host_syncs {train_step, scoring_batch} (from train_cli: the real loops;
null off CUDA) and benchmark_host_syncs (the benchmark's bare step and call), original_recipe
(train_cli's numbers), jobs, demo, ddp, peak_memory_mib, parts (per part: ok, returncode, wall_s, error).
"""
import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

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
    limits_s: dict  # per part; the mode runs these parts, in this order
    train_images: int  # train_cli's category (MVTec AD's largest has 219 training images)
    cli_epochs: int  # train_cli's epochs (the first is warm-up)
    jobs: int  # the jobs part: categories, and --jobs_per_gpu on CUDA
    job_epochs: int
    demo_overrides: tuple = ()  # make variables of the demo part
    budget_s: float = 470.0  # --budget_s default: all parts together


MODES = {
    "gpu": Mode("cuda", "mae_vit_large_patch7", 224, 32, 64, 3, "inductor", 4,
                {"inference_eager": 35, "inference_compile": 80, "ddp": 35, "train_cli": 100, "jobs": 110,
                 "demo": 110},
                train_images=219, cli_epochs=30, jobs=3, job_epochs=12, demo_overrides=("RECIPE=gpu",)),
    "cpu": Mode("cpu", "mae_vit_tiny_patch7", 28, 2, 2, 1, "eager", 2,
                # generous: the tests run this mode on shared 2-core machines under load
                {"train_eager": 240, "inference_eager": 240, "train_compile": 300, "inference_compile": 300,
                 "ddp": 240, "train_cli": 240, "jobs": 600, "demo": 600},
                train_images=8, cli_epochs=3, jobs=2, job_epochs=2,
                demo_overrides=("RECIPE=cpu", "EPOCHS=1", "INPUT_SIZE=28", "HEAD_STEPS=10", "DEVICE=cpu"),
                budget_s=2700.0),
}
BENCH_PARTS = ("train_eager", "inference_eager", "train_compile", "inference_compile")
ORIGINAL_RECIPE_IMAGES = 4000 * 219  # --epochs 4000 over MVTec AD's largest training set


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description="GPU check: the large/224 benchmark at GPU batch sizes (eager and "
                                          "torch.compile), host syncs, a 1-process torchrun DDP training, "
                                          "peak memory; writes one JSON. --mode cpu: the tiny version the tests run.",
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("--mode", choices=list(MODES), default="gpu", help="gpu: one CUDA GPU; cpu: tiny smoke run")
    p.add_argument("--output", default="gpu_check.json", help="the JSON file to write")
    p.add_argument("--budget_s", type=float, default=None,
                   help="wall-clock budget of all parts together in seconds (each part also has its own limit); "
                        "default: 470 in the gpu mode, 2700 in the cpu mode")
    p.add_argument("--train_compile_mode", default=None, choices=main_train_compile_modes(),
                   help="train_cli: also pass main_train.py --compile_mode (e.g. reduce-overhead: CUDA graphs)")
    p.add_argument("--worker", choices=("ddp", "train_cli"), help=argparse.SUPPRESS)  # a part's own process
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main_train_compile_modes() -> tuple[str, ...]:
    import main_train
    return main_train.COMPILE_MODES


# ---- shared by the workers -------------------------------------------------------------------------
def write_weights(model_name: str, input_size: int, path: Path) -> dict:
    """A freshly initialised model's tensors as a --pretrained file (what an official checkpoint gives)."""
    from models_mae import create_model

    torch.manual_seed(0)
    reference = create_model(model_name, img_size=input_size, lora_rank=0).state_dict()
    torch.save({"model": reference}, path)
    return reference


def write_category(root: Path, train_images: int, size: int, test_images: int = 0, seed: int = 0) -> Path:
    """A category of random-noise PNGs (speed does not depend on the pictures): train/good, and with
    test_images, test/good and test/bad with masks (half each)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)

    def png(path: Path, mode: str = "RGB") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)

    for i in range(train_images):
        png(root / "train" / "good" / f"{i:03d}.png")
    for i in range(test_images):
        bad = i % 2 == 1
        png(root / "test" / ("bad" if bad else "good") / f"{i:03d}.png")
        if bad:
            png(root / "ground_truth" / "bad" / f"{i:03d}_mask.png", "L")
    return root


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[Counter]:
    """CUDA: the synchronising calls made inside the block (torch.cuda.set_sync_debug_mode('warn')),
    counted per source line ('file:line'); the Counter stays empty off CUDA."""
    sites: Counter = Counter()
    if device.type != "cuda":
        yield sites
        return
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites.update(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


# ---- the DDP worker (runs under torchrun) ---------------------------------------------------------
def ddp_worker(mode_name: str, output: Path) -> None:
    """A few DDP training steps through main_train's building blocks over a real process group."""
    import torch.distributed as dist

    import main_train
    from benchmark import PeakMemory, tensor_mib, write_json_atomic
    from engine import train_one_epoch
    from lora_utils import unmerged_state_dict
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
        reference = write_weights(mode.model, mode.input_size, weights)
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


# ---- the original recipe through main_train.py (runs in its own process) ---------------------------
def recipe_argv(mode: Mode, out: Path, weights: Path, epochs: int) -> list[str]:
    """main_train.py's options of the original recipe (mode's model, size and batch) with the fastest
    settings: the images on the training device, fused AdamW (main_train's default), bf16."""
    return ["--output_dir", str(out), "--model", mode.model, "--input_size", str(mode.input_size),
            "--batch_size", str(mode.train_batch), "--epochs", str(epochs), "--pretrained", str(weights),
            "--freeze_non_lora", "--amp", "bf16", "--holdout", "0", "--save_every", "0", "--num_workers", "0",
            "--print_freq", "1000", "--data_on_device", "on"]


def train_cli_worker(mode_name: str, output: Path, compile_mode: Optional[str]) -> None:
    """main_train.main in this process, its train_one_epoch wrapped to time the epochs and count the
    host syncs of their steps; then the host syncs of engine.run_inference's scoring batches."""
    import main_train
    from benchmark import build_model, fast_scorer, write_json_atomic
    from engine import run_inference

    mode = MODES[mode_name]
    device = torch.device(mode.device)
    work = output.parent / "train_cli"
    data = write_category(work / "data", mode.train_images, mode.input_size)
    weights = work / "weights.pth"
    write_weights(mode.model, mode.input_size, weights)
    epochs: list[dict] = []
    real_epoch = main_train.train_one_epoch

    def timed_epoch(model, loader, *args, **kwargs):
        start = time.perf_counter()
        with count_syncs(device) as sites:
            result = real_epoch(model, loader, *args, **kwargs)
        if kwargs["epoch"] + 1 == kwargs["epochs"] and device.type == "cuda":
            torch.cuda.synchronize(device)  # the last epoch's end, for the wall clock
        epochs.append({"start": start, "end": time.perf_counter(), "steps": len(loader),
                       "images": len(loader) * loader.batch_size, "syncs": sum(sites.values()), "sites": sites})
        return result

    main_train.train_one_epoch = timed_epoch
    argv = [*recipe_argv(mode, work / "out", weights, mode.cli_epochs), "--data_path", str(data),
            "--device", mode.device]
    if compile_mode:
        argv += ["--compile_mode", compile_mode]
    start = time.perf_counter()
    code = main_train.main(main_train.get_args_parser().parse_args(argv))
    total_s = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"main_train.py exited with {code}")
    timed = epochs[1:]  # after the first epoch (allocations, autotuning, compilation)
    images = sum(e["images"] for e in timed)
    wall = timed[-1]["end"] - timed[0]["start"]
    images_per_s = images / wall
    sites = sum((e["sites"] for e in timed), Counter())
    result = {
        "argv": argv, "model": mode.model, "input_size": mode.input_size, "batch_size": mode.train_batch,
        "train_images": mode.train_images, "epochs": len(epochs), "timed_epochs": len(timed),
        "images_per_s": images_per_s, "first_epoch_s": epochs[0]["end"] - epochs[0]["start"],
        "cli_total_s": total_s,
        "projected_original_recipe_min": ORIGINAL_RECIPE_IMAGES / images_per_s / 60,
        "host_syncs_per_step": (sum(e["syncs"] for e in timed) / sum(e["steps"] for e in timed)
                                if device.type == "cuda" else None),
        "host_sync_sites": dict(sites.most_common(10)),
    }
    main_train.train_one_epoch = real_epoch
    # scoring: main_infer's loop (engine.run_inference) over 1 + 3 batches, the first one untimed
    from util.misc import resolve_amp
    amp_dtype = resolve_amp("auto", device)
    scorer = fast_scorer(build_model(mode.model, mode.input_size, 8), 4, "stripes", 4.0, amp_dtype).to(device)
    batches = [{"image": torch.randn(mode.infer_batch, 3, mode.input_size, mode.input_size)} for _ in range(4)]
    list(run_inference(scorer, batches[:1], device, amp_dtype))
    with count_syncs(device) as sites:
        scored = list(run_inference(scorer, batches[1:], device, amp_dtype))
    result["scoring_batches"] = len(scored)
    result["host_syncs_per_scoring_batch"] = sum(sites.values()) / len(scored) if device.type == "cuda" else None
    result["scoring_sync_sites"] = dict(sites.most_common(10))
    write_json_atomic(result, output)


# ---- run_mvtec --jobs_per_gpu and the demo (subprocesses of the check) -----------------------------
def jobs_part(mode_name: str, workdir: Path, limit_s: float) -> dict:
    """scripts/run_mvtec.py over `mode.jobs` categories, on CUDA with --gpus 0 --jobs_per_gpu mode.jobs."""
    mode = MODES[mode_name]
    work = workdir / "jobs"
    for k in range(mode.jobs):
        write_category(work / "root" / f"cat{k}", mode.train_images, mode.input_size, test_images=4, seed=k)
    weights = work / "weights.pth"
    write_weights(mode.model, mode.input_size, weights)
    out = work / "out"
    where = ["--gpus", "0", "--jobs_per_gpu", str(mode.jobs)] if mode.device == "cuda" else ["--device", mode.device]
    cmd = [sys.executable, str(ROOT / "scripts" / "run_mvtec.py"), "--mvtec_root", str(work / "root"), *where,
           *recipe_argv(mode, out, weights, mode.job_epochs), "--no_overlays"]
    part = run_part(cmd, limit_s)
    if not part["ok"]:
        raise RuntimeError(part["error"])
    results = json.loads((out / "results.json").read_text())
    steady = []
    for k in range(mode.jobs):
        log = [json.loads(line) for line in (out / f"cat{k}" / "train" / "log.txt").read_text().splitlines()]
        steady.append(statistics.median(r["images_per_s"] for r in log[1:]) if len(log) > 1 else None)
    return {"categories": mode.jobs, "jobs_per_gpu": mode.jobs if mode.device == "cuda" else 1,
            "epochs": mode.job_epochs, "wall_s": part["wall_s"], "throughput": results["throughput"],
            "per_job_images_per_s": steady,
            "sum_of_jobs_images_per_s": sum(steady) if all(s is not None for s in steady) else None,
            "runs_ok": sum(r["status"] == "ok" for r in results["runs"])}


def demo_commands(overrides: tuple, out: Path) -> list[list[str]]:
    """The python commands `make demo` runs with these make variables, from `make -n`, in order."""
    text = subprocess.run(["make", "-n", "-s", "demo", f"OUT={out}", *overrides], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line) if line.strip() else []
        if len(words) > 1 and words[0].endswith("python") and words[1].endswith(".py"):
            commands.append([sys.executable, *words[1:]])
    return commands


def demo_part(mode_name: str, workdir: Path, limit_s: float) -> dict:
    """`make demo`'s commands (the recipe of mode.demo_overrides) with this interpreter, timed."""
    mode = MODES[mode_name]
    out = workdir / "demo"
    start, steps = time.perf_counter(), {}
    for cmd in demo_commands(mode.demo_overrides, out):
        left = limit_s - (time.perf_counter() - start)
        part = run_part(cmd, left)
        steps[Path(cmd[1]).stem] = part["wall_s"]
        if not part["ok"]:
            raise RuntimeError(f"{Path(cmd[1]).name}: {part['error']}")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "train" / "log.txt").read_text().splitlines()]
    return {"overrides": list(mode.demo_overrides), "total_s": time.perf_counter() - start, "steps_s": steps,
            "train_images_per_s": statistics.median(r["images_per_s"] for r in log[1:]) if len(log) > 1 else None,
            **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}}


# ---- the check -----------------------------------------------------------------------------------
def part_command(mode_name: str, name: str, workdir: Path, compile_mode: Optional[str] = None) -> list[str]:
    mode = MODES[mode_name]
    if name == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                str(ROOT / "scripts" / "gpu_check.py"), "--worker", "ddp", "--mode", mode_name,
                "--output", str(workdir / "ddp.json")]
    if name == "train_cli":
        return [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--worker", "train_cli", "--mode", mode_name,
                "--output", str(workdir / "train_cli.json"), *(["--train_compile_mode", compile_mode] if compile_mode else [])]
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
    cli = results.get("train_cli")
    return {
        "mode": mode_name, "model": mode.model, "input_size": mode.input_size,
        "train_batch": mode.train_batch, "inference_batch": mode.infer_batch,
        "ok": all(p["ok"] for p in parts.values()), "elapsed_s": elapsed_s, "machine": machine,
        "original_recipe": cli,
        "host_syncs": {"train_step": cli["host_syncs_per_step"] if cli else None,
                       "scoring_batch": cli["host_syncs_per_scoring_batch"] if cli else None},
        "inference_frac_bf16_peak": {kind: numbers["fast_frac_bf16_peak"]
                                     for kind, numbers in bench.get("inference", {}).items()},
        "jobs": results.get("jobs"),
        "demo": results.get("demo"),
        "benchmark": bench,
        "benchmark_host_syncs": {
            "train_step": eager_train["fast_path"].get("train_step_host_syncs") if eager_train else None,
            "scoring_batch": eager_infer["fast_path"].get("inference_host_syncs") if eager_infer else None},
        "ddp": results.get("ddp"),
        "peak_memory_mib": peak_memory,
        "parts": parts,
    }


IN_PROCESS_PARTS = {"jobs": jobs_part, "demo": demo_part}  # they start their own subprocesses


def run_one(mode_name: str, name: str, workdir: Path, limit_s: float,
            compile_mode: Optional[str]) -> tuple[dict, Optional[dict]]:
    """One part: its record (ok, returncode, wall_s, error) and its results (None when it failed)."""
    if name in IN_PROCESS_PARTS:
        start = time.perf_counter()
        try:
            result = IN_PROCESS_PARTS[name](mode_name, workdir, limit_s)
        except Exception as e:  # noqa: BLE001 - a failed part is recorded, the others still run
            return {"ok": False, "returncode": None, "wall_s": time.perf_counter() - start,
                    "error": " ".join(f"{type(e).__name__}: {e}".split())}, None
        return {"ok": True, "returncode": 0, "wall_s": time.perf_counter() - start, "error": None}, result
    part = run_part(part_command(mode_name, name, workdir, compile_mode), limit_s)
    return part, read_json(workdir / f"{name}.json") if part["ok"] else None


def run_check(mode_name: str, output: Path, budget_s: float, compile_mode: Optional[str] = None) -> dict:
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
        for name, limit in mode.limits_s.items():
            left = budget_s - (time.perf_counter() - start)
            if left < 5:
                parts[name] = {"ok": False, "returncode": None, "wall_s": 0.0, "error": "skipped: --budget_s spent"}
                continue
            print(f"gpu_check: {name} (limit {min(limit, left):.0f}s)", flush=True)
            parts[name], results[name] = run_one(mode_name, name, workdir, min(limit, left), compile_mode)
            if not parts[name]["ok"]:
                print(f"gpu_check: {name} failed: {parts[name]['error']}", file=sys.stderr, flush=True)
    summary = summarise(mode_name, parts, results, time.perf_counter() - start)
    write_json_atomic(summary, output)
    return summary


def main(args: argparse.Namespace) -> int:
    if args.worker == "ddp":
        ddp_worker(args.mode, Path(args.output))
        return 0
    if args.worker == "train_cli":
        train_cli_worker(args.mode, Path(args.output), args.train_compile_mode)
        return 0
    budget_s = args.budget_s if args.budget_s is not None else MODES[args.mode].budget_s
    summary = run_check(args.mode, Path(args.output), budget_s, args.train_compile_mode)
    failed = [name for name, part in summary["parts"].items() if not part["ok"]]
    verdict = f"failed parts: {', '.join(failed)}" if failed else "all parts ok"
    print(f"gpu_check ({args.mode}): {verdict} in {summary['elapsed_s']:.0f}s; wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    sys.exit(run_cli(main, _args))
