"""Score images with an exported ONNX file, without PyTorch: onnxruntime, numpy and pillow only.

    python scripts/predict_onnx.py --model capsule.onnx --images new_photos/ --output_dir out/

Writes what `main_infer.py --images` writes for the same images (overlays aside):
- scores.csv: path,label,defect,score,score_normalized,pred_label (label and defect empty: the
  images are unlabelled; pred_label 1 = anomalous, by the threshold inside the file);
- anomaly_maps/<path relative to PATH without extension>.npy: float32 (S, S), S = the model's input size.
Images are decoded and resized exactly as main_infer.py does (util.images: RGB conversion, then a
bicubic resize to S x S); images of another size are resized, with a note. Files are written to a
temporary name and renamed. Run `scripts/export.py --format onnx` first to get the model file.
"""
import argparse
import csv
import io
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from util.cli import OneLineArgumentParser, UserError, run_cli, warn  # noqa: E402
from util.files import output_stem, prepare_output_dir, write_atomic  # noqa: E402
from util.images import UnreadableImage, find_images, load_rgb, resize_square  # noqa: E402

OUTPUT_NAMES = ("score", "score_normalized", "label", "anomaly_map")  # as scripts/export.py writes them
CSV_COLUMNS = ("path", "label", "defect", "score", "score_normalized", "pred_label")
PROGRESS_EVERY = 100  # images between progress lines


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        "MAE-AD ONNX predictor",
        description="Score images with an ONNX file written by scripts/export.py (onnxruntime, no PyTorch): "
                    "scores.csv and anomaly_maps/*.npy as main_infer.py --images writes them.")
    parser.add_argument("--model", required=True, metavar="FILE", help="the .onnx file from scripts/export.py")
    parser.add_argument("--images", required=True, metavar="PATH",
                        help="a folder (searched recursively) or one image file")
    parser.add_argument("--output_dir", required=True, metavar="OUT",
                        help="folder for scores.csv and anomaly_maps/ (created; other files left alone)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="images per call for a file exported with --dynamic_batch; a fixed-batch "
                             "file uses its own batch (default: 8)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads; 0 = its default (all cores) (default: 0)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def load_model(path: str, threads: int) -> tuple[Any, dict[str, str]]:
    """An onnxruntime CPU session and the file's metadata; one-line errors for anything else."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UserError("onnxruntime is not installed: pip install -r requirements-export.txt") from e
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--model {file} does not exist; export one with scripts/export.py --format onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise UserError(f"--model {file} is not an ONNX file onnxruntime can load "
                        f"({' '.join(str(e).split())[:200]})") from e
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    outputs = tuple(o.name for o in session.get_outputs())
    if "input_size" not in metadata or outputs != OUTPUT_NAMES:
        raise UserError(f"--model {file} is an ONNX file but not one of scripts/export.py's (outputs "
                        f"{', '.join(outputs)}, no MAE-AD metadata); export the checkpoint with scripts/export.py")
    return session, metadata


def fixed_batch(metadata: dict[str, str]) -> Optional[int]:
    return None if metadata.get("batch", "dynamic") == "dynamic" else int(metadata["batch"])


def check_stems(images: list[tuple[Path, str]]) -> None:
    stems = Counter(output_stem(rel) for _, rel in images)
    clash = [s for s, n in stems.items() if n > 1]
    if clash:
        names = [rel for _, rel in images if output_stem(rel) == clash[0]]
        raise UserError(f"{' and '.join(names)} would share the output name {clash[0]}.npy; rename one "
                        f"({len(clash)} such clash(es))")


def decode(images: list[tuple[Path, str]], size: int) -> tuple[list[str], np.ndarray, int]:
    """-> (relative paths of the readable images, uint8 [N, S, S, 3], how many needed resizing)."""
    kept, arrays, resized = [], [], 0
    for path, rel in images:
        try:
            img = load_rgb(path)
        except UnreadableImage as e:
            warn(f"skipping {e}")
            continue
        resized += img.size != (size, size)
        arrays.append(resize_square(img, size))
        kept.append(rel)
    if not kept:
        raise UserError(f"none of the {len(images)} images could be read")
    return kept, np.stack(arrays), resized


def run_batches(session: Any, pixels: np.ndarray, batch: int, pad: bool) -> tuple[np.ndarray, ...]:
    """All images through the graph, `batch` at a time; a fixed-batch graph gets its last batch padded."""
    results: list[tuple[np.ndarray, ...]] = []
    for lo in range(0, len(pixels), batch):
        chunk = pixels[lo:lo + batch]
        n = len(chunk)
        if pad and n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outputs = session.run(list(OUTPUT_NAMES), {session.get_inputs()[0].name: chunk})
        results.append(tuple(o[:n] for o in outputs))
        if (lo + n) // PROGRESS_EVERY > lo // PROGRESS_EVERY:
            print(f"scored {lo + n}/{len(pixels)}", file=sys.stderr, flush=True)
    return tuple(np.concatenate(parts) for parts in zip(*results))


def scores_csv(rel_paths: list[str], scores: np.ndarray, normalized: np.ndarray, labels: np.ndarray) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rel, score, norm, label in zip(rel_paths, scores, normalized, labels):
        writer.writerow([rel, "", "", repr(float(score)), f"{float(norm):.6f}", int(label)])
    return buf.getvalue()


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    session, metadata = load_model(args.model, args.threads)
    size = int(metadata["input_size"])
    images = find_images(args.images)
    check_stems(images)
    out = prepare_output_dir(args.output_dir)
    rel_paths, pixels, resized = decode(images, size)
    if resized:
        print(f"note: {resized} of {len(rel_paths)} images are not {size}x{size} px; resized to it "
              f"(bicubic), as main_infer.py does", file=sys.stderr, flush=True)
    batch = fixed_batch(metadata)
    start = time.perf_counter()
    scores, normalized, labels, maps = run_batches(session, pixels, batch or args.batch_size, pad=batch is not None)
    elapsed = time.perf_counter() - start
    for rel, anomaly_map in zip(rel_paths, maps):
        write_atomic(out / "anomaly_maps" / f"{output_stem(rel)}.npy",
                     lambda f, m=anomaly_map: np.save(f, np.ascontiguousarray(m, dtype=np.float32)))
    write_atomic(out / "scores.csv", lambda f: f.write(scores_csv(rel_paths, scores, normalized, labels).encode()))
    print(f"scored {len(rel_paths)} images in {elapsed:.1f} s ({elapsed / len(rel_paths):.3f} s/image) with "
          f"onnxruntime; {int(labels.sum())} anomalous (threshold {float(metadata['threshold_image']):.6g}, "
          f"{metadata.get('threshold_source', 'unknown')})")
    print(f"anomaly maps: {out / 'anomaly_maps'}\nscores:       {out / 'scores.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
