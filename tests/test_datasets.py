"""util/datasets.py: one reader for the raw and prepared layouts, robust image decoding."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from image_files import random_rgb, save_image, write_small_category
from util.cli import UserError
from util.datasets import (IMAGENET_MEAN, IMAGENET_STD, TestDataset, TrainDataset,
                           UnreadableImage, defect_from_prepared_stem, find_test_items,
                           jitter_margin, list_images, load_rgb, resize_mask, unlabelled_items)


def test_raw_and_prepared_layouts_read_the_same(synthetic_category, prepared_category):
    raw, prep = find_test_items(synthetic_category), find_test_items(prepared_category)
    assert len(raw) == len(prep) == 4 + 5 * 2
    assert [i.label for i in raw] == [i.label for i in prep]
    assert [i.defect for i in raw] == [i.defect for i in prep]
    assert {i.defect for i in raw} == {"good", "crack", "poke", "scratch", "faulty_imprint",
                                       "squeeze"}
    assert all(i.has_mask for i in raw) and all(i.has_mask for i in prep)
    assert raw[-1].rel_path == "test/squeeze/001.png"
    assert prep[-1].rel_path == "test/bad/squeeze_001.png"
    assert prep[-1].mask_path.name == "squeeze_001_mask.png" and prep[-1].path.is_absolute()
    a, b = TestDataset(raw, 32), TestDataset(prep, 32)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    for i in range(len(a)):
        assert (a[i]["mask"].sum() > 0) == (raw[i].label == 1)


def test_defect_names_from_prepared_stems():
    assert defect_from_prepared_stem("faulty_imprint_003") == "faulty_imprint"
    assert defect_from_prepared_stem("crack_000") == "crack"
    assert defect_from_prepared_stem("scan") == "bad"


@pytest.mark.parametrize("kind", ["L", "LA", "RGBA", "P", "I;16", "I", "CMYK", "jpeg", "tiff", "bmp"])
def test_load_rgb_modes(tmp_path, kind):
    rgb = random_rgb(8, 6)
    if kind == "L":
        p = save_image(rgb[..., 0], tmp_path / "a.png")
    elif kind == "LA":
        p = tmp_path / "a.png"
        Image.fromarray(rgb[..., 0]).convert("LA").save(p)
    elif kind == "RGBA":
        a = np.dstack([rgb, np.full((8, 6), 255, np.uint8)])
        a[0, 0, 3] = 0  # a transparent pixel composites to black
        p = save_image(a, tmp_path / "a.png")
    elif kind == "P":
        p = tmp_path / "a.png"
        Image.fromarray(rgb).convert("P").save(p)
    elif kind == "I;16":
        p = save_image((rgb[..., 0].astype(np.uint16) * 257), tmp_path / "a.png")
        assert Image.open(p).mode.startswith("I")
    elif kind == "I":
        p = tmp_path / "a.tif"
        Image.fromarray(rgb[..., 0].astype(np.int32) * 257, mode="I").save(p)
    elif kind == "CMYK":
        p = tmp_path / "a.jpg"
        Image.fromarray(rgb).convert("CMYK").save(p)
    else:
        p = save_image(rgb, tmp_path / f"a.{kind}")
    img = load_rgb(p)
    assert img.mode == "RGB" and img.size == (6, 8)
    a = np.asarray(img)
    if kind in ("I;16", "I"):
        assert np.array_equal(a[..., 0], rgb[..., 0])  # value/257
    if kind == "RGBA":
        assert a[0, 0].tolist() == [0, 0, 0] and np.array_equal(a[1:], rgb[1:])


def test_unreadable_train_files_are_skipped(tmp_path, capsys):
    root = write_small_category(tmp_path / "cat")
    good = root / "train/good"
    (good / "empty.png").write_bytes(b"")
    full = (good / "000.png").read_bytes()
    (good / "truncated.png").write_bytes(full[: len(full) // 2])
    (good / "text.jpg").write_text("not an image at all")
    (good / "notes.txt").write_text("ignored: not an image extension")
    with pytest.raises(UnreadableImage, match="truncated.png"):
        load_rgb(good / "truncated.png")
    ds = TrainDataset(root, 16, jitter=False)
    err = capsys.readouterr().err
    assert len(ds) == 3 and len(ds.paths) == 3
    assert sorted(p.name for p in ds.skipped) == ["empty.png", "text.jpg", "truncated.png"]
    for name in ("empty.png", "text.jpg", "truncated.png"):
        assert name in err
    assert "skipped 3 unreadable" in err


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        TrainDataset(tmp_path / "nope", 16)
    (tmp_path / "cat/train/good").mkdir(parents=True)
    with pytest.raises(UserError, match="no training images"):
        TrainDataset(tmp_path / "cat", 16)
    (tmp_path / "cat/train/good/x.png").write_bytes(b"")
    with pytest.raises(UserError, match="could be read"):
        TrainDataset(tmp_path / "cat", 16)
    with pytest.raises(UserError, match="does not exist"):
        find_test_items(tmp_path / "nope")
    with pytest.raises(UserError, match="no 'test' folder"):
        find_test_items(tmp_path / "cat")
    with pytest.raises(UserError):
        unlabelled_items(tmp_path / "nope")


def test_masks_other_size_thin_and_missing(tmp_path, capsys):
    root = write_small_category(tmp_path / "cat")
    # a mask at twice the image resolution
    m = np.zeros((40, 40), np.uint8)
    m[10:18, 10:18] = 255
    save_image(m, root / "ground_truth/crack/000_mask.png")
    save_image(random_rgb(seed=12), root / "test/crack/001.png")  # no mask
    ds = TestDataset(find_test_items(root), 20)
    err = capsys.readouterr().err
    assert "000_mask.png" in err and "resizing" in err
    assert "1 anomalous image(s) have no ground-truth mask" in err
    items = {ds[i]["rel_path"]: ds[i] for i in range(len(ds))}
    crack = items["test/crack/000.png"]
    assert crack["has_mask"] and crack["mask"].sum() == 16 and crack["mask"][5:9, 5:9].all()
    assert not items["test/crack/001.png"]["has_mask"]
    assert items["test/good/000.png"]["has_mask"] and items["test/good/000.png"]["mask"].sum() == 0
    # a 1-px crack in a 256-px mask survives the downscale to 32 px
    thin = np.zeros((256, 256), bool)
    thin[100, 20:200] = True
    small = resize_mask(thin, 32)
    assert small.dtype == torch.float32 and 0 < small.sum() < 64
    blob = np.zeros((256, 256), bool)
    blob[64:128, 64:128] = True
    assert resize_mask(blob, 32).sum() == 64  # ordinary masks: area resampling, > 0.5


def test_non_square_unicode_names_and_collate(tmp_path):
    root = tmp_path / "cat égal"
    save_image(random_rgb(30, 50), root / "train/good/wide img ü 漢.png")
    save_image(random_rgb(30, 50, seed=3), root / "test/scratch mark/näme 1.png")
    m = np.zeros((30, 50), np.uint8)
    m[10:20, 10:30] = 255
    save_image(m, root / "ground_truth/scratch mark/näme 1_mask.png")
    save_image(random_rgb(seed=4), root / "test/good/ok.png")
    train = TrainDataset(root, 16, jitter=True)
    assert train[0].shape == (3, 16, 16)
    items = find_test_items(root)
    assert [i.defect for i in items] == ["good", "scratch mark"]
    ds = TestDataset(items, 24)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 24, 24) and batch["mask"].shape == (2, 24, 24)
    assert batch["label"].tolist() == [0, 1] and batch["has_mask"].tolist() == [True, True]
    assert batch["rel_path"] == ["test/good/ok.png", "test/scratch mark/näme 1.png"]
    assert batch["defect"] == ["good", "scratch mark"] and batch["index"].tolist() == [0, 1]


def test_unlabelled_items(tmp_path):
    save_image(random_rgb(), tmp_path / "imgs/b.png")
    save_image(random_rgb(), tmp_path / "imgs/sub dir/a.JPG")
    (tmp_path / "imgs/readme.md").write_text("x")
    items = unlabelled_items(tmp_path / "imgs")
    assert [i.rel_path for i in items] == ["b.png", "sub dir/a.JPG"]
    assert all(i.label == -1 and i.defect == "" and i.mask_path is None for i in items)
    one = unlabelled_items(tmp_path / "imgs/b.png")
    assert len(one) == 1 and one[0].rel_path == "b.png"
    sample = TestDataset(items, 8)[1]
    assert sample["label"] == -1 and not sample["has_mask"] and sample["mask"].sum() == 0
    assert list_images(tmp_path / "imgs") == [tmp_path / "imgs/b.png"]


def test_train_jitter_and_normalisation(synthetic_category):
    plain = TrainDataset(synthetic_category, 32, jitter=False)
    assert plain.images.dtype == torch.uint8 and plain.images.shape == (8, 3, 32, 32)
    assert torch.equal(plain[0], plain[0])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(plain[0] * std + mean, plain.images[0].float() / 255, atol=1e-6)
    jit = TrainDataset(synthetic_category, 32, jitter=True)
    m = jitter_margin(32)
    assert jit.images.shape[-1] == 32 + 2 * m

    def draw(seed):
        torch.manual_seed(seed)
        return torch.stack([jit[0] for _ in range(4)])

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_train_jitter_only_translates(synthetic_category):
    """Each jittered item is the plain image shifted by at most m pixels, at the same scale (test
    images are not rescaled), with the uncovered border repeating the edge."""
    plain = TrainDataset(synthetic_category, 32, jitter=False)
    jit = TrainDataset(synthetic_category, 32, jitter=True)
    m = jitter_margin(32)
    img = plain.images[0].numpy().astype(np.float32)
    padded = torch.from_numpy(np.pad(img, ((0, 0), (m, m), (m, m)), mode="edge"))  # independent of F.pad
    shifts = {(top, left): padded[:, top:top + 32, left:left + 32]
              for top in range(2 * m + 1) for left in range(2 * m + 1)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(400):
        item = (jit[0] * jit._std + jit._mean) * 255
        match = [k for k, v in shifts.items() if torch.allclose(item, v, atol=1e-3)]
        assert len(match) >= 1
        seen.update(match)
    assert (m, m) in seen and len(seen) > 5  # unshifted among them, and many different shifts
