"""util/defects.py: every maker on grey and colour images, exact masks, strength, determinism, the
batch form for the label-free evidence."""
import numpy as np
import pytest
import torch

from scripts.make_procedural import render
from util.defects import (DEFECT_MAKERS, EVIDENCE_KINDS, FLOAT_TOLERANCE, blend, changed, perlin_mask,
                          synthetic_defects, visible)

LADDER = (1.0, 0.5, 0.25, 0.125)


def _image(shape, seed=0, dtype=np.uint8):
    """A textured test image: smooth structure plus grain, so every kind has edges and room to show."""
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / 8.0
    base = 0.5 + 0.25 * np.sin(yy + rng.uniform(0, 6)) * np.cos(xx * 0.7)
    img = base[..., None] + rng.normal(0, 0.05, (h, w) + shape[2:3])
    img = np.clip(img if len(shape) == 3 else img[..., 0], 0.05, 0.95)
    return np.rint(img * 255).astype(np.uint8) if dtype == np.uint8 else img.astype(dtype)


def _extra(kind, shape, dtype=np.uint8):
    if kind == "cutpaste":
        return {"donor": _image(shape, seed=9, dtype=dtype)}
    if kind == "texture_paste":
        return {"texture": render(2, 48, seed=0)}  # a procedural image, smaller than the target
    return {}


def _draw(kind, image, seed, strength=1.0, region=None):
    return DEFECT_MAKERS[kind](image, np.random.default_rng(seed), region, strength,
                               **_extra(kind, image.shape, image.dtype))


SHAPES = [(64, 64), (64, 64, 1), (64, 64, 3), (56, 80, 3)]  # grey, grey with a channel, colour, not square


@pytest.mark.parametrize("kind", sorted(DEFECT_MAKERS))
@pytest.mark.parametrize("shape", SHAPES, ids=["grey", "grey1", "colour", "wide"])
def test_every_maker_on_grey_and_colour_uint8(kind, shape):
    x = _image(shape)
    shown = 0
    for seed in range(4):
        out = _draw(kind, x, seed)
        assert out.shape == x.shape and out.dtype == np.uint8, kind
        mask = changed(x, out)
        assert mask.shape == shape[:2]
        diff = out.astype(int) != x.astype(int)
        assert np.array_equal(mask, diff.any(axis=2) if diff.ndim == 3 else diff)
        assert mask.mean() < 0.2, (kind, mask.mean())  # a defect, not a new image
        shown += visible(mask)
        assert np.array_equal(_draw(kind, x, seed), out)  # deterministic by the stream
        assert np.array_equal(_draw(kind, x, seed, strength=0.0), x)  # strength 0 changes nothing
    assert shown >= 2, kind  # most draws show (the batch form draws again when one does not)
    assert not np.array_equal(_draw(kind, x, 0), _draw(kind, x, 1))


@pytest.mark.parametrize("kind", sorted(DEFECT_MAKERS))
@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 3)], ids=["grey", "colour"])
def test_strength_blends_the_same_defect(kind, shape):
    x = _image(shape, dtype=np.float32)
    full = _draw(kind, x, 3)
    assert full.shape == x.shape and np.issubdtype(full.dtype, np.floating)
    assert np.array_equal(_draw(kind, x, 3, strength=0.0), x)
    full_mask = changed(x, full)
    assert full_mask.any()
    for s in LADDER[1:]:
        half = _draw(kind, x, 3, strength=s)
        # original + strength * (defect - original), from the same random draws
        np.testing.assert_allclose(half, x + s * (full - x), atol=1e-6)
        assert not (changed(x, half) & ~full_mask).any()
    u = _image(shape)
    masks = [changed(u, _draw(kind, u, 3, strength=s)) for s in LADDER]
    for stronger, weaker in zip(masks, masks[1:]):  # a lower strength changes a subset
        assert not (weaker & ~stronger).any(), kind
    assert masks[0].sum() >= masks[-1].sum()


def test_masks_of_float_images_use_the_stated_tolerance():
    x = np.full((20, 20, 3), 0.5, np.float32)
    y = x.copy()
    y[3, 4, 1] += FLOAT_TOLERANCE * 0.9  # below the tolerance
    y[5, 6, 2] -= FLOAT_TOLERANCE * 1.1
    assert np.argwhere(changed(x, y)).tolist() == [[5, 6]]
    assert changed(x, y, tolerance=0.0).sum() == 2
    with pytest.raises(ValueError, match="one kind"):
        changed(np.zeros((20, 20), np.uint8), y[..., 0])


def test_uint8_blend_rounds_and_clips():
    x = np.array([[0, 100, 255]], np.uint8).repeat(16, 0)
    defect = np.array([[-0.5, 0.5, 1.5]], np.float32).repeat(16, 0)[..., None]
    np.testing.assert_array_equal(blend(x, defect, 1.0)[0], [0, 128, 255])
    np.testing.assert_array_equal(blend(x, defect, 0.5)[0], [0, 114, 255])
    np.testing.assert_array_equal(blend(x, defect, 0.0), x)


@pytest.mark.parametrize("kind", ["scratch", "hole", "stain", "particle", "crack", "missing", "cutpaste"])
def test_defects_sit_in_their_region(kind):
    x = _image((96, 96, 3))
    region = (0.25, 0.75, 0.12, 0.12)  # a small ellipse in the top-right quadrant
    for seed in range(3):
        ys, xs = np.nonzero(changed(x, _draw(kind, x, seed, region=region)))
        assert ys.size, kind
        cy, cx = ys.mean() / 96, xs.mean() / 96
        assert abs(cy - 0.25) < 0.2 and abs(cx - 0.75) < 0.2, (kind, cy, cx)


def test_texture_paste_stays_inside_its_region_and_shows_the_texture():
    x = np.full((64, 64, 3), 128, np.uint8)
    region = (0.5, 0.5, 0.3, 0.2)
    g = (np.arange(64) + 0.5) / 64
    inside = ((g[:, None] - 0.5) / 0.3) ** 2 + ((g[None, :] - 0.5) / 0.2) ** 2 <= 1
    texture = render(0, 96, seed=1)
    for seed in range(3):
        out = DEFECT_MAKERS["texture_paste"](x, np.random.default_rng(seed), region, texture=texture)
        mask = changed(x, out)
        assert mask.any() and not (mask & ~inside).any()
        assert 0.005 < mask.sum() / inside.sum() < 0.08  # the 95th-99th percentile, with a soft edge
    m = perlin_mask(np.random.default_rng(0), (40, 72))
    assert m.shape == (40, 72) and m.min() == 0.0 and m.max() == 1.0


def test_cutpaste_pastes_the_donor_and_missing_uses_a_category_hook():
    x = _image((64, 64, 3))
    donor = np.full((32, 48), 7, np.uint8)  # grey and smaller: turned into colour
    out = DEFECT_MAKERS["cutpaste"](x, np.random.default_rng(0), donor=donor)
    mask = changed(x, out)
    assert mask.any() and (out[mask] == 7).all()
    calls = []

    def erase_word(scene, rng, region, f):
        calls.append(f)
        return np.zeros_like(scene) if len(calls) == 1 else None  # the first call finds a part, the next none

    hooked = DEFECT_MAKERS["missing"](x, np.random.default_rng(0), erase_part=erase_word)
    assert hooked.shape == x.shape and not hooked.any()
    generic = DEFECT_MAKERS["missing"](x, np.random.default_rng(0), erase_part=erase_word)
    assert np.array_equal(generic, DEFECT_MAKERS["missing"](x, np.random.default_rng(0)))
    assert calls == [64 / 224, 64 / 224]


@pytest.mark.parametrize("bad", [
    np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64), np.int32), np.zeros((8, 8), np.uint8),
    np.zeros((2, 64, 64, 3), np.uint8)])
def test_makers_refuse_what_they_cannot_draw_on(bad):
    with pytest.raises(ValueError, match="expected"):
        DEFECT_MAKERS["scratch"](bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match="strength"):
        DEFECT_MAKERS["stain"](_image((32, 32)), np.random.default_rng(0), strength=1.2)


# ------------------------------------------------------------------------------- the batch form
def _normals(n=4, s=48, seed=0, grey=False):
    imgs = np.stack([_image((s, s, 3), seed=seed + i) for i in range(n)])
    if grey:
        imgs[..., 1] = imgs[..., 2] = imgs[..., 0]
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


def test_batch_shapes_sources_kinds_and_exact_masks():
    normals = _normals()
    d = synthetic_defects(normals, seed=3)
    m = 4 * len(EVIDENCE_KINDS)
    assert d.images.shape == (m, 3, 48, 48) and d.images.dtype == torch.uint8
    assert d.masks.shape == (m, 48, 48) and d.masks.dtype == torch.bool
    assert d.source.tolist() == [i for i in range(4) for _ in EVIDENCE_KINDS]
    assert d.kinds == list(EVIDENCE_KINDS) * 4
    for img, mask, src in zip(d.images, d.masks, d.source):
        assert torch.equal((img != normals[src]).any(dim=0), mask)
        assert visible(mask.numpy())
    again = synthetic_defects(normals, seed=3)
    assert torch.equal(again.images, d.images) and torch.equal(again.masks, d.masks)
    assert not torch.equal(synthetic_defects(normals, seed=4).images, d.images)


def test_batch_defects_are_the_same_at_every_strength():
    normals = _normals(n=3)
    ladder = [synthetic_defects(normals, seed=1, strength=s) for s in LADDER]
    for stronger, weaker in zip(ladder, ladder[1:]):
        assert weaker.kinds == stronger.kinds and torch.equal(weaker.source, stronger.source)
        assert not (weaker.masks & ~stronger.masks).any()
    assert ladder[-1].masks.sum() < ladder[0].masks.sum()
    none = synthetic_defects(normals, seed=1, strength=0.0)
    assert torch.equal(none.images, normals[none.source]) and not none.masks.any()


def test_batch_defect_depends_only_on_seed_image_and_kind():
    normals = _normals(n=4)
    full = synthetic_defects(normals, seed=2)
    kinds = ("crack", "scratch")  # not cutpaste: its donor is drawn from the batch
    part = synthetic_defects(normals[:2], seed=2, kinds=kinds)
    for j, (i, kind) in enumerate(zip(part.source.tolist(), part.kinds)):
        k = full.kinds.index(kind) + i * len(EVIDENCE_KINDS)
        assert torch.equal(part.images[j], full.images[k]), (i, kind)


def test_batch_on_grey_images_draws_grey_defects_and_texture_paste_needs_textures():
    normals = _normals(n=2, grey=True)
    textures = [render(i, 40, seed=0) for i in range(3)]
    d = synthetic_defects(normals, kinds=("stain", "particle", "texture_paste"), textures=textures)
    assert torch.equal(d.images[:, 0], d.images[:, 1]) and torch.equal(d.images[:, 0], d.images[:, 2])
    assert d.masks.flatten(1).any(1).all()
    one = synthetic_defects(normals[:, :1], kinds=("stain",))  # [n, 1, H, W] works too
    assert one.images.shape == (2, 1, 48, 48)


@pytest.mark.parametrize("call, words", [
    (lambda x: synthetic_defects(x, strength=1.5), "strength"),
    (lambda x: synthetic_defects(x, strength=-0.1), "strength"),
    (lambda x: synthetic_defects(x, strength=float("nan")), "strength"),
    (lambda x: synthetic_defects(x[:1]), "at least 2"),
    (lambda x: synthetic_defects(x.float()), "uint8"),
    (lambda x: synthetic_defects(x[:, 0]), "uint8"),
    (lambda x: synthetic_defects(x, kinds=("dent",)), "unknown"),
    (lambda x: synthetic_defects(x, kinds=("texture_paste",)), "textures"),
])
def test_batch_refuses_bad_inputs_with_clear_errors(call, words):
    with pytest.raises(ValueError, match=words):
        call(_normals(n=2, s=32))
    assert synthetic_defects(_normals(n=1, s=32), kinds=("scratch",)).images.shape == (1, 3, 32, 32)
