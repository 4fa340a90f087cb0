"""Reading MVTec-style category folders (raw and prepared layouts) into tensors.

Layouts (see INTERFACE.md); both are read by the same rules:

    <root>/train/good/<name>.<ext>                 normal training images
    <root>/test/good/<name>.<ext>                  normal test images (label 0)
    <root>/test/<folder>/<name>.<ext>              anomalous test images (label 1), any folder but good
    <root>/ground_truth/<folder>/<stem>_mask.<ext> pixel masks, non-zero = anomalous (optional)

Raw MVTec: <folder> is the defect name. Prepared (scripts/prepare_mvtec.py): <folder> is `bad` and the
file is `<defect>_<name>`; the defect name is recovered from the stem by dropping the last
`_<digits>` suffix (`faulty_imprint_003` -> `faulty_imprint`), and is `bad` when the stem has no such
suffix. Defect names may contain '_', so splitting at the first '_' would be wrong.

Images are decoded once, when a dataset is built, and kept in memory as uint8 tensors: training runs
for thousands of epochs over a few hundred images, and decoding PNGs every epoch would dominate.
Hidden files (names starting with '.', e.g. macOS `._000.png`) are never images.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from util.cli import UserError, warn
from util.images import (COMMON_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, PathLike, UnreadableImage,  # noqa: F401
                         find_images, is_image_file, load_rgb, open_decoded, resize_square)

# The training jiggle: a random translation of up to this fraction of the image each way. Only a
# translation: test images are resized to input_size with no crop, so a scale change in training
# (resize larger, then crop) would teach the model objects larger than any it is tested on.
JITTER_FRACTION = 0.01
# Held-out normal images (--holdout > 0, or --holdout_root): at least this many, so per-pixel
# statistics and a score quantile of normal images exist even for small categories.
MIN_HOLDOUT = 5
_PROGRESS_MIN = 50  # show a progress bar when decoding more images than this


def load_mask(path: PathLike) -> np.ndarray:
    """Decode a mask: bool array [H, W], True where any channel is non-zero (alpha ignored)."""
    path = Path(path)
    img = open_decoded(path)
    if img.mode in ("1", "L") or img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img)
    else:
        a = np.asarray(img.convert("RGB")).max(axis=2)
    return np.asarray(a > 0)


def list_images(folder: PathLike) -> List[Path]:
    """Image files directly in `folder` (not recursive), sorted by name; [] if it is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


_DIGIT_SUFFIX = re.compile(r"^(.+)_\d+$")


def defect_from_prepared_stem(stem: str) -> str:
    """'faulty_imprint_003' -> 'faulty_imprint'; 'bad' when the stem has no '_<digits>' suffix."""
    m = _DIGIT_SUFFIX.match(stem)
    return m.group(1) if m else "bad"


def raw_layout_stem(rel_path: str) -> str:
    """The image's path in the raw MVTec layout, without extension, from either layout:
    'test/bad/crack_000.png' -> 'test/crack/000', 'test/crack/000.png' -> 'test/crack/000'.

    MVTec AD's own evaluation names maps by the raw defect folder and image id; a prepared stem
    without a '_<digits>' suffix keeps `bad` as its defect and its stem as the id.
    """
    path = Path(rel_path)
    folder, stem = path.parent, path.stem
    if folder.name == "bad":
        defect = defect_from_prepared_stem(stem)
        if defect != "bad":
            return (folder.parent / defect / stem[len(defect) + 1:]).as_posix()
    return (folder / stem).as_posix()


@dataclass
class TestItem:
    __test__ = False  # not a pytest test class despite the name

    path: Path  # absolute
    rel_path: str  # relative to the category root (or the --images folder), posix separators
    label: int  # 0 good, 1 anomalous, -1 unknown
    defect: str  # 'good', the defect name, or '' when unknown
    mask_path: Optional[Path] = None

    @property
    def has_mask(self) -> bool:
        """Whether a pixel ground truth exists: good images (all-zero) or a mask file."""
        return self.label == 0 or (self.label == 1 and self.mask_path is not None)


def _mask_index(folder: Path) -> Dict[str, Path]:
    """Map image stem -> mask file for `<stem>_mask.<ext>` files in `folder` (.png preferred)."""
    index: Dict[str, Path] = {}
    for p in list_images(folder):
        if not p.stem.endswith("_mask"):
            continue
        key = p.stem[: -len("_mask")]
        if key not in index or (p.suffix.lower() == ".png" and index[key].suffix.lower() != ".png"):
            index[key] = p
    return index


def find_test_items(root: PathLike, split: str = "test") -> List[TestItem]:
    """All images under root/split/<folder>/, labelled by folder ('good' = 0, others = 1)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data path {root} does not exist or is not a folder; pass a category "
                        f"folder that holds {split}/good and {split}/<defect> sub-folders")
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"data path {root} has no '{split}' folder; expected {split_dir}/good "
                        f"and {split_dir}/<defect> (the raw or prepared MVTec layout)")
    root_abs = root.absolute()
    items: List[TestItem] = []
    orphans: List[Path] = []  # masks whose image is missing: warned about, never read
    subs = [p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    # good first, then defect folders by name: the raw and prepared layouts list the same order
    for sub in sorted(subs, key=lambda p: (p.name != "good", p.name)):
        images = list_images(sub)
        if sub.name == "good":
            masks: Dict[str, Path] = {}
        else:
            masks = _mask_index(root / "ground_truth" / sub.name)
            stems = {p.stem for p in images}
            orphans.extend(masks[k] for k in sorted(masks) if k not in stems)
        for p in images:
            if sub.name == "good":
                label, defect = 0, "good"
            else:
                label = 1
                defect = defect_from_prepared_stem(p.stem) if sub.name == "bad" else sub.name
            items.append(TestItem(path=root_abs / split / sub.name / p.name,
                                  rel_path=f"{split}/{sub.name}/{p.name}", label=label,
                                  defect=defect, mask_path=masks.get(p.stem)))
    if not items:
        raise UserError(f"no test images found in {split_dir}/<good|defect>/ (extensions: "
                        f"{', '.join(COMMON_EXTENSIONS)} ...)")
    if orphans:
        warn(f"ignoring {len(orphans)} mask(s) without an image in {split_dir} (e.g. {orphans[0]}): "
             f"a mask <stem>_mask.<ext> belongs to the image <stem>.<ext> in the same defect folder")
    return items


def unlabelled_items(path: PathLike) -> List[TestItem]:
    """Items for `--images PATH`: one image file, or every image under a folder (recursive)."""
    return [TestItem(path=p, rel_path=rel, label=-1, defect="") for p, rel in find_images(path)]


def train_folder(root: PathLike) -> Path:
    """root/train/good, checked: a one-line error when the root or the folder is missing."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data path {root} does not exist; pass --data_path pointing to a "
                        f"category folder with train/good/ inside")
    folder = root / "train" / "good"
    if not folder.is_dir():
        raise UserError(f"data path {root} has no train/good folder; expected normal training "
                        f"images in {folder} (the raw or prepared MVTec layout)")
    return folder


def holdout_names(root: PathLike, fraction: float, seed: int, strict: bool = True) -> List[str]:
    """File names (in root/train/good) of the normal images kept out of training, sorted.

    max(MIN_HOLDOUT, round(fraction * n)) images drawn with numpy's generator seeded by `seed`
    from the sorted listing, so every process of a run (and a resumed run) draws the same ones.
    fraction 0 holds out nothing. At least as many images must stay for training as are held out:
    otherwise a UserError, or (strict=False, for the default fraction) a warning and no hold-out.
    """
    if not 0.0 <= fraction < 0.5:
        raise UserError(f"--holdout {fraction}: must be in [0, 0.5) (a fraction of train/good; 0 = none)")
    if fraction == 0:
        return []
    files = list_images(train_folder(root))
    count = max(MIN_HOLDOUT, round(fraction * len(files)))
    if len(files) - count < count:
        if not strict:
            warn(f"{Path(root) / 'train' / 'good'} has only {len(files)} images: none held out for calibration "
                 f"(needs at least {2 * MIN_HOLDOUT}); scoring will be uncalibrated, with no decision threshold")
            return []
        raise UserError(f"--holdout {fraction}: {Path(root) / 'train' / 'good'} has {len(files)} images; holding "
                        f"out {count} (at least {MIN_HOLDOUT}) would leave {len(files) - count} to train on; "
                        f"add images or pass --holdout 0 (no calibration then)")
    picked = np.random.default_rng(seed).permutation(len(files))[:count]
    return sorted(files[i].name for i in picked)


def holdout_root_names(root: PathLike, data_path: PathLike) -> List[str]:
    """File names of every image in root/train/good (main_train.py --holdout_root: normal images apart
    from the training images of `data_path`, e.g. another stretch of the same surface), sorted.

    A UserError when the folder is missing, is data_path's own train/good, or holds fewer than
    MIN_HOLDOUT images.
    """
    folder = Path(root) / "train" / "good"
    if not folder.is_dir():
        raise UserError(f"--holdout_root {root}: no folder {folder}; pass a category root whose train/good "
                        f"holds normal images that are not training images")
    if folder.resolve() == (Path(data_path) / "train" / "good").resolve():
        raise UserError(f"--holdout_root {root} is --data_path: its images are the training images, which "
                        f"score lower than new ones; pass another root, or --holdout FRACTION instead")
    names = [p.name for p in list_images(folder)]
    if len(names) < MIN_HOLDOUT:
        raise UserError(f"--holdout_root {root}: {folder} has {len(names)} images; calibration needs at least "
                        f"{MIN_HOLDOUT} normal images there")
    return names


def holdout_items(root: PathLike, names: Sequence[str]) -> List[TestItem]:
    """The held-out normal images as label-0 items (rel_path train/good/<name>) for scoring."""
    folder = train_folder(root).absolute()
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{len(missing)} held-out image(s) are missing from {folder} (e.g. {missing[0]}); "
                        f"the data changed since training")
    return [TestItem(path=folder / n, rel_path=f"train/good/{n}", label=0, defect="good") for n in names]


def _progress(seq: Sequence, desc: str):
    if len(seq) <= _PROGRESS_MIN:
        return seq
    from tqdm import tqdm
    return tqdm(seq, desc=desc, leave=False)


def _decode_resized(path: Path, size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """-> (uint8 tensor [3, size, size], original (width, height)); raises UnreadableImage."""
    img = load_rgb(path)
    orig = img.size
    arr = resize_square(img, size)  # [S, S, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), orig


def jitter_margin(input_size: int) -> int:
    """Largest training shift in pixels for an input size (at least 1): 1 px at 112, 2 px at 224."""
    return max(1, round(input_size * JITTER_FRACTION))


def _edge_pad(img: torch.Tensor, margin: int) -> torch.Tensor:
    """uint8 [3, S, S] -> [3, S + 2m, S + 2m], the border repeating the edge pixels."""
    if margin == 0:
        return img
    return F.pad(img[None].float(), (margin,) * 4, mode="replicate")[0].to(torch.uint8)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """Bool mask [H, W] -> float32 {0, 1} tensor [size, size] by area averaging, then > 0.5.

    When the threshold empties a non-empty mask (a defect thinner than the downscale factor, e.g. a
    1-px crack in a 1024-px mask resized to 224) the mask is thresholded at > 0 instead, so that a
    defect never vanishes from the pixel ground truth.
    """
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]  # [1, 1, H, W]
    area = F.interpolate(m, size=(size, size), mode="area")[0, 0]  # [S, S]
    out = area > 0.5
    if not bool(out.any()) and bool(m.any()):
        out = area > 0
    return out.to(torch.float32)


def _normalise(img_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (img_u8.to(torch.float32) / 255.0 - mean) / std


def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float32 normalised as the datasets give them."""
    return _normalise(images_u8, *_mean_std())


def _mean_std() -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1))


def _warn_skipped(skipped: List[Path], where: str) -> None:
    if skipped:
        warn(f"skipped {len(skipped)} unreadable image(s) in {where}")


class TrainDataset(Dataset):
    """Normal training images of root/train/good, decoded once and kept as uint8 in memory.

    Items are float tensors [3, input_size, input_size] normalised with the ImageNet mean/std.
    With `jitter`, each item is shifted by a random whole number of pixels in [-m, m] along each
    axis, m = jitter_margin(input_size), the uncovered border repeating the edge pixels; the scale
    is the test images'. Training draws the shifts with the indices (`JitteredSampler`); a plain
    index draws one from the torch RNG.
    Without it items are the resized images unchanged. File names in `exclude` (the held-out
    images) are never read.
    """

    def __init__(self, root: PathLike, input_size: int, jitter: bool = True, exclude: Sequence[str] = ()):
        folder = train_folder(root)
        excluded = set(exclude)
        files = [p for p in list_images(folder) if p.name not in excluded]
        if not files:
            raise UserError(f"no training images in {folder} (extensions: "
                            f"{', '.join(COMMON_EXTENSIONS)} ...)")
        self.input_size = int(input_size)
        self.margin = jitter_margin(self.input_size) if jitter else 0
        self.paths: List[Path] = []
        self.skipped: List[Path] = []
        stored = self.input_size + 2 * self.margin  # edge-padded once, cropped per item
        images = torch.empty((len(files), 3, stored, stored), dtype=torch.uint8)
        for p in _progress(files, "decoding train images"):
            try:
                images[len(self.paths)] = _edge_pad(_decode_resized(p, self.input_size)[0],
                                                    self.margin)
            except UnreadableImage as e:
                warn(f"skipping {e}")
                self.skipped.append(p)
                continue
            self.paths.append(p)
        _warn_skipped(self.skipped, str(folder))
        if not self.paths:
            raise UserError(f"none of the {len(files)} images in {folder} could be read")
        self.images = images[: len(self.paths)].clone() if self.skipped else images  # [N, 3, S', S']
        self._mean, self._std = _mean_std()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: Union[int, Tuple[int, int, int]]) -> torch.Tensor:
        """Item i with a random shift, or for (i, top, left) (`JitteredSampler`) with that one."""
        if isinstance(i, (tuple, list)):
            i, top, left = (int(v) for v in i)
        elif self.margin:
            top, left = torch.randint(2 * self.margin + 1, (2,)).tolist()
        else:
            top = left = 0
        img = self.images[i]  # [3, S + 2m, S + 2m] uint8
        if self.margin:
            img = img[:, top:top + self.input_size, left:left + self.input_size]
        return _normalise(img, self._mean, self._std)  # [3, S, S]


def jitter_offsets(count: int, margin: int, seed: int, epoch: int, rank: int) -> torch.Tensor:
    """The shifts (top, left) [count, 2] int64 in [0, 2*margin] of one rank's epoch, drawn from a
    generator seeded by (seed, epoch, rank) alone: the same whichever process, worker or device
    crops the images, and after a resume. Zeros without jitter (margin 0)."""
    if margin == 0:
        return torch.zeros(count, 2, dtype=torch.int64)
    state = np.random.SeedSequence([seed % 2**63, epoch, rank]).generate_state(2, dtype=np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.randint(2 * margin + 1, (count, 2), generator=generator)


class JitteredSampler(DistributedSampler):
    """DistributedSampler (the same indices: shuffled by (seed, epoch), this rank's share) that
    yields (index, top, left): each item's training shift comes with its index (`jitter_offsets`),
    so a DataLoader over `TrainDataset` and the device-resident batches (util.device_batches) cut
    the same crops."""

    def __init__(self, dataset: "TrainDataset", num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.margin = dataset.margin

    def plan(self) -> torch.Tensor:
        """This epoch's items [n, 3] int64: index, top, left."""
        indices = torch.tensor(list(super().__iter__()), dtype=torch.int64)
        offsets = jitter_offsets(len(indices), self.margin, self.seed, self.epoch, self.rank)
        return torch.cat([indices[:, None], offsets], dim=1)

    def __iter__(self):
        return iter(self.plan().tolist())


class TestDataset(Dataset):
    """Test (or unlabelled) images with masks, decoded and validated once at construction.

    Unreadable images are dropped with a warning naming each (`skipped`, and `unreadable`: each item
    with the reason); `items` holds the ones kept, in order. `non_square` lists the kept images that
    were squashed to a square, as (rel_path, (width, height)). An unreadable mask counts as a missing mask. Each item is a dict:
    image [3, S, S] float (normalised), label int (-1 unknown), mask [S, S] float32 0/1,
    has_mask bool, defect str, rel_path str, index int (into `items`). The default collate works.
    """
    __test__ = False

    def __init__(self, items: Sequence[TestItem], input_size: int):
        if not items:
            raise UserError("no test images to read (empty item list)")
        self.input_size = int(input_size)
        s = self.input_size
        self.items: List[TestItem] = []
        self.skipped: List[Path] = []
        self.unreadable: List[Tuple[TestItem, str]] = []
        self.non_square: List[Tuple[str, Tuple[int, int]]] = []
        images = torch.empty((len(items), 3, s, s), dtype=torch.uint8)
        masks = torch.zeros((len(items), s, s), dtype=torch.bool)
        has_mask: List[bool] = []
        missing = 0
        for item in _progress(items, "decoding test images"):
            try:
                img, (w, h) = _decode_resized(item.path, s)
            except UnreadableImage as e:
                warn(f"skipping {e}")
                self.skipped.append(item.path)
                self.unreadable.append((item, e.reason))
                continue
            if w != h:
                self.non_square.append((item.rel_path, (w, h)))
            n = len(self.items)
            images[n] = img
            ok = item.has_mask
            if item.label == 1 and item.mask_path is not None:
                try:
                    m = load_mask(item.mask_path)
                    if m.shape != (h, w):
                        # Both are squashed to S x S below, which maps the mask onto the image grid.
                        warn(f"mask {item.mask_path} is {m.shape[1]}x{m.shape[0]} but its image "
                             f"{item.path.name} is {w}x{h}; resizing the mask to the image")
                    masks[n] = resize_mask(m, s).bool()
                except UnreadableImage as e:
                    warn(f"ignoring mask: {e}")
                    ok = False
            if item.label == 1 and not ok:
                missing += 1
            has_mask.append(ok)
            self.items.append(item)
        _warn_skipped(self.skipped, "the test images")
        if not self.items:
            raise UserError(f"none of the {len(items)} test images could be read")
        if missing:
            warn(f"{missing} anomalous image(s) have no ground-truth mask; pixel metrics skip them")
        n = len(self.items)
        self.images = images[:n].clone() if n < len(items) else images  # [N, 3, S, S] uint8
        self.masks = masks[:n].clone() if n < len(items) else masks  # [N, S, S] bool
        self.has_mask = has_mask
        self._mean, self._std = _mean_std()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        return {
            "image": _normalise(self.images[i], self._mean, self._std),  # [3, S, S]
            "label": int(item.label),
            "mask": self.masks[i].to(torch.float32),  # [S, S]
            "has_mask": bool(self.has_mask[i]),
            "defect": item.defect,
            "rel_path": item.rel_path,
            "index": int(i),
        }
