"""Score images with an exported ONNX file, without PyTorch: onnxruntime, numpy and pillow only.

    python scripts/predict_onnx.py --onnx capsule.onnx --images new_photos/ --output_dir out/

Writes what `main_infer.py --images` writes for the same images:
- scores.csv: path,label,defect,score,score_normalized,pred_label (label and defect empty: the
  images are unlabelled; pred_label 1 = anomalous, by the threshold inside the file);
- anomaly_maps/<path relative to PATH without extension>.npy: float32 (S, S), S = the model's input size;
- skipped.csv (path,reason: every file found but not scored) and report.html (docs/REPORT.md);
- overlays/<same path>.png when matplotlib is installed: the pixel-level map (the graph's output; the
  image-level map the verdict comes from stays inside the graph) on 0 .. 2x the pixel threshold.
Images are decoded and resized exactly as main_infer.py does (util.images: RGB conversion, then a
bicubic resize to S x S); non-square images are squashed, with one note. Files are written to a
temporary name and renamed. One run per OUT: a non-empty OUT needs --overwrite, which deletes only
this script's outputs there. Run `scripts/export.py --format onnx` first to get the model file.
"""
import argparse
import csv
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from util.cli import OneLineArgumentParser, UserError, run_cli, warn  # noqa: E402
from util.files import check_output_dir, output_stem, prepare_output_dir, write_atomic  # noqa: E402
from util.images import (UnreadableImage, find_images, load_rgb, not_image_reason, other_files,  # noqa: E402
                         resize_square, squash_note)
from util.report import (REPORT_NAME, ScoredImage, Skipped, console_lines, count_line, render_report,  # noqa: E402
                         skipped_csv, threshold_text, verdict_word)

OUTPUT_NAMES = ("score", "score_normalized", "label", "anomaly_map")  # as scripts/export.py writes them
CSV_COLUMNS = ("path", "label", "defect", "score", "score_normalized", "pred_label")
PROGRESS_EVERY = 100  # images between progress lines
# What this script writes into --output_dir: all that --overwrite deletes there.
OUTPUTS = ("anomaly_maps", "overlays", "scores.csv", "skipped.csv", REPORT_NAME)


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        "predict_onnx.py",
        description="Score images with an ONNX file written by scripts/export.py (onnxruntime, no PyTorch): "
                    "scores.csv, anomaly_maps/*.npy, skipped.csv, report.html (and overlays/ with matplotlib) as "
                    "main_infer.py --images writes them. docs/REPORT.md explains the outputs and the verdict.")
    # --model: the old name (main_train.py's --model is a variant name, this is a file); still accepted
    parser.add_argument("--onnx", "--model", dest="onnx", required=True, metavar="FILE",
                        help="the .onnx file from scripts/export.py")
    parser.add_argument("--images", required=True, metavar="PATH",
                        help="a folder (searched recursively) or one image file")
    parser.add_argument("--output_dir", required=True, metavar="OUT",
                        help="folder for the outputs (created); one that is not empty needs --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --output_dir: first delete this script's earlier outputs "
                             "there (anomaly_maps/, overlays/, scores.csv, skipped.csv, report.html); other files "
                             "are kept")
    parser.add_argument("--no_overlays", action="store_true", help="skip overlays/*.png")
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
        raise UserError(f"--onnx {file} does not exist; export one with scripts/export.py --format onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise UserError(f"--onnx {file} is not an ONNX file onnxruntime can load "
                        f"({' '.join(str(e).split())[:200]})") from e
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    outputs = tuple(o.name for o in session.get_outputs())
    if "input_size" not in metadata or outputs != OUTPUT_NAMES:
        raise UserError(f"--onnx {file} is an ONNX file but not one of scripts/export.py's (outputs "
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


def decode(images: list[tuple[Path, str]], size: int
           ) -> tuple[list[str], np.ndarray, list[tuple[str, tuple[int, int]]], list[Skipped]]:
    """-> (relative paths of the readable images, uint8 [N, S, S, 3], the non-square ones as
    (relative path, (width, height)), the unreadable ones with the reason)."""
    kept, arrays, non_square, skipped = [], [], [], []
    for path, rel in images:
        try:
            img = load_rgb(path)
        except UnreadableImage as e:
            warn(f"skipping {e}")
            skipped.append(Skipped(rel, e.reason))
            continue
        if img.width != img.height:
            non_square.append((rel, img.size))
        arrays.append(resize_square(img, size))
        kept.append(rel)
    if not kept:
        raise UserError(f"none of the {len(images)} images could be read")
    return kept, np.stack(arrays), non_square, skipped


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


def write_overlays(out: Path, rel_paths: list[str], pixels: np.ndarray, maps: np.ndarray, images: list[ScoredImage],
                   metadata: dict[str, str]) -> bool:
    """overlays/<stem>.png with matplotlib when it is installed (a deployment may not have it); returns
    whether they were written. The map is the pixel-level one, on 0 .. 2x the pixel threshold."""
    try:
        from util.visualize import save_overlay
    except ImportError:
        warn("matplotlib is not installed: no overlays (report.html lists the scores without pictures)")
        return False
    pixel = float(metadata["threshold_pixel"]) if metadata.get("threshold_pixel") else None
    recipe = json.loads(metadata.get("scoring") or "{}").get("pixel_map", "")
    for rel, rgb, anomaly_map, image in zip(rel_paths, pixels, maps, images):
        save_overlay(out / image.overlay, rgb, None, anomaly_map, image.score, vmax=2 * pixel if pixel else None,
                     title=rel, verdict=verdict_word(image.pred_label), normalized=image.score_normalized,
                     map_name=f"pixel map {recipe} (localisation)", threshold=pixel)
    return True


def threshold_line(metadata: dict[str, str]) -> str:
    """The file's threshold and where it came from: the calibration, or export.py --threshold."""
    learnt = json.loads(metadata.get("calibration") or "null") if metadata.get("threshold_source") == "calibration" \
        else None
    return threshold_text(float(metadata["threshold_image"]), learnt and learnt.get("n_images"),
                          learnt and learnt.get("image_quantile"), source="given to scripts/export.py --threshold")


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    check_output_dir(args.output_dir, args.overwrite)
    session, metadata = load_model(args.onnx, args.threads)
    size = int(metadata["input_size"])
    images = find_images(args.images)
    check_stems(images)
    rel_paths, pixels, non_square, skipped = decode(images, size)
    skipped = sorted(skipped + [Skipped(rel, not_image_reason(p)) for p, rel in other_files(args.images)],
                     key=lambda s: s.path)
    if non_square:
        warn(squash_note(non_square, len(rel_paths), size))
    out = prepare_output_dir(args.output_dir, args.overwrite, OUTPUTS)
    batch = fixed_batch(metadata)
    start = time.perf_counter()
    scores, normalized, labels, maps = run_batches(session, pixels, batch or args.batch_size, pad=batch is not None)
    elapsed = time.perf_counter() - start
    for rel, anomaly_map in zip(rel_paths, maps):
        write_atomic(out / "anomaly_maps" / f"{output_stem(rel)}.npy",
                     lambda f, m=anomaly_map: np.save(f, np.ascontiguousarray(m, dtype=np.float32)))
    write_atomic(out / "scores.csv", lambda f: f.write(scores_csv(rel_paths, scores, normalized, labels).encode()))
    write_atomic(out / "skipped.csv", lambda f: f.write(skipped_csv(skipped).encode()))
    scored = [ScoredImage(rel, float(score), float(norm), int(label), overlay=f"overlays/{output_stem(rel)}.png")
              for rel, score, norm, label in zip(rel_paths, scores, normalized, labels)]
    if args.no_overlays or not write_overlays(out, rel_paths, pixels, maps, scored, metadata):
        for image in scored:
            image.overlay = None
    report = render_report("MAE-AD report", f"--images {args.images}; ONNX file {args.onnx} (model "
                           f"{metadata.get('model')}, from {metadata.get('checkpoint')})", scored, skipped,
                           threshold_line(metadata), files=["scores.csv", "skipped.csv"])
    write_atomic(out / REPORT_NAME, lambda f: f.write(report.encode("utf-8")))
    lines = [f"scored {len(rel_paths)} images in {elapsed:.1f} s ({elapsed / len(rel_paths):.3f} s/image) with "
             f"onnxruntime", ""] + console_lines(scored, threshold_line(metadata))
    lines += [count_line(scored, skipped, out / "skipped.csv"), "", f"report:       {out / REPORT_NAME}",
              f"anomaly maps: {out / 'anomaly_maps'}", f"scores:       {out / 'scores.csv'}",
              f"not scored:   {out / 'skipped.csv'}"]
    if scored and scored[0].overlay:
        lines.append(f"overlays:     {out / 'overlays'}")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
