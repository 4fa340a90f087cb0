"""Export a trained category to ONE deployable file: ONNX (onnxruntime) or TorchScript.

    python scripts/export.py --checkpoint CKPT --output capsule.onnx --format onnx [--batch_size N | --dynamic_batch]
    python scripts/export.py --checkpoint CKPT --output capsule.pt --format torchscript

The file holds the scorer exactly as main_infer.py scores by default, as one graph: the ImageNet
normalisation, LoRA merged into the weights, the K deterministic masks and their indices as
constants, the Gaussian smoothing, the calibration and the threshold (main_infer.load_scoring
with the default scoring options, in fp32; a checkpoint without calibration needs --threshold).

    input   image             uint8 RGB [N, S, S, 3], already resized to the input size S (bicubic)
    outputs score             float32 [N]        the image anomaly score (as scores.csv's `score`)
            score_normalized  float32 [N]        clip(0.5 + 0.5 (score - t) / (t - t_low), 0, 1): 0.5 at the threshold
            label             int64 [N]          1 = anomalous (score >= t), 0 = normal
            anomaly_map       float32 [N, S, S]  the smoothed map (as anomaly_maps/*.npy)

The metadata (input size, threshold and where it came from, model, scoring and training options)
travels inside the file: ONNX metadata_props (string values, nested ones as JSON), or the TorchScript
extra file `metadata.json` (torch.jit.load(path, _extra_files={'metadata.json': ''})).

Before the file is written, the exported graph is run on random images and compared with the
PyTorch fp32 scorer (maps to PARITY_MAP_ATOL absolute, scores to PARITY_SCORE_RTOL relative,
identical labels); the ONNX file must also pass onnx.checker. The file is built in memory and
written to a temporary name, then renamed: a failed export never leaves a file behind.
"""
import argparse
import io
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from main_infer import load_scoring  # noqa: E402
from models_head import HeadScorer  # noqa: E402
from models_mae import AnomalyScorer  # noqa: E402
from scoring import HEAD_MODES  # noqa: E402
from util.calibration import Threshold  # noqa: E402
from util.cli import OneLineArgumentParser, UserError, run_cli  # noqa: E402
from util.datasets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from util.files import write_atomic  # noqa: E402

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "score_normalized", "label", "anomaly_map")
METADATA_FILE = "metadata.json"  # the TorchScript extra file
FORMAT_VERSION = "1"
DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization is an ONNX op from 17 on
# torch 2.14's exporter writes opset 18 and converts it; from 26 on the conversion breaks (its
# Attention node keeps opset 18). 17-25 export, pass onnx.checker and run in onnxruntime 1.32.
MAX_OPSET = 25
PARITY_MAP_ATOL = 1e-4
PARITY_SCORE_RTOL = 1e-5
CHECK_SEED = 0
REQUIREMENTS_HINT = "pip install -r requirements-export.txt"


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        "export.py",
        description="Export a trained MAE-AD checkpoint to one ONNX or TorchScript file: uint8 RGB images "
                    "in; score, normalised score, label and anomaly map out; metadata inside the file.")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="checkpoint written by main_train.py, or an adapter file (+ --pretrained)")
    parser.add_argument("--output", required=True, metavar="FILE",
                        help="the file to write (its folder must exist); replaced atomically")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="onnx (for onnxruntime, no PyTorch needed) or torchscript (default: onnx)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch_size", "--batch", dest="batch", type=int, default=1, metavar="N",
                       help="fixed number of images per call (default: 1)")
    batch.add_argument("--dynamic_batch", action="store_true",
                       help="any number of images per call (the batch axis is symbolic)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: {DEFAULT_OPSET})")
    parser.add_argument("--threshold", type=float, metavar="VALUE",
                        help="image-score threshold (label = score >= VALUE) for a checkpoint without "
                             "calibration, or to override its calibrated one; the metadata says it was "
                             "given by hand, and score_normalized is then score / (2 VALUE)")
    parser.add_argument("--pretrained", metavar="PATH",
                        help="base weights for an adapter-file checkpoint (default: the one it names)")
    parser.add_argument("--head", choices=HEAD_MODES, default="auto",
                        help="a checkpoint-head.pth's discriminative head, as main_infer.py --head: auto = at the "
                             "levels chosen for the category, on = both, off = none (default: auto)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


# ---- the deployed graph -----------------------------------------------------------------------
class DeployedScorer(nn.Module):
    """uint8 RGB [N, S, S, 3] -> (score [N], score_normalized [N], label [N] int64, anomaly_map [N, S, S]).

    Normalises like util.datasets (x / 255, then ImageNet mean/std, in float32) and runs the scorer;
    the threshold and its low anchor are constants of the graph.
    """

    def __init__(self, scorer: AnomalyScorer | HeadScorer, threshold: float, threshold_low: float) -> None:
        super().__init__()
        if not threshold > threshold_low:
            raise ValueError(f"the threshold ({threshold}) must be above its low anchor ({threshold_low})")
        self.scorer = scorer
        self.threshold = float(threshold)
        self.threshold_low = float(threshold_low)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(torch.float32)  # [N, 3, S, S]
        x = (x / 255.0 - self.mean) / self.std
        out = self.scorer(x)
        scores = out.scores  # [N]
        span = self.threshold - self.threshold_low
        normalized = torch.clamp(0.5 + 0.5 * (scores - self.threshold) / span, 0.0, 1.0)
        labels = (scores >= self.threshold).to(torch.int64)
        return scores, normalized, labels, out.anomaly_maps


class ThresholdChoice(NamedTuple):
    image: float  # label = score >= image
    image_low: float  # where score_normalized reaches 0
    source: str  # 'calibration' or 'manual'
    calibration: Optional[dict[str, Any]]  # the calibrated Threshold's fields, when there is one


def choose_threshold(calibrated: Optional[Threshold], manual: Optional[float], checkpoint: str) -> ThresholdChoice:
    """The calibrated threshold, or the one given with --threshold (required without calibration)."""
    calibration = calibrated.to_dict() if calibrated is not None else None
    if manual is not None:
        if not (math.isfinite(manual) and manual > 0):
            raise UserError(f"--threshold {manual}: give a positive image-score threshold")
        # Every map recipe's score is >= 0: 0 is the natural low anchor, so normalised = score / (2 t).
        return ThresholdChoice(manual, 0.0, "manual", calibration)
    if calibrated is None:
        raise UserError(f"{checkpoint} carries no calibrated threshold (no held-out normal images: trained "
                        f"before --holdout existed, or with --holdout 0); pass --threshold VALUE (an image score)")
    return ThresholdChoice(calibrated.image, calibrated.image_low, "calibration", calibration)


def scoring_options(scorer: AnomalyScorer | HeadScorer) -> dict[str, Any]:
    """What the graph scores with; with the head, pixel_map/image_map are "head" where it gives the level."""
    own = scorer.scorer if isinstance(scorer, HeadScorer) else scorer
    pixel_map, image_map = scorer.map_recipes()
    options = {"num_masks": int(own.masks.shape[0]), "sigma": own.smoothing.sigma,
               "image_sigma": own.image_smoothing.sigma, "score": "max" if image_map == "head" else own.score,
               "topk_fraction": own.topk_fraction, "pixel_map": pixel_map, "image_map": image_map}
    if isinstance(scorer, HeadScorer):
        options["head_image_kernel"] = scorer.image_kernel
    return options


def export_metadata(train_args: dict[str, Any], scorer: AnomalyScorer, threshold: ThresholdChoice,
                    batch: Optional[int], checkpoint: str, fmt: str, opset: Optional[int]) -> dict[str, str]:
    """String key -> string value (ONNX metadata_props); nested values are JSON."""
    meta = {
        "mae_ad_format_version": FORMAT_VERSION,
        "format": fmt,
        "model": str(train_args.get("model")),
        "input_size": str(scorer.model.img_size),
        "input": f"{INPUT_NAME}: uint8 RGB [N, S, S, 3], S = input_size, resized with bicubic "
                 f"interpolation (non-square images squashed); normalised inside the graph",
        "outputs": ",".join(OUTPUT_NAMES),
        "batch": "dynamic" if batch is None else str(batch),
        "threshold_image": repr(threshold.image),
        "threshold_image_low": repr(threshold.image_low),
        "threshold_pixel": "" if threshold.calibration is None else repr(threshold.calibration["pixel"]),
        "threshold_source": threshold.source,
        "calibration": json.dumps(threshold.calibration),
        "normalization": json.dumps({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
        "scoring": json.dumps(scoring_options(scorer)),
        "train_args": json.dumps(train_args, default=str),
        "checkpoint": Path(checkpoint).name,
        "torch_version": torch.__version__,
    }
    if opset is not None:
        meta["opset"] = str(opset)
    return meta


# ---- writing the two formats --------------------------------------------------------------------
def require_packages(fmt: str) -> None:
    """One line naming the requirements file when the ONNX exporter's packages are missing."""
    if fmt != "onnx":
        return
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as e:
            raise UserError(f"--format onnx needs the package '{name}', which is not installed: "
                            f"{REQUIREMENTS_HINT}") from e


def check_opset(opset: int) -> int:
    import onnx.defs
    newest = min(MAX_OPSET, onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset {opset} is not supported: use {MIN_OPSET} to {newest} (default {DEFAULT_OPSET})")
    return opset


def onnx_bytes(module: DeployedScorer, example: torch.Tensor, dynamic_batch: bool, opset: int,
               metadata: dict[str, str]) -> bytes:
    """The ONNX file as bytes: torch.onnx (dynamo) export, metadata_props, onnx.checker (full check)."""
    import onnx
    dynamic_shapes = {"image": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; real failures raise
        program = torch.onnx.export(module, (example,), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                    verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def torchscript_bytes(module: DeployedScorer, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """A traced TorchScript module with the metadata as the extra file METADATA_FILE."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; still supported
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


Runner = Callable[[np.ndarray], tuple[np.ndarray, ...]]


def onnx_runner(model: "bytes | str", threads: int = 0) -> Runner:
    """onnxruntime CPU session on a file or its bytes: uint8 [N, S, S, 3] -> the four outputs."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda images: tuple(session.run(list(OUTPUT_NAMES), {INPUT_NAME: images}))


def torchscript_runner(model: "bytes | str") -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(io.BytesIO(model) if isinstance(model, bytes) else model, map_location="cpu")

    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            return tuple(t.numpy() for t in module(torch.from_numpy(images)))
    return run


def torch_runner(module: DeployedScorer) -> Runner:
    """The reference: the same module in PyTorch fp32."""
    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            return tuple(t.numpy() for t in module(torch.from_numpy(images)))
    return run


# ---- parity -----------------------------------------------------------------------------------
class Parity(NamedTuple):
    map_max_abs: float
    score_max_rel: float
    labels_differ: int
    n_images: int

    @property
    def ok(self) -> bool:
        return self.map_max_abs <= PARITY_MAP_ATOL and self.score_max_rel <= PARITY_SCORE_RTOL \
            and self.labels_differ == 0

    def describe(self) -> str:
        return (f"max |map diff| {self.map_max_abs:.2e} (<= {PARITY_MAP_ATOL:g}), max score rel. diff "
                f"{self.score_max_rel:.2e} (<= {PARITY_SCORE_RTOL:g}), {self.labels_differ} of "
                f"{self.n_images} labels differ")


def compare(reference: tuple[np.ndarray, ...], candidate: tuple[np.ndarray, ...]) -> Parity:
    """Outputs (score, score_normalized, label, anomaly_map) of a candidate engine against the reference."""
    ref_score, _, ref_label, ref_map = reference
    score, _, label, anomaly_map = candidate
    rel = np.abs(score.astype(np.float64) - ref_score) / np.maximum(np.abs(ref_score.astype(np.float64)), 1e-12)
    return Parity(float(np.abs(anomaly_map - ref_map).max()), float(rel.max()),
                  int((label != ref_label).sum()), int(ref_score.shape[0]))


def random_images(n: int, size: int, seed: int = CHECK_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def check_batches(batch: Optional[int]) -> list[int]:
    """Batch sizes the self-check runs: the fixed one, or 1 and 3 for a dynamic batch."""
    return [batch] if batch is not None else [1, 3]


def self_check(reference: Runner, candidate: Runner, size: int, batches: list[int]) -> Parity:
    """Worst parity over random batches of each size."""
    worst = None
    for n in batches:
        images = random_images(n, size)
        p = compare(reference(images), candidate(images))
        worst = p if worst is None else Parity(max(worst.map_max_abs, p.map_max_abs),
                                               max(worst.score_max_rel, p.score_max_rel),
                                               worst.labels_differ + p.labels_differ, worst.n_images + n)
    return worst


# ---- main -------------------------------------------------------------------------------------
def check_output(output: str) -> Path:
    path = Path(output)
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    if not path.parent.is_dir():
        raise UserError(f"--output {path}: folder {path.parent} does not exist; create it first")
    return path


def build_file(module: DeployedScorer, fmt: str, example: torch.Tensor, dynamic_batch: bool, opset: Optional[int],
               metadata: dict[str, str]) -> tuple[bytes, Runner]:
    """The exported file's bytes and a runner of them (onnxruntime or TorchScript)."""
    if fmt == "torchscript":
        data = torchscript_bytes(module, example, metadata)
        return data, torchscript_runner(data)
    data = onnx_bytes(module, example, dynamic_batch, opset, metadata)
    try:
        return data, onnx_runner(data)
    except Exception as e:  # onnxruntime's own exception types, e.g. an op it does not implement
        raise UserError(f"onnxruntime cannot load the exported graph (--opset {opset}): "
                        f"{' '.join(str(e).split())[:300]}; try --opset {DEFAULT_OPSET}") from e


def main(args: argparse.Namespace) -> int:
    output = check_output(args.output)
    if args.batch < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch}")
    require_packages(args.format)
    opset = check_opset(args.opset) if args.format == "onnx" else None
    scorer, calibrated, train_args, _ = load_scoring(args.checkpoint, args.pretrained,  # fp32, CPU, its defaults
                                                     head=args.head)
    threshold = choose_threshold(calibrated, args.threshold, args.checkpoint)
    module = DeployedScorer(scorer, threshold.image, threshold.image_low).eval()
    batch = None if args.dynamic_batch else args.batch
    size = scorer.model.img_size
    metadata = export_metadata(train_args, scorer, threshold, batch, args.checkpoint, args.format, opset)
    example = torch.from_numpy(random_images(batch or 2, size))
    print(f"exporting {metadata['model']} at {size} px to {args.format}, batch {metadata['batch']}, "
          f"threshold {threshold.image:.6g} ({threshold.source})", flush=True)
    data, candidate = build_file(module, args.format, example, batch is None, opset, metadata)
    parity = self_check(torch_runner(module), candidate, size, check_batches(batch))
    if not parity.ok:
        raise UserError(f"the exported graph disagrees with PyTorch: {parity.describe()}; nothing written",
                        exit_code=1)
    write_atomic(output, lambda f: f.write(data))
    print(f"parity with PyTorch fp32 on random images: {parity.describe()}")
    print(f"wrote {output} ({len(data) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
