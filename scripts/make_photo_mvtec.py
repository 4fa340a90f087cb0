"""MVTec-style categories (raw MVTec AD layout) built from real photographs, for development.

The photographs are the sample images that ship inside the scikit-image wheel (its `skimage/data/`
folder, the one `skimage.data.data_dir` names); they are read from the installed package with
Pillow, without importing scikit-image, so nothing is ever downloaded. `brick` and `coins` are
never used: they are kept aside for independent checks.

Categories (see docs/PHOTO_DATA.md for pictures of what to expect):
  grass   texture  a lawn seen from above (grass.png, grey, 512 px); each image is a random
                   256 px crop, turned by a multiple of 90 degrees and maybe mirrored.
  gravel  texture  fine gravel (gravel.png, grey, 512 px); random 256 px crops, turned/mirrored.
  page    object   a photographed printed page (page.png, grey); the same 176 px square of text
                   in every image.
  coffee  object   an espresso cup on its saucer seen from above (coffee.png, colour); the same
                   376 px square in every image.
  logo    object   the scikit-image logo (logo.png, colour), printed on white.
  grass_disjoint, gravel_disjoint
          texture  the same photographs in 160 px crops from disjoint parts: train/good from the
                   left half, test/ (good and defective) from the bottom-right quadrant, and a
                   separate category root <name>_holdout/train/good (--n_holdout crops) from the
                   top-right quadrant, for main_train.py --holdout_root. The test is a new stretch
                   of the same surface: held-out crops taken from train/good overlap the training
                   crops and score lower than any new image, so a threshold learnt on them flags
                   new normal images. Not in --categories all (their surfaces are grass's and
                   gravel's again: a mean over all would count them twice).

Normal variation: textures get a new crop position and one of the 8 turns/mirrors per image;
objects keep their framing but move by up to 2 px and turn by up to 1 degree. Every image gets its
own gain (about 3%), offset, white balance (colour photos) and sensor noise (read noise plus shot
noise that grows with brightness).

Defects (one per anomalous image, drawn on a fresh normal image of its own, by util/defects.py at
full strength inside the category's region; sizes given at 224 px):
  scratch   a thin curved line 1-3 px wide, lighter or darker than the surface
  hole      a small dark pit with a raised, lit rim (a poke)
  stain     a soft-edged discolouration: darker, lighter or tinted, some of them faint
  particle  a small opaque bit of another material: a flake or a fibre, with its shadow
  crack     thin dark branching lines that taper
  missing   objects only: part of the subject erased (a piece of the cup or of the logo, filled in
            from its surroundings) or printed shifted by a few px; on the page a printed word is
            gone (this script's `erase_part` for util.defects.missing)

Masks are exact: each anomalous image is rendered twice from the same random state, with and
without its defect, through the same camera (gain, offset, noise) in floating point; the mask is
where the two differ by more than 2/255 in some channel, and outside it the anomalous image takes
the defect-free values, so after quantisation the PNG differs from the defect-free render exactly
on the mask. Each image has its own random stream derived from (seed, category, split, defect,
index): the output is determined by the seed, and changing a count does not change other images.
PNGs are written without metadata, so the same seed gives the same bytes.

Example:
  python scripts/make_photo_mvtec.py --dst data/photo --categories grass,page
  python main_train.py --data_path data/photo/page ...
"""
import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import OneLineArgumentParser, UserError, run_cli  # noqa: E402
from util.datasets import MIN_HOLDOUT  # noqa: E402
from util.defects import DEFECT_MAKERS, MAX_TRIES, Region, visible  # noqa: E402

MARKER = ".synthetic_mvtec.json"  # scripts/run_mvtec.py reads {"kind": ...} from it
MASK_THRESHOLD = 2.0  # grey levels (of 255): a pixel is in the mask when the defect changed it more
SHIFT = 2.0  # an object moves by up to this many px (at 224 px; in proportion at other sizes)
MAX_ENLARGE = 1.5  # --size may enlarge a category's crop by at most this factor
TRAIN, TEST, HOLDOUT = 0, 1, 2  # split codes (in each image's random stream)
# where a disjoint texture's crops of each split come from: (y0, x0, y1, x1) in fractions of the photo
DISJOINT_PARTS = {TRAIN: (0.0, 0.0, 1.0, 0.5), TEST: (0.5, 0.5, 1.0, 1.0), HOLDOUT: (0.0, 0.5, 0.5, 1.0)}
CROP_MARGIN = 2.0  # photo pixels between a texture crop and the edge of its photo or part
HOLDOUT_SUFFIX = "_holdout"  # a disjoint category's held-out normal crops: DST/<name>_holdout/train/good
TEXTURE_DEFECTS = ("scratch", "hole", "stain", "particle", "crack")
OBJECT_DEFECTS = TEXTURE_DEFECTS + ("missing",)
KEPT_ASIDE = ("brick", "coins")

Array = np.ndarray


@dataclass(frozen=True)
class Photo:
    file: str  # inside skimage/data/
    kind: str  # texture | object
    side: int  # crop side in photo pixels
    centre: Optional[Tuple[float, float]]  # (y, x) of an object's crop; textures: random
    # where defects may sit, as an ellipse in output fractions (cy, cx, ry, rx)
    region: Region = (0.5, 0.5, 0.45, 0.45)
    about: str = ""
    disjoint: bool = False  # a texture whose splits are cropped from DISJOINT_PARTS


PHOTOS: Dict[str, Photo] = {
    "grass": Photo("grass.png", "texture", 256, None, (0.5, 0.5, 0.44, 0.44),
                   "a lawn seen from above, random crops turned and mirrored"),
    "gravel": Photo("gravel.png", "texture", 256, None, (0.5, 0.5, 0.44, 0.44),
                    "fine gravel seen from above, random crops turned and mirrored"),
    "page": Photo("page.png", "object", 176, (95.5, 98.0), (0.5, 0.5, 0.44, 0.44),
                  "a photographed printed page, the same square of text in every image"),
    "coffee": Photo("coffee.png", "object", 376, (200.0, 280.0), (0.56, 0.5, 0.36, 0.42),
                    "an espresso cup on its saucer seen from above"),
    "logo": Photo("logo.png", "object", 470, (250.0, 250.0), (0.5, 0.5, 0.42, 0.42),
                  "the scikit-image logo printed on white"),
    "grass_disjoint": Photo("grass.png", "texture", 160, None, (0.5, 0.5, 0.44, 0.44),
                            "grass in 160 px crops: train from the left half of the photo, test from "
                            "the bottom-right quadrant, <name>_holdout from the top-right", disjoint=True),
    "gravel_disjoint": Photo("gravel.png", "texture", 160, None, (0.5, 0.5, 0.44, 0.44),
                             "gravel, cropped as grass_disjoint", disjoint=True),
}
ALL_CATEGORIES = tuple(n for n, p in PHOTOS.items() if not p.disjoint)  # --categories all


def defects_of(name: str) -> Tuple[str, ...]:
    return TEXTURE_DEFECTS if PHOTOS[name].kind == "texture" else OBJECT_DEFECTS


# ----------------------------------------------------------------------------------- the photos
def data_dir() -> Path:
    """scikit-image's bundled data folder (skimage/data), found without importing the package."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("scikit-image is not installed; the photos come from its package: "
                        "pip install scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def skimage_version() -> str:
    try:
        return importlib.metadata.version("scikit-image")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def photo_path(name: str) -> Path:
    path = data_dir() / PHOTOS[name].file
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed scikit-image ({skimage_version()}); "
                        f"reinstall it (pip install --force-reinstall scikit-image) or leave "
                        f"{name} out of --categories")
    return path


def check_categories(text: str) -> List[str]:
    """--categories value -> category names, refusing unknown and kept-aside ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--categories is empty; pass all or a comma-separated list of "
                        + ", ".join(PHOTOS))
    if names == ["all"]:
        return list(ALL_CATEGORIES)
    out: List[str] = []
    for n in names:
        if n in KEPT_ASIDE:
            raise UserError(f"--categories {n}: the {n} photo is kept aside for independent checks "
                            f"and is never used here; choose from {', '.join(PHOTOS)}")
        if n not in PHOTOS:
            raise UserError(f"--categories {n}: unknown category; available: "
                            f"{', '.join(PHOTOS)} (or all)")
        if n not in out:
            out.append(n)
    return out


def check_size(name: str, size: int, shape: Optional[Tuple[int, int]] = None) -> None:
    """Refuse a --size that would enlarge the crop too much, or a photo too small for its crop."""
    ph = PHOTOS[name]
    if size < 32:
        raise UserError(f"--size {size} is too small; use at least 32")
    if size > MAX_ENLARGE * ph.side:
        raise UserError(f"--size {size} is too large for {name}: its photo gives a {ph.side} px crop "
                        f"(at most {MAX_ENLARGE}x enlargement, --size <= {int(MAX_ENLARGE * ph.side)}); "
                        f"choose a smaller --size or leave {name} out of --categories")
    if shape is not None:
        h, w = shape
        if ph.centre is None:  # textures: room for crops at different places (in each part)
            fits = min(h, w) * (0.5 if ph.disjoint else 1.0) >= 1.5 * ph.side
        else:
            cy, cx = ph.centre
            m = _margin(ph.side)
            fits = (cy - ph.side / 2 - m >= 0 and cy + ph.side / 2 + m <= h
                    and cx - ph.side / 2 - m >= 0 and cx + ph.side / 2 + m <= w)
        if not fits:
            raise UserError(f"the {ph.file} photo ({w}x{h} px) is too small for the {ph.side} px crop "
                            f"of {name}; this scikit-image ({skimage_version()}) ships a different "
                            f"file: install scikit-image 0.26 or leave {name} out of --categories")


def _margin(side: int) -> float:
    """Photo pixels an object's crop may move by: the shift, a 1 degree turn, 1 px to spare."""
    return SHIFT * side / 224 + side * 0.7072 * np.sin(np.deg2rad(1.0)) + 1.0


@lru_cache(maxsize=8)
def _source(name: str, size: int) -> Array:
    """The photo as float32 [H, W, C] in [0, 1] (C = 1 grey, 3 colour), low-passed for the scale."""
    path = photo_path(name)
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba).convert("RGB")
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        a = np.asarray(im, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = a[..., None]
    check_size(name, size, a.shape[:2])
    scale = PHOTOS[name].side / size
    if scale > 1.0:  # anti-aliasing before resampling
        sigma = 0.5 * np.sqrt(scale * scale - 1.0)
        a = ndimage.gaussian_filter(a, (sigma, sigma, 0))
    return np.ascontiguousarray(a)


def _warp(src: Array, size: int, scale: float, cy: float, cx: float, theta: float) -> Array:
    """Sample an output square [S, S, C]: pixel (i, j) -> photo (cy, cx) + R(theta) (i, j) * scale."""
    t = ((np.arange(size, dtype=np.float64) + 0.5) - size / 2) * scale
    yy, xx = t[:, None], t[None, :]
    c, s = np.cos(theta), np.sin(theta)
    sy = cy + c * yy - s * xx - 0.5  # photo pixel centres sit at index + 0.5
    sx = cx + s * yy + c * xx - 0.5
    out = np.empty((size, size, src.shape[2]), np.float32)
    for ch in range(src.shape[2]):
        out[..., ch] = ndimage.map_coordinates(src[..., ch], [sy, sx], order=1, mode="reflect")
    return out


# ------------------------------------------------------------------------------------- the camera
def _rng(seed: int, name: str, split: int, defect: int, index: int) -> np.random.Generator:
    code = zlib.crc32(name.encode()) & 0x7FFFFFFF
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(code, split, defect, index)))


def _texture_centre(ph: Photo, shape: Tuple[int, int], split: int, rng: np.random.Generator
                    ) -> Tuple[float, float]:
    """(y, x) in photo pixels of a texture crop's centre: anywhere in the photo, or in the split's
    part for a disjoint texture, CROP_MARGIN inside it."""
    h, w = shape
    y0, x0, y1, x1 = DISJOINT_PARTS[split] if ph.disjoint else (0.0, 0.0, 1.0, 1.0)
    half = ph.side / 2 + CROP_MARGIN
    cy = float(rng.uniform(y0 * h + half, y1 * h - half))
    cx = float(rng.uniform(x0 * w + half, x1 * w - half))
    return cy, cx


def _normal_scene(name: str, size: int, split: int, rng: np.random.Generator) -> Tuple[Array, dict]:
    """A defect-free scene [S, S, C] in [0, 1] and the camera's parameters (drawn first)."""
    ph = PHOTOS[name]
    src = _source(name, size)
    scale = ph.side / size
    if ph.centre is None:  # texture: a new piece of the photo, turned/mirrored
        cy, cx = _texture_centre(ph, src.shape[:2], split, rng)
        scene = _warp(src, size, scale, cy, cx, 0.0)
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        scene = np.rot90(scene, k, axes=(0, 1))
        if flip:
            scene = scene[:, ::-1]
        scene = np.ascontiguousarray(scene)
    else:  # object: the same framing, moved by up to 2 px and turned by up to 1 degree
        dy, dx = rng.uniform(-SHIFT, SHIFT, 2) * ph.side / 224
        theta = float(np.deg2rad(rng.uniform(-1.0, 1.0)))
        scene = _warp(src, size, scale, ph.centre[0] + dy, ph.centre[1] + dx, theta)
    c = scene.shape[2]
    cam = {
        "gain": float(rng.normal(1.0, 0.03)),
        "offset": float(rng.normal(0.0, 0.01)),
        "balance": (1.0 + rng.normal(0.0, 0.012, c)).astype(np.float32) if c == 3
        else np.ones(1, np.float32),
        "read": rng.normal(0.0, 1.2 / 255, scene.shape).astype(np.float32),
        "shot": rng.normal(0.0, 1.0, scene.shape).astype(np.float32),
    }
    return scene, cam


def _camera(scene: Array, cam: dict) -> Array:
    """Scene -> recorded values in grey levels [0, 255] (float): gain, offset, noise, clipping."""
    lit = scene * (cam["gain"] * cam["balance"]) + cam["offset"]
    noisy = lit + cam["read"] + 0.008 * np.sqrt(np.clip(lit, 0.0, 1.0)) * cam["shot"]
    return np.clip(noisy, 0.0, 1.0) * 255.0


def _quantise(v: Array) -> Array:
    return np.rint(v).astype(np.uint8)


# ------------------------------------------------------------------------------------ the defects
def _words(scene: Array, f: float) -> Tuple[Array, int]:
    """Printed words of a page: (labels [S, S], count); ink is darker than the local paper."""
    lum = scene.mean(axis=2)
    k = max(3, int(round(7 * f)) | 1)
    paper = ndimage.gaussian_filter(ndimage.grey_closing(lum, size=(k, k)), 1.0)
    ink = (paper - lum) > 0.12
    joined = ndimage.binary_closing(ink, structure=np.ones((max(1, int(round(f))) + 1,
                                                            max(3, int(round(4 * f))))))
    return ndimage.label(joined)


def _missing_word(scene: Array, rng: np.random.Generator, region: Region, f: float) -> Optional[Array]:
    """The page's `missing`: a word that was not printed, the page shows plain paper there; None
    when no word of a word's size lies in the region (util.defects.missing then erases a part)."""
    s = scene.shape[0]
    labels, n = _words(scene, f)
    if not n:
        return None
    objs = ndimage.find_objects(labels)
    cy, cx, ry, rx = region
    ok = []
    for i, sl in enumerate(objs):
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        my, mx = (sl[0].start + h / 2) / s, (sl[1].start + w / 2) / s
        if 3 * f <= h <= 16 * f and 6 * f <= w <= 60 * f and \
                ((my - cy) / ry) ** 2 + ((mx - cx) / rx) ** 2 <= 1:
            ok.append(i)
    if not ok:
        return None
    sl = objs[ok[int(rng.integers(len(ok)))]]
    pad = max(1, int(round(f)))
    y0, y1 = max(0, sl[0].start - pad), min(s, sl[0].stop + pad)
    x0, x1 = max(0, sl[1].start - pad), min(s, sl[1].stop + pad)
    k = max(3, int(round(7 * f)) | 1)
    paper = np.stack([ndimage.gaussian_filter(
        ndimage.grey_closing(scene[..., ch], size=(k, k)), 1.0)
        for ch in range(scene.shape[2])], axis=2)
    # the ink goes: pixels darker than the paper around them are lifted to it
    out = scene.copy()
    out[y0:y1, x0:x1] = np.maximum(scene[y0:y1, x0:x1], paper[y0:y1, x0:x1] - 0.03)
    return out


def _apply(defect: str, name: str, scene: Array, rng: np.random.Generator) -> Array:
    """The scene [S, S, C] with one defect drawn in its region, at full strength (util.defects)."""
    extra = {"erase_part": _missing_word} if (defect, name) == ("missing", "page") else {}
    return DEFECT_MAKERS[defect](scene, rng, PHOTOS[name].region, **extra)


# ------------------------------------------------------------------------------------- rendering
def render_from(name: str, size: int, split: int, rng: np.random.Generator, defect: Optional[str]
                ) -> Tuple[Array, Optional[Array]]:
    """One image of a split from a random stream: (uint8 [S, S] grey or [S, S, 3], bool mask [S, S]
    or None).

    The normal image's randomness is drawn before the defect's, so the same stream with
    defect=None gives the defect-free image the defect was drawn on."""
    scene, cam = _normal_scene(name, size, split, rng)
    clean = _camera(scene, cam)
    if defect is None:
        return _squeeze(_quantise(clean)), None
    for _ in range(MAX_TRIES):  # a defect that barely shows (flat spot, tiny size) is drawn again
        bad = _camera(_apply(defect, name, scene, rng), cam)
        mask = np.abs(bad - clean).max(axis=2) > MASK_THRESHOLD
        if visible(mask):
            out = np.where(mask[..., None], bad, clean)  # unchanged outside the mask, to the bit
            return _squeeze(_quantise(out)), mask
    raise RuntimeError(f"could not draw a visible {defect} on {name} at size {size}")


def _squeeze(a: Array) -> Array:
    return a[..., 0] if a.shape[2] == 1 else a


def _image_rng(name: str, seed: int, split: int, defect: Optional[str], index: int) -> np.random.Generator:
    code = 0 if defect is None else 1 + defects_of(name).index(defect)
    return _rng(seed, name, split, code, index)


def render_image(name: str, size: int, seed: int, split: int, defect: Optional[str], index: int
                 ) -> Tuple[Array, Optional[Array]]:
    """Image `index` of a split (TRAIN, TEST, HOLDOUT) and defect (None: good) for a seed."""
    return render_from(name, size, split, _image_rng(name, seed, split, defect, index), defect)


def crop_box(name: str, size: int, seed: int, split: int, defect: Optional[str], index: int
             ) -> Tuple[float, float, float, float]:
    """The square (y0, x0, y1, x1) of the photograph, in its pixels, that a texture image shows."""
    ph = PHOTOS[name]
    if ph.centre is not None:
        raise ValueError(f"{name} is an object: every image shows the same square")
    cy, cx = _texture_centre(ph, _source(name, size).shape[:2], split,
                             _image_rng(name, seed, split, defect, index))
    return cy - ph.side / 2, cx - ph.side / 2, cy + ph.side / 2, cx + ph.side / 2


def _save_png(arr: Array, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)  # no metadata: same bytes


def check_counts(n_train: int, n_test_good: int, n_per_defect: int) -> None:
    for flag, count in (("--n_train", n_train), ("--n_test_good", n_test_good),
                        ("--n_per_defect", n_per_defect)):
        if count < 1:
            raise UserError(f"{flag} {count}: image counts must be 1 or more")


def check_holdout_count(n_holdout: int) -> None:
    if n_holdout < MIN_HOLDOUT:
        raise UserError(f"--n_holdout {n_holdout}: main_train.py --holdout_root needs at least "
                        f"{MIN_HOLDOUT} held-out images")


def check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a folder; choose another --dst")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise UserError(f"{dst} is not empty; choose another --dst or pass --overwrite to replace "
                        f"its train/, test/ and ground_truth/")


def make_category(dst: Path, name: str, seed: int = 0, size: int = 224, n_train: int = 200,
                  n_test_good: int = 40, n_per_defect: int = 10, overwrite: bool = False,
                  progress: bool = False) -> Dict[str, int]:
    """Write one photo category to `dst` (the category folder) in the raw MVTec layout; returns
    {folder: count}. A non-empty `dst` is refused unless `overwrite`."""
    if name not in PHOTOS:
        check_categories(name)  # raises the one-line reason
    check_counts(n_train, n_test_good, n_per_defect)
    check_size(name, size)
    dst = Path(dst)
    check_destination(dst, overwrite)
    _source(name, size)  # the photo is there and large enough, before anything is written
    for part in ("train", "test", "ground_truth"):
        if (dst / part).is_dir():
            shutil.rmtree(dst / part)
    if (dst / MARKER).is_file():
        (dst / MARKER).unlink()
    defects = defects_of(name)
    jobs: List[Tuple[str, int, Optional[str], int]] = []  # (folder, split, defect, index)
    jobs += [("train/good", TRAIN, None, i) for i in range(n_train)]
    jobs += [("test/good", TEST, None, i) for i in range(n_test_good)]
    for defect in defects:
        jobs += [(f"test/{defect}", TEST, defect, i) for i in range(n_per_defect)]
    counts: Dict[str, int] = {"train/good": n_train, "test/good": n_test_good}
    for defect in defects:
        counts[f"test/{defect}"] = n_per_defect
        counts[f"ground_truth/{defect}"] = n_per_defect
    for folder in counts:
        (dst / folder).mkdir(parents=True, exist_ok=True)
    it = jobs
    if progress:
        from tqdm import tqdm
        it = tqdm(jobs, desc=name, leave=False)
    for folder, split, defect, i in it:
        img, mask = render_image(name, size, seed, split, defect, i)
        _save_png(img, dst / folder / f"{i:03d}.png")
        if mask is not None:
            _save_png(mask.astype(np.uint8) * 255, dst / "ground_truth" / defect / f"{i:03d}_mask.png")
    ph = PHOTOS[name]
    meta = {"kind": ph.kind, "source": ph.file, "package": f"scikit-image {skimage_version()}",
            "generator": "scripts/make_photo_mvtec.py", "seed": seed, "size": size,
            "crop": ph.side, "n_train": n_train, "n_test_good": n_test_good,
            "n_per_defect": n_per_defect, "defects": list(defects)}
    if ph.disjoint:
        meta.update(parts={"train": DISJOINT_PARTS[TRAIN], "test": DISJOINT_PARTS[TEST],
                           "holdout": DISJOINT_PARTS[HOLDOUT]}, holdout_root=name + HOLDOUT_SUFFIX)
    (dst / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
    return counts


def make_holdout(dst: Path, name: str, seed: int = 0, size: int = 224, n_holdout: int = 16,
                 overwrite: bool = False, progress: bool = False) -> int:
    """Write a disjoint texture's held-out normal crops (its HOLDOUT part) to `dst`/train/good, a
    category root for main_train.py --holdout_root; returns the count. A non-empty `dst` is
    refused unless `overwrite`."""
    if name not in PHOTOS:
        check_categories(name)
    ph = PHOTOS[name]
    if not ph.disjoint:
        raise UserError(f"{name} has no held-out part; only " + ", ".join(
            n for n, p in PHOTOS.items() if p.disjoint) + " have one")
    check_holdout_count(n_holdout)
    check_size(name, size)
    dst = Path(dst)
    check_destination(dst, overwrite)
    _source(name, size)
    if (dst / "train").is_dir():
        shutil.rmtree(dst / "train")
    if (dst / MARKER).is_file():
        (dst / MARKER).unlink()
    (dst / "train/good").mkdir(parents=True)
    it = range(n_holdout)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=name + HOLDOUT_SUFFIX, leave=False)
    for i in it:
        _save_png(render_image(name, size, seed, HOLDOUT, None, i)[0], dst / "train/good" / f"{i:03d}.png")
    (dst / MARKER).write_text(json.dumps({
        "kind": ph.kind, "holdout": True, "holdout_for": name, "source": ph.file,
        "package": f"scikit-image {skimage_version()}", "generator": "scripts/make_photo_mvtec.py",
        "seed": seed, "size": size, "crop": ph.side, "part": DISJOINT_PARTS[HOLDOUT],
        "n_holdout": n_holdout}, indent=1) + "\n")
    return n_holdout


def get_args_parser() -> argparse.ArgumentParser:
    cats = "; ".join(f"{n} ({p.kind}, {p.file}: {p.about})" for n, p in PHOTOS.items())
    p = OneLineArgumentParser(
        description="Build MVTec-style categories from real photographs that ship inside the "
                    "scikit-image package (nothing is downloaded), in the raw MVTec AD layout: "
                    "DST/<category>/train/good/000.png, .../test/good/000.png, "
                    ".../test/<defect>/000.png, .../ground_truth/<defect>/000_mask.png (0/255 "
                    "masks of exactly the pixels each defect changed by more than 2/255) and the "
                    f"marker {MARKER} ({{\"kind\": texture|object, \"source\": photo, \"seed\": "
                    f"...}}, read by scripts/run_mvtec.py). Categories: {cats}. Normal variation: "
                    "textures are random crops turned/mirrored, objects move by up to 2 px and "
                    "turn by up to 1 degree; every image has its own gain, offset and sensor "
                    "noise. The disjoint textures crop train/good, test/ and the held-out root "
                    f"DST/<category>{HOLDOUT_SUFFIX}/train/good (for main_train.py --holdout_root) "
                    "from disjoint parts of their photograph. Defects (util/defects.py): "
                    + ", ".join(TEXTURE_DEFECTS) + " (all categories) and "
                    "missing (objects: an erased or shifted part). brick and coins are kept "
                    "aside for independent checks and refused. Same --seed, same bytes. About 5 s "
                    "of CPU per category at the defaults (50 s for all five on 2 busy cores).",
        epilog="Example: python scripts/make_photo_mvtec.py --dst data/photo --categories "
               "grass,page && python main_train.py --data_path data/photo/page ...",
    )
    p.add_argument("--dst", type=Path, required=True,
                   help="output root, like the MVTec AD root: each category is written to "
                        "DST/<category> (pass that folder as --data_path)")
    p.add_argument("--categories", default="all",
                   help="comma-separated categories: " + ", ".join(PHOTOS) + "; all = "
                        + ", ".join(ALL_CATEGORIES) + " (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; same seed, same files (default: %(default)s)")
    p.add_argument("--size", type=int, default=224,
                   help="image side in pixels, square images; at most 1.5x a category's crop "
                        f"(page: {int(MAX_ENLARGE * PHOTOS['page'].side)}) (default: %(default)s)")
    p.add_argument("--n_train", type=int, default=200,
                   help="normal training images per category (default: %(default)s)")
    p.add_argument("--n_test_good", type=int, default=40,
                   help="normal test images per category (default: %(default)s)")
    p.add_argument("--n_per_defect", type=int, default=10,
                   help="anomalous test images per defect type (default: %(default)s)")
    p.add_argument("--n_holdout", type=int, default=16,
                   help="held-out normal crops of each disjoint category, written to "
                        f"DST/<category>{HOLDOUT_SUFFIX}/train/good (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the train/, test/ and ground_truth/ of a non-empty "
                        "DST/<category> (refused otherwise)")
    p.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    return p


def main(args: argparse.Namespace) -> None:
    names = check_categories(args.categories)
    check_counts(args.n_train, args.n_test_good, args.n_per_defect)
    disjoint = [n for n in names if PHOTOS[n].disjoint]
    if disjoint:
        check_holdout_count(args.n_holdout)
    if args.dst.exists() and not args.dst.is_dir():
        raise UserError(f"--dst {args.dst} exists and is not a folder; choose another --dst")
    for name in names:  # every refusal before the first file is written
        check_size(name, args.size)
        check_destination(args.dst / name, args.overwrite)
        if name in disjoint:
            check_destination(args.dst / (name + HOLDOUT_SUFFIX), args.overwrite)
        _source(name, args.size)
    t_all = time.time()
    for name in names:
        t0 = time.time()
        counts = make_category(args.dst / name, name, seed=args.seed, size=args.size,
                               n_train=args.n_train, n_test_good=args.n_test_good,
                               n_per_defect=args.n_per_defect, overwrite=args.overwrite,
                               progress=True)
        images = sum(v for k, v in counts.items() if not k.startswith("ground_truth"))
        defects = ", ".join(defects_of(name))
        print(f"{name:7s} {PHOTOS[name].kind:7s} {images} images ({args.n_train} train, "
              f"{args.n_test_good} good, {args.n_per_defect} each of {defects}) in "
              f"{time.time() - t0:.1f} s -> {args.dst / name}", flush=True)
        if name in disjoint:
            root = args.dst / (name + HOLDOUT_SUFFIX)
            n = make_holdout(root, name, seed=args.seed, size=args.size, n_holdout=args.n_holdout,
                             overwrite=args.overwrite, progress=True)
            print(f"{name + HOLDOUT_SUFFIX} {n} held-out normal images -> {root} "
                  f"(main_train.py --holdout_root {root})", flush=True)
    print(f"wrote {len(names)} categories ({args.size}px, seed {args.seed}) in "
          f"{time.time() - t_all:.1f} s")


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    sys.exit(run_cli(main, _args, _args.debug))
