"""Train and score every category of an MVTec AD root in one command, with one results table.

    python scripts/run_mvtec.py --mvtec_root ROOT --output_dir OUT [--categories all|a,b,c] [--seeds 0,1,2]
        [--gpus 0,1,2,3 | all] [--jobs_per_gpu N] [--nproc_per_node N] [--save_tiff] [--compare] [--dry_run]
        [--overwrite]
        [main_train.py and main_infer.py options under their own names: --model, --epochs, --num_masks ...]

Each category (raw or prepared layout) is trained by main_train.py and scored by main_infer.py, each a
subprocess whose command line is built from the scripts' own parsers: every option of theirs passes
through, except the per-category ones this runner sets itself. Subprocesses isolate failures (a crash,
an out-of-memory, a diverging run fails its category only) and let one process own each GPU.

Layout (with one seed; with several, OUT/seed<k>/<category>/ and OUT/seed<k>/ for the TIFF maps):
    OUT/run_options.json                the options that define the results; a rerun must repeat them
    OUT/<category>/train/               checkpoints, log.txt, args.json (main_train.py)
    OUT/<category>/                     metrics.json, scores.csv, anomaly_maps/, ... (main_infer.py)
    OUT/<category>/test/<defect>/<id>.tiff   with --save_tiff: MVTec AD's evaluation layout under OUT
    OUT/<category>/train.log, score.log the subprocesses' output
    OUT/<category>/result.json          written last: the category is done and is skipped on a rerun
    OUT/results.csv, results.md, results.json

A rerun with the same options skips categories with a result.json and resumes interrupted training
(main_train.py --resume auto): resuming is not overwriting. OUT must be empty, hold a run of the same
options (resumed), or be given with --overwrite (an earlier run with other options is deleted: its
results.*, run_options.json and category folders, nothing else). main_infer.py always runs with
--overwrite in OUT/<category>: it replaces its own outputs there and keeps train/ and the logs.
Categories run one after the other, or on --gpus from a work queue (one process, or with
--nproc_per_node N one torchrun job of N processes, per GPU group; with --jobs_per_gpu N, N such jobs
share each GPU group at once: a category's training step does not fill a large GPU).
"""
import argparse
import copy
import csv
import io
import json
import os
import queue
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import main_infer  # noqa: E402
import main_train  # noqa: E402
from main_infer import save_text  # noqa: E402
from util.cli import OneLineArgumentParser, UserError, run_cli, warn  # noqa: E402

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
                 "transistor", "zipper")
KINDS = ("texture", "object")
SYNTHETIC_META = ".synthetic_mvtec.json"  # scripts/make_synthetic_mvtec.py's marker, {"kind": ...}
REFERENCE_FILE = REPO / "docs" / "REFERENCE_RESULTS.md"

# Options each category gets from the runner, not from the command line (a --holdout_root holds one
# category's normal images: passed to every category it would calibrate them all on that one).
TRAIN_PER_CATEGORY = ("data_path", "output_dir", "log_dir", "resume", "start_epoch", "seed", "holdout_root")
INFER_PER_CATEGORY = ("checkpoint", "data_path", "images", "output_dir", "split", "save_tiff", "holdout_root",
                      "overwrite")
# Options that change how a run goes, not what it computes: a rerun may change them.
NOT_RESULT_OPTIONS = ("num_workers", "pin_mem", "print_freq", "debug", "device", "wandb_name", "compile",
                      "compile_mode", "data_on_device")

METRICS = (("image_auroc", "image_auroc", "Image AUROC"), ("pixel_auroc", "pixel_auroc", "Pixel AUROC"),
           ("aupro", "aupro", "AUPRO"), ("image_f1max", "image_f1_max", "Image F1-max"),
           ("pixel_f1max", "pixel_f1_max", "Pixel F1-max"))  # (csv column, metrics.json key, title)
CSV_COLUMNS = ("category", "kind", *(m[0] for m in METRICS), "train_minutes", "score_ms_per_image", "epochs",
               "seed")
RESULT_FILE = "result.json"
RUNNER_DESTS = ("mvtec_root", "output_dir", "categories", "seeds", "gpus", "jobs_per_gpu", "nproc_per_node",
                "save_tiff", "kinds", "compare", "overwrite", "dry_run")
ADAPTER_FILE = "adapter.pth"
DEFAULT_TEXT = re.compile(r"\s*\(default: [^()]*(\([^()]*\)[^()]*)*\)")  # a help text's "(default: ...)"


# ---- the parser: the runner's own options + the two scripts' options -----------------------------
def script_parsers() -> dict[str, argparse.ArgumentParser]:
    return {"train": main_train.get_args_parser(), "infer": main_infer.get_args_parser()}


def passed_actions(parser: argparse.ArgumentParser, per_category: tuple[str, ...]) -> list[argparse.Action]:
    """The optional arguments of a script that the runner passes on (argparse keeps them in _actions)."""
    return [a for a in parser._actions
            if a.option_strings and a.dest not in per_category and not isinstance(a, argparse._HelpAction)]


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        "run_mvtec.py",
        description="Train and score every category of an MVTec AD root (raw or prepared layout): one "
                    "main_train.py + main_infer.py run per category and seed, then results.csv / .md / .json. "
                    "Resumable, one failed category does not stop the others, categories spread over GPUs.",
        epilog="Any other option of main_train.py or main_infer.py is passed on under its own name; an option "
               "both scripts have (--batch_size, --num_workers, --amp, --device, --pretrained) goes to both. "
               "Options not given keep each script's own default.")
    g = p.add_argument_group("run_mvtec.py")
    g.add_argument("--mvtec_root", required=True, metavar="ROOT",
                   help="folder whose sub-folders are categories (each with train/ and test/)")
    g.add_argument("--output_dir", required=True, metavar="OUT", help="results go to OUT/<category>/ and OUT/results.*")
    g.add_argument("--categories", default="all", help="all, or a comma-separated list of category folder names")
    g.add_argument("--seeds", default="0", help="comma-separated training seeds; each category runs once per seed")
    g.add_argument("--gpus", default="",
                   help="comma-separated CUDA device ids (or 'all'): categories run concurrently, one per GPU "
                        "(per group of --nproc_per_node GPUs); default: one after the other on --device")
    g.add_argument("--jobs_per_gpu", type=int, default=1,
                   help="with --gpus: categories trained and scored at once on each GPU (group), from one work "
                        "queue; 2-4 keep a large GPU busy where one category's steps leave it idle between kernels")
    g.add_argument("--nproc_per_node", type=int, default=1,
                   help="train each category with torchrun DDP over this many processes (GPUs)")
    g.add_argument("--save_tiff", action="store_true",
                   help="main_infer.py --save_tiff: float32 TIFF maps at the images' own size as "
                        "OUT/<category>/test/<defect>/<id>.tiff (MVTec AD's evaluate_experiment.py layout)")
    g.add_argument("--kinds", default="",
                   help="kind of categories that are not MVTec AD names, e.g. fabric=texture,board=object "
                        "(default: the synthetic generator's marker, else object)")
    g.add_argument("--compare", action="store_true",
                   help="results.md also shows the published numbers of docs/REFERENCE_RESULTS.md")
    g.add_argument("--overwrite", action="store_true",
                   help="OUT holds a run with other options, or other files: delete that run's results "
                        "(results.*, run_options.json, its category folders; other files are kept) and start over. "
                        "Not needed to resume: a rerun with the same options continues where it stopped")
    g.add_argument("--dry_run", action="store_true",
                   help="print the plan (categories, kinds, seeds, each main_train.py / main_infer.py command) "
                        "and exit without writing or running anything")
    taken = {s for a in p._actions for s in a.option_strings}
    parsers = script_parsers()
    train_actions = passed_actions(parsers["train"], TRAIN_PER_CATEGORY)
    infer_actions = passed_actions(parsers["infer"], INFER_PER_CATEGORY)
    infer_flags = {s for a in infer_actions for s in a.option_strings}
    train_flags = {s for a in train_actions for s in a.option_strings}
    infer_default = {s: a.default for a in infer_actions for s in a.option_strings}
    groups = {"train": p.add_argument_group("main_train.py options (default: main_train.py's)"),
              "both": p.add_argument_group("options of both scripts (default: each script's own)"),
              "infer": p.add_argument_group("main_infer.py options (default: main_infer.py's)")}
    for owner, actions, other in (("train", train_actions, infer_flags), ("infer", infer_actions, train_flags)):
        for action in actions:
            if taken & set(action.option_strings):
                continue
            shared = bool(other & set(action.option_strings))
            clone = copy.copy(action)
            default_text = str(action.default).replace("%", "%%")
            if shared and action.nargs != 0:  # each script keeps its own default: name both
                default_text = "none" if action.default is None else default_text
                infer_value = infer_default[action.option_strings[0]]
                infer_text = "none" if infer_value is None else str(infer_value).replace("%", "%%")
                both = f"{default_text} in both" if infer_text == default_text else \
                    f"main_train.py {default_text}, main_infer.py {infer_text}"
                clone.help = DEFAULT_TEXT.sub("", clone.help or "").rstrip() + f" (default: {both})"
            elif clone.help and "%(default)s" in clone.help:  # the clone's default is SUPPRESS: spell it out
                clone.help = clone.help.replace("%(default)s", default_text)
            elif clone.help and action.nargs != 0 and action.default is not None and "default" not in clone.help:
                clone.help += f" (default: {default_text})"
            clone.default, clone.required = argparse.SUPPRESS, False  # only what the user gives is passed on
            # argparse has no public way to add an existing Action; _add_action is what add_argument ends with
            groups["both" if shared else owner]._add_action(clone)
            taken.update(action.option_strings)
    return p


def given_options(args: argparse.Namespace, parsers: dict[str, argparse.ArgumentParser]) -> dict[str, Any]:
    """The script options given on the command line (dest -> value): only those are in `args`, since
    the runner's copies of them default to SUPPRESS; the runner's own options are left out."""
    passed = {a.dest for a in passed_actions(parsers["train"], TRAIN_PER_CATEGORY)}
    passed |= {a.dest for a in passed_actions(parsers["infer"], INFER_PER_CATEGORY)}
    return {k: v for k, v in vars(args).items() if k in passed and k not in RUNNER_DESTS}


def option_tokens(parser: argparse.ArgumentParser, values: dict[str, Any]) -> list[str]:
    """Command-line tokens for `parser` that set each dest in `values` (dests it lacks are skipped)."""
    tokens: list[str] = []
    for dest, value in values.items():
        actions = [a for a in parser._actions if a.dest == dest and a.option_strings]
        flags = [a for a in actions if a.nargs == 0]  # store_true / store_false / store_const
        if flags:
            tokens += [a.option_strings[0] for a in flags if a.const == value][:1]
        elif actions and actions[0].nargs == "?" and value == actions[0].const:
            tokens.append(actions[0].option_strings[0])
        elif actions:
            values_ = value if isinstance(value, (list, tuple)) else [value]
            tokens += [actions[0].option_strings[0], *map(str, values_)]
    return tokens


# ---- what to run ---------------------------------------------------------------------------------
@dataclass
class Task:
    category: str
    data_path: Path
    seed: int
    run_dir: Path  # OUT/<category> or OUT/seed<k>/<category>
    tiff_root: Path  # OUT or OUT/seed<k>


@dataclass
class Outcome:
    task: Task
    status: str  # ok, failed, pending (not finished: not started yet, or interrupted)
    reused: bool = False
    record: dict[str, Any] = field(default_factory=dict)  # result.json of an ok run
    stage: str = ""
    error: str = ""


def find_categories(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise UserError(f"--mvtec_root {root} does not exist or is not a folder")
    found = {p.name: p for p in sorted(root.iterdir())
             if not p.name.startswith(".") and (p / "train").is_dir() and (p / "test").is_dir()}
    if not found:
        if (root / "train").is_dir() and (root / "test").is_dir():
            raise UserError(f"--mvtec_root {root} is one category folder; pass the folder that holds the "
                            f"categories ({root.parent})")
        raise UserError(f"--mvtec_root {root} holds no category (no sub-folder with train/ and test/); pass the "
                        f"MVTec AD root, e.g. mvtec_anomaly_detection/")
    return found


def select_categories(found: dict[str, Path], spec: str) -> dict[str, Path]:
    if spec.strip() in ("", "all"):
        return found
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in found]
    if unknown:
        raise UserError(f"--categories: {', '.join(unknown)} not found under --mvtec_root; it holds "
                        f"{', '.join(found)}")
    return {n: found[n] for n in dict.fromkeys(names)}


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not values:
        raise UserError(f"{flag} {text!r}: give at least one value")
    return list(dict.fromkeys(values))


def category_kind(name: str, folder: Path, overrides: dict[str, str]) -> str:
    """texture or object: --kinds, then the official MVTec AD names, then the synthetic generator's marker."""
    if name in overrides:
        return overrides[name]
    if name in MVTEC_TEXTURES:
        return "texture"
    if name in MVTEC_OBJECTS:
        return "object"
    try:
        meta = json.loads((folder / SYNTHETIC_META).read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and "kind" in meta:
        # the generator's kinds are what it draws: its textile is a texture, everything else an object
        return "texture" if meta["kind"] in ("texture", *MVTEC_TEXTURES) else "object"
    warn(f"category {name}: not an MVTec AD name and no {SYNTHETIC_META}; listed with the objects "
         f"(set it with --kinds {name}=texture)")
    return "object"


def parse_kinds(text: str) -> dict[str, str]:
    kinds = {}
    for part in filter(None, (t.strip() for t in text.split(","))):
        name, _, kind = part.partition("=")
        if kind not in KINDS or not name:
            raise UserError(f"--kinds {part!r}: expected NAME=texture or NAME=object")
        kinds[name] = kind
    return kinds


def make_tasks(categories: dict[str, Path], seeds: list[int], out: Path) -> list[Task]:
    """Categories in order for each seed; one seed writes OUT/<category>, several OUT/seed<k>/<category>."""
    tasks = []
    for seed in seeds:
        root = out if len(seeds) == 1 else out / f"seed{seed}"
        tasks += [Task(name, path, seed, root / name, root) for name, path in categories.items()]
    return tasks


# ---- GPUs ----------------------------------------------------------------------------------------
def gpu_slots(spec: str, nproc: int, jobs_per_gpu: int = 1) -> list[Optional[str]]:
    """CUDA_VISIBLE_DEVICES of each worker: [None] (one worker, environment unchanged) without --gpus;
    with them, `jobs_per_gpu` workers per GPU group, the groups taking turns (0,1,0,1 ...)."""
    if nproc < 1:
        raise UserError(f"--nproc_per_node {nproc}: must be at least 1")
    if jobs_per_gpu < 1:
        raise UserError(f"--jobs_per_gpu {jobs_per_gpu}: must be at least 1")
    if not spec:
        if jobs_per_gpu > 1:
            raise UserError(f"--jobs_per_gpu {jobs_per_gpu} needs --gpus (e.g. --gpus 0 or --gpus all)")
        return [None]
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise UserError(f"--gpus {spec}: no CUDA GPU is visible to PyTorch; leave --gpus out to run on the CPU")
    ids = list(range(count)) if spec == "all" else parse_int_list(spec, "--gpus")
    missing = [i for i in ids if not 0 <= i < count]
    if missing:
        raise UserError(f"--gpus {spec}: GPU {missing[0]} does not exist; this machine has {count} "
                        f"(ids 0-{count - 1})")
    if len(ids) % nproc:
        raise UserError(f"--gpus lists {len(ids)} GPUs, not a multiple of --nproc_per_node {nproc}")
    # ids count within the visible devices: map them back through an inherited CUDA_VISIBLE_DEVICES
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = visible.split(",") if visible else [str(i) for i in range(count)]
    groups = [",".join(names[i] for i in ids[k:k + nproc]) for k in range(0, len(ids), nproc)]
    return groups * jobs_per_gpu


# ---- run options: a rerun must compute the same thing --------------------------------------------
def result_options(given: dict[str, Any], parsers: dict[str, argparse.ArgumentParser], nproc: int,
                   seeds: list[int], save_tiff: bool) -> dict[str, Any]:
    """The options that define the results, each script's options where they differ from its defaults."""
    options: dict[str, Any] = {"nproc_per_node": nproc, "seeds": seeds, "save_tiff": save_tiff}
    for name, parser in parsers.items():
        dests = {a.dest for a in parser._actions}
        options[name] = {k: v for k, v in sorted(given.items())
                         if k in dests and k not in NOT_RESULT_OPTIONS and v != parser.get_default(k)}
    return options


def check_output_dir(out: Path, options: dict[str, Any], overwrite: bool, dry_run: bool = False) -> str:
    """Refuse OUT when it holds a run with other options, or files but no run (unless --overwrite,
    which deletes that run's results and nothing else); returns what happens to OUT, in words.
    A run with the same options is resumed. With dry_run nothing is deleted."""
    path = out / "run_options.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    if not path.is_file():
        present = sorted(out.iterdir()) if out.is_dir() else []
        if present and not overwrite:
            raise UserError(f"--output_dir {out} is not empty and holds no run_mvtec.py run ({len(present)} entries, "
                            f"e.g. {present[0].name}); choose another folder, or pass --overwrite to write there "
                            f"(other files are kept)")
        return f"{out}: a new run" + (" (other files there are kept)" if present else "")
    try:
        old = json.loads(path.read_text())
    except ValueError:
        old = {}
    old_options = old.get("options", {})
    differ = [k for k in options if old_options.get(k) != options[k]]
    if not differ:
        return f"{out}: resumes the run there (same options): finished categories are kept, the others continue"
    if not overwrite:
        shown = "; ".join(f"{k}: {old_options.get(k)} there, {options[k]} now" for k in differ)
        raise UserError(f"--output_dir {out} holds a run with other options ({shown}); use another --output_dir, "
                        f"or --overwrite to delete that run's results")
    what = f"{out}: deletes the earlier run with other options ({', '.join(differ)}), then a new run"
    if dry_run:
        return what
    for name in ("results.csv", "results.md", "results.json", "run_options.json"):
        (out / name).unlink(missing_ok=True)
    old_seeds = old_options.get("seeds") or [0]
    roots = [out] if len(old_seeds) == 1 else [out / f"seed{s}" for s in old_seeds]
    for root in roots:
        for category in old.get("categories", []):
            shutil.rmtree(root / category, ignore_errors=True)
        if root != out:
            shutil.rmtree(root, ignore_errors=True)
    return what


def write_run_options(out: Path, options: dict[str, Any], categories: list[str]) -> None:
    path = out / "run_options.json"
    known = json.loads(path.read_text()).get("categories", []) if path.is_file() else []
    record = {"options": options, "categories": sorted(set(known) | set(categories))}
    save_text(path, json.dumps(record, indent=2) + "\n")


# ---- one category --------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything a worker needs, fixed before the first category starts."""
    train_tokens: list[str]
    infer_tokens: list[str]
    nproc: int
    save_tiff: bool
    adapter_only: bool  # --pretrained with --freeze_non_lora: keep the adapter, not the full checkpoints
    wandb_name: Optional[str]
    echo: bool  # copy the subprocesses' output to the console (one worker only)
    threads: Optional[int]  # OMP_NUM_THREADS of concurrent workers: a share of the cores each


def train_argv(plan: Plan, task: Task) -> list[str]:
    argv = [*plan.train_tokens, "--data_path", str(task.data_path), "--output_dir", str(task.run_dir / "train"),
            "--resume", "auto", "--seed", str(task.seed)]
    if plan.wandb_name:
        argv += ["--wandb_name", f"{plan.wandb_name}-{task.category}-seed{task.seed}"]
    return argv


def infer_argv(plan: Plan, task: Task, checkpoint: Path) -> list[str]:
    # --overwrite: OUT/<category> also holds train/ and the logs; a scoring rerun replaces its own outputs
    argv = [*plan.infer_tokens, "--checkpoint", str(checkpoint), "--data_path", str(task.data_path),
            "--output_dir", str(task.run_dir), "--overwrite"]
    if plan.save_tiff:
        argv += ["--save_tiff", str(task.tiff_root)]
    return argv


def train_command(argv: list[str], nproc: int) -> list[str]:
    script = str(REPO / "main_train.py")
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                script, *argv]
    return [sys.executable, script, *argv]


class Children:
    """The running subprocesses, so that an interrupted runner can stop them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, cmd: list[str], env: dict[str, str], log_path: Path, echo: bool) -> int:
        """Run `cmd`, its stdout and stderr going to log_path (and the console when echo); the exit code."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            with self._lock:
                if self.stopping:
                    raise KeyboardInterrupt
                proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                self._procs.add(proc)
            try:
                while chunk := proc.stdout.read1(1 << 16):  # chunks, not lines: progress bars use \r
                    log.write(chunk)
                    log.flush()
                    if echo:
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()
                return proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# exit codes of a subprocess stopped by Ctrl-C or SIGTERM (util.cli's 130, or the signal itself)
INTERRUPTED = (130, -signal.SIGINT, -signal.SIGTERM)


def run_stage(children: Children, cmd: list[str], env: dict[str, str], log_path: Path, echo: bool) -> Optional[str]:
    """Run one subprocess: None when it succeeded, else its one-line error; an interrupted one raises
    KeyboardInterrupt (the task stays pending: a rerun resumes it)."""
    since = log_path.stat().st_size if log_path.is_file() else 0
    code = children.run(cmd, env, log_path, echo)
    if code == 0:
        return None
    if code in INTERRUPTED or children.stopping:
        raise KeyboardInterrupt
    if code < 0:
        return f"killed by signal {-code}"
    with open(log_path, "rb") as f:  # this attempt's output only: the log keeps earlier attempts
        f.seek(since)
        text = f.read().decode(errors="replace")
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]  # util.cli's one-line error
    return (errors or lines or [f"exit code {code}"])[-1].removeprefix("error: ")


def add_train_time(run_dir: Path, seconds: float) -> dict[str, Any]:
    path = run_dir / "train_time.json"
    record = json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "attempts": 0}
    record = {"seconds": record["seconds"] + seconds, "attempts": record["attempts"] + 1}
    save_text(path, json.dumps(record) + "\n")
    return record


def export_category_adapter(checkpoint_path: Path, adapter_path: Path) -> None:
    """Write the checkpoint's trainable tensors (LoRA and re-initialised ones) and its calibration as an
    adapter file."""
    from lora_utils import export_adapter
    from util.checkpoint import read_checkpoint, state_dict_of

    checkpoint = read_checkpoint(checkpoint_path)
    options = checkpoint["args"]
    model = main_train.build_model(
        options["model"], options["input_size"], options["norm_pix_loss"], options["lora_rank"],
        options["lora_alpha"], options["lora_dropout"], options["lora_targets"], options["pretrained"],
        options["patch_embed_init"], options["freeze_non_lora"], verbose=False)
    model.load_state_dict(state_dict_of(checkpoint, checkpoint_path), strict=True)
    calibration = checkpoint.get("calibration")  # the held-out normal maps and thresholds: scoring needs them
    export_adapter(model, adapter_path, options, extra={"calibration": calibration} if calibration else None)


def remove_full_checkpoints(train_dir: Path) -> None:
    for path in train_dir.glob("checkpoint-*.pth"):
        path.unlink()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def images_per_epoch(train_options: dict[str, Any]) -> Optional[int]:
    """Images one epoch trains on, over all processes, from main_train's resolved options: the
    training images (train/good without the held-out ones; all of it with --holdout_root), each
    process's share cut to whole batches (a ragged last batch is dropped unless it is the only one).
    None if unknown."""
    from util.datasets import list_images, train_folder

    held = set() if train_options.get("holdout_root") else set(train_options.get("holdout_files") or [])
    try:
        count = sum(p.name not in held for p in list_images(train_folder(train_options["data_path"])))
    except (KeyError, UserError):
        return None
    world, batch = int(train_options.get("world_size", 1)), int(train_options["batch_size"])
    share = -(-count // world)  # DistributedSampler pads to equal shares
    return world * (share if share < batch else share // batch * batch)


def run_task(task: Task, plan: Plan, gpus: Optional[str], children: Children) -> Outcome:
    """Train (resuming), score, and record one category and seed; failures come back as an Outcome."""
    run_dir, train_dir = task.run_dir, task.run_dir / "train"
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if plan.threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(plan.threads))
    start = time.perf_counter()
    try:
        error = run_stage(children, train_command(train_argv(plan, task), plan.nproc), env, run_dir / "train.log",
                          plan.echo)
    finally:  # an interrupted attempt counts too
        timing = add_train_time(run_dir, time.perf_counter() - start)
    if error:
        return Outcome(task, "failed", stage="train", error=error)
    checkpoint = train_dir / "checkpoint-last.pth"
    if plan.adapter_only:
        try:
            export_category_adapter(checkpoint, train_dir / ADAPTER_FILE)
        except Exception as e:  # noqa: BLE001 - any failure fails this category only
            return Outcome(task, "failed", stage="adapter", error=" ".join(str(e).split()))
        checkpoint = train_dir / ADAPTER_FILE
    error = run_stage(children, [sys.executable, str(REPO / "main_infer.py"), *infer_argv(plan, task, checkpoint)],
                      env, run_dir / "score.log", plan.echo)
    if error:
        return Outcome(task, "failed", stage="score", error=error)
    metrics, infer_options = read_json(run_dir / "metrics.json"), read_json(run_dir / "args.json")
    record = {
        "category": task.category, "seed": task.seed,
        **{column: metrics.get(key) for column, key, _ in METRICS},
        "train_minutes": timing["seconds"] / 60, "train_attempts": timing["attempts"],
        "score_ms_per_image": 1000 * metrics["score_seconds_per_image"],
        "epochs": infer_options["checkpoint_args"]["epochs"], "device": infer_options["device"],
        "images_per_epoch": images_per_epoch(infer_options["checkpoint_args"]),
        "amp": infer_options["amp"], "checkpoint": str(checkpoint.relative_to(run_dir)),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_text(run_dir / RESULT_FILE, json.dumps(record, indent=2) + "\n")
    if plan.adapter_only:
        remove_full_checkpoints(train_dir)
    return Outcome(task, "ok", record=record)


def finished_outcome(task: Task, adapter_only: bool) -> Optional[Outcome]:
    """The Outcome of a task done by an earlier run (its result.json), or None."""
    path = task.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    if adapter_only:  # killed between result.json and the clean-up
        remove_full_checkpoints(task.run_dir / "train")
    return Outcome(task, "ok", reused=True, record=read_json(path))


# ---- the work queue ------------------------------------------------------------------------------
def run_all(tasks: list[Task], plan: Plan, slots: list[Optional[str]], children: Children,
            on_done: Callable[[Outcome], None]) -> None:
    """Run the tasks, one worker thread per slot pulling from a shared queue; on_done after each."""
    work: "queue.Queue[Task]" = queue.Queue()
    for task in tasks:
        work.put(task)

    def worker(gpus: Optional[str]) -> None:
        while not children.stopping:
            try:
                task = work.get_nowait()
            except queue.Empty:
                return
            where = "CPU/default device" if gpus is None else f"GPU {gpus}"
            print(f"{task.category} (seed {task.seed}): training and scoring on {where}; logs in {task.run_dir}",
                  flush=True)
            try:
                outcome = run_task(task, plan, gpus, children)
            except KeyboardInterrupt:
                if children.stopping:
                    return
                # its subprocess alone was stopped (SIGINT/SIGTERM from outside): the others go on
                outcome = Outcome(task, "pending", stage="interrupted", error="stopped; a rerun resumes it")
            except Exception as e:  # noqa: BLE001 - the runner's own failure for this task: report, go on
                outcome = Outcome(task, "failed", stage="runner", error=f"{type(e).__name__}: {e}")
            on_done(outcome)

    threads = [threading.Thread(target=worker, args=(gpus,), daemon=True) for gpus in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # short joins: Ctrl-C and SIGTERM reach the main thread


# ---- results -------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pct(value: Optional[float], std: Optional[float] = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def table_rows(records: list[dict[str, Any]], kinds: dict[str, str]) -> list[dict[str, Any]]:
    """One row per category (textures, then objects, each by name) with the mean and std over seeds, and
    the Mean row: the mean over categories for each seed, then mean and std of those over the seeds."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_category.setdefault(record["category"], []).append(record)
    order = sorted(by_category, key=lambda c: (KINDS.index(kinds[c]), c))
    columns = [m[0] for m in METRICS] + ["train_minutes", "score_ms_per_image"]

    def summarise(name: str, kind: str, groups: list[list[float]]) -> dict[str, Any]:
        row: dict[str, Any] = {"category": name, "kind": kind}
        for column, values in zip(columns, groups):
            row[column] = _mean_std(values) if values else (None, None)
        return row

    rows = [summarise(c, kinds[c], [[r[col] for r in by_category[c] if r[col] is not None] for col in columns])
            for c in order]
    seeds = sorted({r["seed"] for r in records})
    per_seed = []
    for col in columns:
        means = []
        for seed in seeds:
            values = [r[col] for r in records if r["seed"] == seed and r[col] is not None]
            if values:
                means.append(statistics.fmean(values))
        per_seed.append(means)
    if rows:
        rows.append(summarise("Mean", "", per_seed))
    return rows


def results_csv(records: list[dict[str, Any]], kinds: dict[str, str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in sorted(records, key=lambda r: (KINDS.index(kinds[r["category"]]), r["category"], r["seed"])):
        row = {**r, "kind": kinds[r["category"]]}
        writer.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                         for c in CSV_COLUMNS])
    return buf.getvalue()


def results_markdown(rows: list[dict[str, Any]], outcomes: list[Outcome], seeds: list[int],
                     reference: Optional[dict[str, dict[str, dict[str, float]]]]) -> str:
    seed_note = (f"mean ± std (sample std) over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
                 else f"seed {seeds[0]}")
    lines = [f"# MVTec AD results ({seed_note})", "",
             "Metrics in %. Train: minutes of training; score: ms per image of the scoring pass.", "",
             "| Category | Kind | " + " | ".join(m[2] for m in METRICS) + " | Train min | Score ms/img |",
             "|---|---|" + "---:|" * (len(METRICS) + 2)]
    for row in rows:
        cells = [_pct(*row[m[0]]) for m in METRICS]
        cells += ["–" if value is None else f"{value:.1f}"
                  for value in (row["train_minutes"][0], row["score_ms_per_image"][0])]
        name = f"**{row['category']}**" if row["category"] == "Mean" else row["category"]
        lines.append(f"| {name} | {row['kind']} | " + " | ".join(cells) + " |")
    failed = [o for o in outcomes if o.status != "ok"]
    if failed:
        lines += ["", "Not in the table:"]
        lines += [f"- {o.task.category} (seed {o.task.seed}): {o.status}"
                  + (f" in {o.stage}: {o.error}" if o.error else "") for o in failed]
    if reference is not None:
        lines += ["", *comparison_markdown(rows, reference)]
    return "\n".join(lines) + "\n"


def parse_reference(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """docs/REFERENCE_RESULTS.md's tables: {metric title: {method: {category: percent}}}; a table
    belongs to the `## ` heading above it and starts with a `| Category |` header row."""
    tables: dict[str, dict[str, dict[str, float]]] = {}
    heading, header = "", None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, header = line[3:].strip(), None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            header = None
        elif cells[0].lower() == "category":
            header = cells
            tables.setdefault(heading, {m: {} for m in cells[1:]})
        elif header and not set(cells[0]) <= set("-: "):
            for method, cell in zip(header[1:], cells[1:]):
                try:
                    tables[heading][method][cells[0].lower()] = float(cell)
                except ValueError:
                    pass  # not published / not verified
    return tables


def comparison_markdown(rows: list[dict[str, Any]], reference: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [f"## Published results ({REFERENCE_FILE.relative_to(REPO)}; – = not listed there)"]
    for column, _, title in METRICS:
        table = next((t for heading, t in reference.items() if heading.lower().startswith(title.lower())), None)
        if not table:
            continue
        methods = list(table)
        lines += ["", f"{title} (%)", "", "| Category | this run | " + " | ".join(methods) + " |",
                  "|---|" + "---:|" * (len(methods) + 1)]
        for row in rows:
            key = row["category"].lower()
            published = [f"{table[m][key]:.1f}" if key in table[m] else "–" for m in methods]
            lines.append(f"| {row['category']} | {_pct(row[column][0])} | " + " | ".join(published) + " |")
    return lines


def environment() -> dict[str, Any]:
    import platform

    import torch

    versions = {"python": platform.python_version()}
    for package in ("torch", "timm", "loralib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = platform.processor() or platform.machine()
        try:
            names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")]
            device = f"{names[0]} ({len(names)} logical CPUs)" if names else device
        except OSError:
            pass
    return {"git_commit": commit, "git_dirty": dirty, "versions": versions, "device_name": device}


class Results:
    """Every task's Outcome, and results.csv / .md / .json rewritten after each one (thread-safe)."""

    def __init__(self, out: Path, tasks: list[Task], kinds: dict[str, str], seeds: list[int],
                 info: dict[str, Any], compare: bool) -> None:
        self.out, self.kinds, self.seeds, self.info = out, kinds, seeds, info
        self.reference = parse_reference(REFERENCE_FILE.read_text()) if compare else None
        self.outcomes = {id(t): Outcome(t, "pending") for t in tasks}
        self.lock = threading.RLock()
        self.started = time.perf_counter()
        self.last_done: Optional[float] = None  # when the last category run by this invocation finished

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes[id(outcome.task)] = outcome
            if outcome.status == "ok" and not outcome.reused:
                self.last_done = time.perf_counter()
            self.write()
        task, r = outcome.task, outcome.record
        if outcome.reused:
            print(f"{task.category} (seed {task.seed}): done earlier ({task.run_dir / RESULT_FILE}), skipped")
        elif outcome.status == "ok":
            print(f"{task.category} (seed {task.seed}): image AUROC {_pct(r['image_auroc'])}, pixel AUROC "
                  f"{_pct(r['pixel_auroc'])}, AUPRO {_pct(r['aupro'])}; {r['train_minutes']:.1f} min training",
                  flush=True)
        else:
            print(f"{task.category} (seed {task.seed}): {outcome.status.upper()} in {outcome.stage}: {outcome.error}",
                  flush=True)

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.status != "ok"]

    def write(self) -> None:
        with self.lock:  # one writer at a time: the temporary file names are per process
            outcomes = list(self.outcomes.values())
            records = [o.record for o in outcomes if o.status == "ok"]
            rows = table_rows(records, self.kinds)
            save_text(self.out / "results.csv", results_csv(records, self.kinds))
            save_text(self.out / "results.md", results_markdown(rows, outcomes, self.seeds, self.reference))
            runs = [{**o.record, "category": o.task.category, "seed": o.task.seed, "kind": self.kinds[o.task.category],
                     "status": o.status, "reused": o.reused, "stage": o.stage or None, "error": o.error or None,
                     "run_dir": str(o.task.run_dir)} for o in outcomes]
            table = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()} for row in rows]
            save_text(self.out / "results.json",
                      json.dumps({**self.info, "runs": runs, "table": table, "throughput": self.throughput()},
                                 indent=2) + "\n")

    def throughput(self) -> dict[str, Any]:
        """Images trained per second over all the categories this invocation trained (not the reused
        ones): every epoch of every finished category (a resumed one counts its earlier epochs too),
        over the wall time from the start to the last finish, scoring included."""
        done = [o.record for o in self.outcomes.values() if o.status == "ok" and not o.reused]
        images = sum((r.get("images_per_epoch") or 0) * r["epochs"] for r in done)
        wall = (self.last_done - self.started) if self.last_done is not None else 0.0
        return {"categories": len(done), "images_trained": images, "wall_s": wall,
                "images_per_s": images / wall if wall > 0 else None}


# ---- main ----------------------------------------------------------------------------------------
def build_plan(args: argparse.Namespace, given: dict[str, Any], parsers: dict[str, argparse.ArgumentParser],
               workers: int) -> Plan:
    """The options passed on to each script, checked once with the scripts' own parsers and checks."""
    train_tokens = option_tokens(parsers["train"], {k: v for k, v in given.items() if k != "wandb_name"})
    infer_tokens = option_tokens(parsers["infer"], given)
    train_args = parsers["train"].parse_args([*train_tokens, "--data_path", "."])
    parsers["infer"].parse_args([*infer_tokens, "--checkpoint", "c", "--data_path", ".", "--output_dir", "."])
    main_train.validate_args(train_args)
    # Inputs every category reads: a missing one fails here, not in each category after decoding its images.
    if train_args.pretrained and not Path(train_args.pretrained).is_file():
        raise UserError(f"--pretrained {train_args.pretrained} does not exist; pass the weights file to start from "
                        f"(weights/*.pth, an official MAE checkpoint), or leave --pretrained out")
    if args.gpus and given.get("device", "auto") not in ("auto", "cuda"):
        raise UserError(f"--device {given['device']} with --gpus: leave --device out; each worker sees only its GPUs")
    return Plan(train_tokens, infer_tokens, args.nproc_per_node, args.save_tiff,
                adapter_only=bool(train_args.pretrained) and train_args.freeze_non_lora,
                wandb_name=given.get("wandb_name"), echo=workers == 1,
                # several processes each using every core would spin against each other
                threads=max(1, (os.cpu_count() or 1) // (workers * args.nproc_per_node)) if workers > 1 else None)


def plan_lines(tasks: list[Task], kinds: dict[str, str], plan: Plan, slots: list[Optional[str]],
               folder: str) -> list[str]:
    """--dry_run: what a run would do, and each category's two commands (the checkpoint main_infer.py
    gets is the one training leaves: checkpoint-last.pth, or the adapter with --freeze_non_lora)."""
    where = ", ".join(f"GPUs {s}" for s in slots) if slots != [None] else "one category at a time"
    lines = ["dry run: nothing is written or run", f"output: {folder}", f"workers: {where}",
             f"{len(tasks)} run(s):"]
    for task in tasks:
        done = (task.run_dir / RESULT_FILE).is_file()
        checkpoint = task.run_dir / "train" / (ADAPTER_FILE if plan.adapter_only else "checkpoint-last.pth")
        lines += [f"  {task.category} ({kinds[task.category]}), seed {task.seed}: "
                  f"{'finished, kept' if done else 'train, then score'}"]
        if not done:
            lines += [f"    {shlex.join(train_command(train_argv(plan, task), plan.nproc))}",
                      f"    {shlex.join([sys.executable, str(REPO / 'main_infer.py'), *infer_argv(plan, task, checkpoint)])}"]
    return lines


def raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop like Ctrl-C (the running subprocesses are terminated, results written)."""
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    parsers = script_parsers()
    given = given_options(args, parsers)
    root, out = Path(args.mvtec_root), Path(args.output_dir)
    categories = select_categories(find_categories(root), args.categories)
    overrides = parse_kinds(args.kinds)
    kinds = {name: category_kind(name, path, overrides) for name, path in categories.items()}
    seeds = parse_int_list(args.seeds, "--seeds")
    slots = gpu_slots(args.gpus, args.nproc_per_node, args.jobs_per_gpu)
    plan = build_plan(args, given, parsers, len(slots))
    options = result_options(given, parsers, args.nproc_per_node, seeds, args.save_tiff)
    folder = check_output_dir(out, options, args.overwrite, dry_run=args.dry_run)
    if args.dry_run:
        print("\n".join(plan_lines(make_tasks(categories, seeds, out), kinds, plan, slots, folder)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_run_options(out, options, list(categories))
    info = {"run_mvtec_options": {dest: getattr(args, dest) for dest in RUNNER_DESTS}, "script_options": given,
            "result_options": options, **environment()}
    tasks = make_tasks(categories, seeds, out)
    results = Results(out, tasks, kinds, seeds, info, args.compare)
    todo = []
    for task in tasks:
        done = finished_outcome(task, plan.adapter_only)
        if done is None:
            todo.append(task)
        else:
            results.add(done)
    results.write()
    children = Children()
    try:
        run_all(todo, plan, slots, children, results.add)
    except KeyboardInterrupt:
        children.stop()
        results.write()
        raise
    print(f"\nresults: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}")
    print((out / "results.md").read_text())
    failed = results.failed()
    if failed:
        names = ", ".join(f"{o.task.category} (seed {o.task.seed})" for o in failed)
        print(f"error: {len(failed)} of {len(tasks)} runs did not finish: {names}; see results.json and their logs",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_interrupt)
    sys.exit(run_cli(main, get_args_parser().parse_args()))
