"""Reading the verdict: its words, the per-image console lines, the list of files not scored, and
report.html, one static page per output folder (no network, no framework). Torch-free: the ONNX
predictor uses it too.

The verdict words are the same everywhere a person reads them (console, overlay titles, summary.png,
report.html); the CSV files keep pred_label 0/1. With labels, a wrong verdict is a FALSE ALARM (a good
image judged ANOMALOUS) or a MISS (an anomalous image judged normal).
"""
import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import quote

ANOMALOUS, NORMAL = "ANOMALOUS", "normal"
VERDICTS = (NORMAL, ANOMALOUS)  # indexed by pred_label
FALSE_ALARM, MISS, CORRECT = "FALSE ALARM", "MISS", "correct"
SKIPPED_COLUMNS = ("path", "reason")
REPORT_NAME = "report.html"


def verdict_word(pred_label: Optional[int]) -> str:
    """'ANOMALOUS' (1), 'normal' (0), '-' (no threshold)."""
    return "-" if pred_label is None else VERDICTS[int(pred_label)]


def outcome(pred_label: Optional[int], label: Optional[int]) -> str:
    """'correct', 'FALSE ALARM', 'MISS', or '' when either is unknown."""
    if pred_label is None or label is None:
        return ""
    if int(pred_label) == int(label):
        return CORRECT
    return FALSE_ALARM if int(label) == 0 else MISS


@dataclass
class ScoredImage:
    """One scored image as the report and the console show it."""

    path: str  # relative to the input folder, posix separators
    score: float
    score_normalized: Optional[float] = None  # None without a threshold
    pred_label: Optional[int] = None  # 1 anomalous, 0 normal, None without a threshold
    label: Optional[int] = None  # 1 anomalous, 0 good, None unknown
    defect: str = ""
    overlay: Optional[str] = None  # the overlay PNG, relative to the output folder


@dataclass
class Skipped:
    """A file that was found but not scored, and why."""

    path: str  # relative to the input folder, posix separators
    reason: str


def threshold_text(threshold: Optional[float], n_images: Optional[int], quantile: Optional[float],
                   source: str = "") -> str:
    """'0.7234 (learnt from 40 held-out normal images at quantile 0.95)', or why there is none."""
    if threshold is None:
        return "none (the checkpoint has no held-out normal images): scores only, no verdict"
    if n_images:
        return f"{threshold:.5g} (learnt from {n_images} held-out normal images at quantile {quantile:g})"
    return f"{threshold:.5g} ({source or 'given at export'})"


def console_lines(images: Sequence[ScoredImage], threshold: str) -> list[str]:
    """What --images and the ONNX predictor print: the threshold, a header, one line per image
    (verdict, score, normalised score, path), fixed precision so the columns line up."""
    lines = [f"threshold: {threshold}", f"{'verdict':<10} {'score':>11} {'normalised':>10}  path"]
    for im in images:
        norm = "-" if im.score_normalized is None else f"{im.score_normalized:.3f}"
        lines.append(f"{verdict_word(im.pred_label):<10} {im.score:11.5f} {norm:>10}  {im.path}")
    return lines


def count_line(images: Sequence[ScoredImage], skipped: Sequence[Skipped], skipped_file: Path) -> str:
    """'scored 10 images: 2 ANOMALOUS, 8 normal; 1 file not scored (see OUT/skipped.csv)'."""
    judged = [im.pred_label for im in images if im.pred_label is not None]
    verdicts = f": {sum(judged)} {ANOMALOUS}, {len(judged) - sum(judged)} {NORMAL}" if judged else ""
    missing = f"{len(skipped)} file{'s' if len(skipped) != 1 else ''} not scored"
    where = f" (see {skipped_file})" if skipped else ""
    return f"scored {len(images)} image{'s' if len(images) != 1 else ''}{verdicts}; {missing}{where}"


def skipped_csv(skipped: Sequence[Skipped]) -> str:
    """skipped.csv: path,reason (the header alone when every file was scored)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SKIPPED_COLUMNS)
    for s in skipped:
        writer.writerow([s.path, s.reason])
    return buf.getvalue()


# ---- report.html --------------------------------------------------------------------------------
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em 2em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.meta { color: #555; margin: 0 0 .8em; }
.box { background: #f4f6f8; border: 1px solid #dde; padding: .6em 1em; border-radius: 4px; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #e4e4e4; }
th { text-align: left; background: #eef1f4; position: sticky; top: 0; }
th.sort { cursor: pointer; user-select: none; } th.sort:hover { background: #dde3ea; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.path { font-family: ui-monospace, monospace; font-size: 12px; }
.ANOMALOUS { color: #b00020; font-weight: 600; } .normal { color: #1b6e2a; }
.wrong { color: #b00020; font-weight: 600; }
tr.wrong-row { background: #fff1f1; }
img.thumb { height: 96px; display: block; }
.top { display: flex; gap: 2em; align-items: flex-start; }
.top > div:last-child { flex: 1 1 0; min-width: 0; }
.pictures { display: flex; gap: 1em; align-items: flex-start; margin: 0; }
.pictures a { min-width: 0; } .pictures img { max-height: 230px; max-width: 100%; border: 1px solid #ddd; }
.top td { padding: 2px 8px; font-size: 13px; }
.note { color: #666; font-size: 12px; }
.warning { background: #fff4e0; border: 1px solid #e0a040; color: #6b3a00; padding: .5em 1em; border-radius: 4px;
           margin: .6em 0; }
"""

# Sort the table whose header cell was clicked by that column: numbers numerically (highest first on
# the first click), text alphabetically; a second click reverses. The arrow shows the current order.
_SCRIPT = """
document.querySelectorAll("th.sort").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var rows = Array.prototype.slice.call(body.rows);
    var numeric = rows.every(function (r) { var v = r.cells[col].dataset.v; return v === "" || !isNaN(v); });
    var down = th.dataset.dir ? th.dataset.dir === "asc" : numeric;
    table.querySelectorAll("th.sort").forEach(function (h) {
      delete h.dataset.dir; h.textContent = h.textContent.replace(/ [\\u25b2\\u25bc]$/, "");
    });
    th.dataset.dir = down ? "desc" : "asc"; th.textContent += down ? " \\u25bc" : " \\u25b2";
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var d = numeric ? (x === "" ? -Infinity : +x) - (y === "" ? -Infinity : +y) : x.localeCompare(y);
      return down ? -d : d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _link(rel: str) -> str:
    return _e(quote(rel))


def _cell(text: str, value: Any, cls: str = "") -> str:
    """A table cell showing `text` (HTML), sorted by `value`."""
    attr = f' class="{cls}"' if cls else ""
    return f'<td{attr} data-v="{_e(value)}">{text}</td>'


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_METRIC_ROWS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR 0.3)"),
                ("image_precision", "image precision at the threshold"),
                ("image_recall", "image recall at the threshold"), ("image_f1", "image F1 at the threshold"),
                ("image_f1_max", "image F1-max (best threshold on these labels)"), ("pixel_f1_max", "pixel F1-max"))


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(name)}</td><td class=\"num\">{_fmt(metrics.get(key))}</td></tr>"
                   for key, name in _METRIC_ROWS if metrics.get(key) is not None)
    counts = f"{metrics.get('n_images', '?')} images, {metrics.get('n_anomalous', '?')} anomalous"
    return (f"<h2>Metrics ({_e(counts)})</h2><table>{rows}</table>"
            f"<p class=\"note\">The F1-max rows pick their threshold on these test labels: an upper<br>bound, "
            f"not a threshold to deploy. The verdicts use the threshold above,<br>learnt from normal images "
            f"only (metrics.json: threshold.image).</p>")


def _image_rows(images: Sequence[ScoredImage], labelled: bool) -> str:
    rows = []
    for im in images:
        verdict = verdict_word(im.pred_label)
        result = outcome(im.pred_label, im.label)
        wrong = result in (FALSE_ALARM, MISS)
        thumb = (f'<a href="{_link(im.overlay)}"><img class="thumb" loading="lazy" src="{_link(im.overlay)}" '
                 f'alt="overlay of {_e(im.path)}"></a>') if im.overlay else "-"
        cells = [f"<td>{thumb}</td>", _cell(_e(im.path), im.path, "path"),
                 _cell(f"{im.score:.5f}", repr(float(im.score)), "num"),
                 _cell(_fmt(im.score_normalized, 3), "" if im.score_normalized is None else im.score_normalized,
                       "num"),
                 _cell(_e(verdict), verdict, verdict if verdict in VERDICTS else "")]
        if labelled:
            label = "" if im.label is None else ("anomalous" if im.label else "good")
            cells += [_cell(_e(label), label), _cell(_e(im.defect), im.defect),
                      _cell(_e(result), result, "wrong" if wrong else "")]
        row_class = ' class="wrong-row"' if wrong else ""
        rows.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    return "\n".join(rows)


def render_report(title: str, source: str, images: Sequence[ScoredImage], skipped: Sequence[Skipped],
                  threshold: str, metrics: Optional[dict[str, Any]] = None,
                  pictures: Sequence[str] = (), files: Sequence[str] = (), notes: Sequence[str] = (),
                  warnings: Sequence[str] = ()) -> str:
    """The page: threshold and its source, the run's warnings (each in a box under it) and notes,
    metrics (labelled runs), counts, every scored image
    (overlay thumbnail, score, normalised score, verdict, label and defect where known; sorted by
    score, highest first; a click on a column header sorts by it) and every file not scored with
    its reason. pictures/files: names of PNGs to show and of files to link, relative to the page."""
    labelled = any(im.label is not None for im in images)
    ordered = sorted(images, key=lambda im: -im.score)
    judged = [im.pred_label for im in images if im.pred_label is not None]
    wrong = sum(outcome(im.pred_label, im.label) in (FALSE_ALARM, MISS) for im in images)
    counts = [f"{len(images)} scored"]
    if judged:
        counts.append(f"{sum(judged)} {ANOMALOUS}, {len(judged) - sum(judged)} {NORMAL}")
    if labelled and judged:
        counts.append(f"{wrong} wrong (FALSE ALARM or MISS)")
    counts.append(f"{len(skipped)} not scored")
    head = ["", "path", "score", "normalised", "verdict"] + (["label", "defect", "outcome"] if labelled else [])
    header = "".join("<th>overlay</th>" if not h else '<th class="sort" data-dir="desc">score \u25bc</th>'
                     if h == "score" else f'<th class="sort">{h}</th>' for h in head)
    skipped_rows = "\n".join(f"<tr><td class=\"path\">{_e(s.path)}</td><td>{_e(s.reason)}</td></tr>" for s in skipped)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>", f'<p class="meta">{_e(source)}</p>',
        f'<div class="box"><b>Threshold</b>: ' + (
            f'image score at or above {_e(threshold)} &rarr; <span class="ANOMALOUS">{ANOMALOUS}</span>, below '
            f'&rarr; <span class="normal">{NORMAL}</span>.<br>The normalised score puts the threshold at 0.5 '
            f'(0 = the most normal held-out image).<br>' if judged else f"{_e(threshold)}.<br>") +
        f'<b>Images</b>: {_e("; ".join(counts))}.</div>',
    ]
    parts += [f'<p class="warning"><b>Warning</b>: {_e(w)}</p>' for w in warnings]
    parts += [f'<p class="note">{_e(n)}</p>' for n in notes]
    top = [f"<div>{_metrics_table(metrics)}</div>"] if metrics else []
    if pictures:
        top.append('<div><h2>Pictures (click to enlarge)</h2><p class="pictures">' + "".join(
            f'<a href="{_link(p)}"><img src="{_link(p)}" alt="{_e(p)}"></a>' for p in pictures) + "</p></div>")
    if top:
        parts.append(f'<div class="top">{"".join(top)}</div>')
    if files:
        parts.append("<p>Files: " + ", ".join(f'<a href="{_link(f)}">{_e(f)}</a>' for f in files) + "</p>")
    parts += [f"<h2>Scored images ({len(images)})</h2>",
              '<p class="note">Highest score first; click a column header to sort. Overlays: the map the '
              'verdict comes from, on one colour scale for every image, the threshold as a dashed outline.</p>',
              f'<table id="scored"><thead><tr>{header}</tr></thead><tbody>', _image_rows(ordered, labelled),
              "</tbody></table>", f"<h2>Not scored ({len(skipped)})</h2>"]
    parts.append(f'<table id="skipped"><thead><tr><th>path</th><th>reason</th></tr></thead><tbody>{skipped_rows}'
                 f"</tbody></table>" if skipped else "<p>Every file found was scored.</p>")
    parts += [f"<script>{_SCRIPT}</script>", "</body></html>", ""]
    return "\n".join(parts)
