"""Restructure an MVTec AD download into the prepared layout (never modifies the source).

    SRC/<cat>/train/good/*                        -> DST/<cat>/train/good/*
    SRC/<cat>/test/good/*                         -> DST/<cat>/test/good/*
    SRC/<cat>/test/<defect>/<name>                -> DST/<cat>/test/bad/<defect>_<name>
    SRC/<cat>/ground_truth/<defect>/<stem>_mask.* -> DST/<cat>/ground_truth/bad/<defect>_<stem>_mask.*

(without the <cat>/ level when SRC is a single category folder). Every image is decoded once to
check it; problems are reported per category and in a summary table at the end.
"""
import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import OneLineArgumentParser, UserError, run_cli, warn  # noqa: E402
from util.datasets import (COMMON_EXTENSIONS, UnreadableImage, is_image_file, load_mask,  # noqa: E402
                           load_rgb)

# what a category output holds, and what --overwrite removes
OUTPUT_PARTS = ("train", "test", "ground_truth")
_MAX_NAMES = 10  # file names listed per warning


@dataclass
class CategoryPlan:
    name: str
    src: Path
    out: Path
    ops: List[Tuple[Path, Path]] = field(default_factory=list)  # (source file, destination file)
    groups: List[Tuple[str, str, int]] = field(default_factory=list)  # for --dry_run: from, to, n
    train: int = 0
    test_good: int = 0
    test_bad: int = 0
    masks: int = 0
    warnings: int = 0  # number of files with an issue (stray files included)
    problems: int = 0  # issues that --strict turns into an error


def _rel(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return str(p)


def _is_category(p: Path) -> bool:
    return (p / "train").is_dir() and (p / "test").is_dir()


def _visible(folder: Path) -> List[Path]:
    """Entries of a folder, sorted, without hidden ones (.DS_Store, ._* are silently ignored)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def find_categories(src: Path) -> Tuple[bool, Dict[str, Path]]:
    """-> (src is a single category, {name: folder}); UserError when SRC is not MVTec-like."""
    if not src.exists():
        raise UserError(f"--src {src} does not exist")
    if not src.is_dir():
        raise UserError(f"--src {src} is not a folder; pass an MVTec AD category folder or the root")
    if _is_category(src):
        return True, {src.name: src}
    for part in ("train", "test"):
        other = "test" if part == "train" else "train"
        if (src / part).is_dir():
            raise UserError(f"--src {src} has {part}/ but no {other}/ folder; it is not an "
                            f"MVTec AD category")
    cats = {p.name: p for p in _visible(src) if p.is_dir() and _is_category(p)}
    if not cats:
        raise UserError(f"--src {src} is neither an MVTec AD category (no train/ and test/ "
                        f"folders) nor the MVTec AD root (no sub-folder has train/ and test/)")
    return False, cats


def select_categories(available: Dict[str, Path], categories: str, single: bool) -> List[str]:
    names = [c.strip() for c in categories.split(",") if c.strip()]
    if not names or names == ["all"]:
        return sorted(available)
    unknown = [c for c in names if c not in available]
    if unknown:
        what = "the category folder" if single else "available in --src"
        raise UserError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                        f"{', '.join(unknown)} in --categories; {what}: "
                        f"{', '.join(sorted(available))}")
    return list(dict.fromkeys(names))


def _listing(paths: Sequence[Path], base: Path) -> str:
    names = [_rel(p, base) for p in paths[:_MAX_NAMES]]
    more = f" and {len(paths) - _MAX_NAMES} more" if len(paths) > _MAX_NAMES else ""
    return ", ".join(names) + more


def _progress(seq: Sequence, desc: str):
    if len(seq) <= 50:
        return seq
    from tqdm import tqdm
    return tqdm(seq, desc=desc, leave=False)


def _readable(path: Path, is_mask: bool) -> bool:
    try:
        load_mask(path) if is_mask else load_rgb(path)
        return True
    except UnreadableImage:
        return False


def scan_category(name: str, src: Path, out: Path) -> CategoryPlan:
    """Check one category folder and plan its copy; prints warnings, writes nothing."""
    plan = CategoryPlan(name=name, src=src, out=out)
    strays: List[Path] = []
    unreadable: List[Path] = []

    def images_in(folder: Path) -> List[Path]:
        files = []
        for p in _visible(folder):
            if p.is_file() and is_image_file(p):
                files.append(p)
            else:
                strays.append(p)  # non-image file or unexpected sub-folder
        return files

    def check(files: List[Path], is_mask: bool, what: str) -> List[Path]:
        ok = []
        for p in _progress(files, f"{name}: checking {what}"):
            (ok if _readable(p, is_mask) else unreadable).append(p)
        return ok

    def add_group(files: List[Path], src_dir: Path, dst_dir: Path, prefix: str = "") -> None:
        for p in files:
            plan.ops.append((p, dst_dir / f"{prefix}{p.name}"))
        if files:
            plan.groups.append((f"{_rel(src_dir, src)}/*", f"{_rel(dst_dir, out)}/{prefix}*",
                                len(files)))

    # train/good (other train sub-folders are not part of the layout)
    for p in _visible(src / "train"):
        if p.name != "good":
            strays.append(p)
    train = check(images_in(src / "train" / "good"), False, "train images") \
        if (src / "train" / "good").is_dir() else []
    if not train:
        raise UserError(f"{src / 'train' / 'good'} holds no readable images; category {name} is "
                        f"not usable (leave it out with --categories)")
    add_group(train, src / "train" / "good", out / "train" / "good")
    plan.train = len(train)

    # test/good and test/<defect>
    defects: Dict[str, List[Path]] = {}
    for sub in _visible(src / "test"):
        if not sub.is_dir():
            strays.append(sub)
            continue
        files = check(images_in(sub), False, f"test/{sub.name}")
        if sub.name == "good":
            add_group(files, sub, out / "test" / "good")
            plan.test_good = len(files)
        else:
            defects[sub.name] = files
    if plan.test_good == 0:
        warn(f"{name}: no normal test images in {src / 'test' / 'good'}")
        plan.warnings += 1
    if "bad" in defects:
        warn(f"{name}: {src / 'test' / 'bad'} exists; is --src already prepared? Its images "
             f"become bad_<name>")
        plan.warnings += 1

    # masks: ground_truth/<defect>/<stem>_mask.<ext>
    masks: Dict[str, Dict[str, Path]] = {}
    gt = src / "ground_truth"
    if gt.is_dir():
        for sub in _visible(gt):
            if not sub.is_dir() or sub.name == "good":
                strays.append(sub)
                continue
            found: Dict[str, Path] = {}
            for p in images_in(sub):
                if not p.stem.endswith("_mask"):
                    strays.append(p)
                    continue
                key = p.stem[: -len("_mask")]
                if key in found:  # same stem, two extensions: keep .png, report the other
                    keep, drop = sorted((found[key], p), key=lambda q: q.suffix.lower() != ".png")
                    found[key] = keep
                    strays.append(drop)
                else:
                    found[key] = p
            masks[sub.name] = found

    no_mask: List[Path] = []
    orphans: List[Path] = []
    for defect in sorted(set(defects) | set(masks)):
        images = defects.get(defect, [])
        dmasks = masks.get(defect, {})
        unreadable_stems = {p.stem for p in unreadable if p.parent.name == defect
                            and p.parent.parent.name == "test"}
        stems = {p.stem for p in images}
        no_mask += [p for p in images if p.stem not in dmasks]
        orphan = [m for stem, m in sorted(dmasks.items())
                  if stem not in stems and stem not in unreadable_stems]
        orphans += orphan
        # masks of unreadable images are dropped with them; orphans are not copied
        keep = [m for stem, m in sorted(dmasks.items()) if stem in stems]
        keep = check(keep, True, f"ground_truth/{defect}")
        if images:
            add_group(images, src / "test" / defect, out / "test" / "bad", f"{defect}_")
        if keep:
            for m in keep:
                plan.ops.append((m, out / "ground_truth" / "bad" / f"{defect}_{m.name}"))
            plan.groups.append((f"ground_truth/{defect}/*", f"ground_truth/bad/{defect}_*", len(keep)))
        plan.test_bad += len(images)
        plan.masks += len(keep)
    if not (plan.test_good or plan.test_bad):
        raise UserError(f"{src / 'test'} holds no readable images; category {name} is not usable "
                        f"(leave it out with --categories)")

    for paths, msg, is_problem in (
            (unreadable, "unreadable image(s), not copied", True),
            (no_mask, "anomalous image(s) without a mask (pixel metrics will skip them)", True),
            (orphans, "mask(s) without an image, not copied", True),
            (strays, "stray file(s)/folder(s) ignored", False)):
        if paths:
            warn(f"{name}: {len(paths)} {msg}: {_listing(paths, src)}")
            plan.warnings += len(paths)
            plan.problems += len(paths) if is_problem else 0

    seen: Dict[Path, Path] = {}
    for s, d in plan.ops:
        if d in seen:
            raise UserError(f"{name}: {_rel(s, src)} and {_rel(seen[d], src)} would both become "
                            f"{_rel(d, out)}; rename one of them")
        seen[d] = s
    return plan


def _inside(a: Path, b: Path) -> bool:
    """a == b or a lies inside b (both resolved)."""
    return a == b or b in a.parents


def check_destination(src: Path, dst: Path, outs: Sequence[Path], overwrite: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if _inside(dst_r, src_r):
        raise UserError(f"--dst {dst} is inside --src {src}; choose a folder outside the source "
                        f"(the source is never written to)")
    for out in outs:
        out_r = out.resolve()
        if _inside(out_r, src_r) or _inside(src_r, out_r):
            raise UserError(f"output folder {out} overlaps --src {src}; choose another --dst")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"--dst {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise UserError(f"--dst {dst} is not empty; pass --overwrite to replace the category "
                        f"folders this run writes, or choose an empty folder")


def _place(src: Path, dst: Path, link: bool) -> bool:
    """Copy or hard-link one file; returns False when a link was asked for but a copy was made."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()  # never write through an existing file: it may be a hard link into SRC
    if link:
        try:
            os.link(src, dst)
            return True
        except OSError:
            pass  # cross-device, or a file system without hard links
    shutil.copy2(src, dst)
    return not link


def write_category(plan: CategoryPlan, link: bool) -> int:
    """Remove the category's previous output parts, then write; returns the number of link fallbacks."""
    for part in OUTPUT_PARTS:
        p = plan.out / part
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
    fallbacks = 0
    made = set()
    for s, d in plan.ops:
        if d.parent not in made:
            d.parent.mkdir(parents=True, exist_ok=True)
            made.add(d.parent)
        if not _place(s, d, link):
            fallbacks += 1
    if fallbacks:
        warn(f"{plan.name}: hard links were not possible for {fallbacks} file(s) (another file "
             f"system?); copied them instead")
    return fallbacks


def format_summary(plans: Sequence[CategoryPlan]) -> str:
    header = ("category", "train", "test good", "test bad", "masks", "warnings")
    rows = [(p.name, p.train, p.test_good, p.test_bad, p.masks, p.warnings) for p in plans]
    if len(plans) > 1:
        rows.append(("total",) + tuple(sum(r[i] for r in rows) for i in range(1, 6)))
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(6)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def prepare(src: Path, dst: Path, categories: str = "all", link: bool = False,
            overwrite: bool = False, dry_run: bool = False, strict: bool = False,
            log: Callable[[str], None] = print) -> List[CategoryPlan]:
    """Check SRC and write the prepared layout to DST (nothing when dry_run); returns the plans."""
    src, dst = Path(src), Path(dst)
    single, available = find_categories(src)
    names = select_categories(available, categories, single)
    outs = {n: (dst if single else dst / n) for n in names}
    check_destination(src, dst, list(outs.values()), overwrite)

    plans = []
    for n in names:
        log(f"checking {n} ({available[n]})")
        plans.append(scan_category(n, available[n], outs[n]))
    problems = sum(p.problems for p in plans)
    if strict and problems:
        raise UserError(f"--strict: {problems} problem(s) found in --src (listed above); "
                        f"nothing was written")

    verb = "hard-link" if link else "copy"
    for plan in plans:
        if dry_run:
            existing = [plan.out / p for p in OUTPUT_PARTS if (plan.out / p).exists()]
            for p in existing:
                log(f"would remove {p}")
            for frm, to, count in plan.groups:
                log(f"would {verb} {count:4d} file(s): {plan.src / frm} -> {plan.out / to}")
        else:
            log(f"writing {plan.name} -> {plan.out}")
            write_category(plan, link)
    log("")
    log(format_summary(plans))
    if dry_run:
        log("dry run: nothing was written")
    return plans


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        description="Restructure an MVTec AD download (one category folder or the root holding "
                    "all categories) into the prepared layout: test/<defect>/<name> becomes "
                    "test/bad/<defect>_<name> and ground_truth/<defect>/<stem>_mask.png becomes "
                    "ground_truth/bad/<defect>_<stem>_mask.png; train/good and test/good are "
                    "carried over as they are. The source is never modified. Every image is "
                    "decoded once to check it; a summary table is printed at the end.",
        epilog="Warnings (an error with --strict): anomalous images without a mask, masks without "
               "an image, unreadable images (neither of the last two is copied). Stray non-image "
               "files are ignored with a warning; hidden files (.DS_Store, ._*) silently. "
               f"Image extensions: "
               f"{', '.join(e[1:] for e in COMMON_EXTENSIONS)} and every other format Pillow decodes "
               f"(any case). Exit codes: 0 done, "
               "2 a problem with the input or flags (one line on stderr), 1 a failure while "
               "writing.",
    )
    p.add_argument("--src", type=Path, required=True,
                   help="an MVTec AD category folder (with train/ and test/) or the MVTec AD root "
                        "(category sub-folders); read only")
    p.add_argument("--dst", type=Path, required=True,
                   help="output folder (created); for a root, one sub-folder per category. Must be "
                        "empty unless --overwrite, and must not lie inside --src")
    p.add_argument("--categories", default="all",
                   help="'all' or a comma-separated list of category names, e.g. bottle,capsule "
                        "(used when --src is the root; default: %(default)s)")
    p.add_argument("--link", action="store_true",
                   help="hard-link files instead of copying them (saves disk space; falls back to "
                        "copies across file systems). Editing a linked file in DST edits SRC too")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty --dst: the train/, test/ and ground_truth/ folders of "
                        "each category written are removed first (other files are kept)")
    p.add_argument("--dry_run", action="store_true",
                   help="check the source and print what would be written; write nothing")
    p.add_argument("--strict", action="store_true",
                   help="treat missing masks, masks without an image and unreadable images as "
                        "errors (exit code 2, nothing written)")
    p.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    return p


def main(args: argparse.Namespace) -> None:
    prepare(args.src, args.dst, categories=args.categories, link=args.link,
            overwrite=args.overwrite, dry_run=args.dry_run, strict=args.strict)


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    sys.exit(run_cli(main, _args, _args.debug))
