"""Realistic synthetic defects drawn on any image, grey or colour, with exact masks.

Makers (DEFECT_MAKERS; sizes are given for a 224 px image and scale with f = min(H, W) / 224):
  scratch        a thin curved line 1-3 px wide, 22-72 px long, lighter (abraded) or darker (a groove),
                 fading out towards its ends
  hole           a small dark pit 4-11 px across with a raised rim, lit on one side (a poke)
  stain          a soft-edged discolouration 8-24 px across: darker, bleached (grey images) or tinted
                 (colour images), sometimes with a darker dried rim; some only a few grey levels deep
  particle       a small opaque bit of another material with its shadow: a flake 5-11 px across or a
                 thin curved fibre
  crack          thin dark branching lines, 1-2 px wide, that taper towards the tips
  cutpaste       a rectangle (6-16% of the side) of ANOTHER image (`donor`) pasted in
  missing        a part of the subject gone: filled in from around it (its detail vanishes) or
                 printed 2.5-5 px shifted, placed where the image has edges; a category may pass its
                 own `erase_part` (the photo page: a word that was not printed)
  texture_paste  DRAEM-style: a caller's texture image blended in (opacity 0.5-1) through a
                 Perlin-like mask: 2-3 octaves of bicubically upsampled random grids (2, 4 or 8
                 cells across, each octave twice as fine and half as strong), thresholded at a random
                 95th-99th percentile of the field inside the region, with a soft edge

Every maker has the signature maker(image, rng, region=None, strength=1.0, ...) -> new image:
  image     uint8 or float (values in [0, 1]), [H, W] grey or [H, W, C] with C = 1 or 3; the output
            has the same shape, and the same dtype for uint8 (float: the arithmetic's float type)
  rng       a numpy Generator: the same stream gives the same defect
  region    where the defect may sit: an ellipse (cy, cx, ry, rx) in fractions of the height and width;
            None = anywhere
  strength  in [0, 1], the opacity: the defect image D is blended into the original x as
            x + strength * (D - x); 0 changes nothing, and the random draws do not depend on it, so
            the same stream gives the same defect at every strength, only fainter
Float outputs are not clipped (a lit rim may exceed 1, as light can); uint8 outputs are D rounded and
clipped to 0..255. `changed(original, new)` is the mask: for uint8 where any channel of the quantised
image differs, for float where some channel changed by more than FLOAT_TOLERANCE. A lower strength
never changes a pixel outside the full-strength mask (the blend lies between x and D, and rounding is
monotone).

`synthetic_defects` is the batch form for scoring without test labels (scoring.holdout_evidence): one
defect of each kind per held-out normal image. EVIDENCE_KINDS are the kinds that make sense on any
category with nothing from outside it: scratch, hole, stain, particle and crack happen to any surface;
cutpaste puts the category's own pixels where they do not belong (a foreign pattern in the right
colours); missing erases or shifts detail, a broken outline on an object and a smeared or offset patch on
a texture. texture_paste is left out by default because its textures come from outside the category
(pass `textures` and add it to `kinds` to use it).
"""
import zlib
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

Array = np.ndarray
Region = tuple[float, float, float, float]  # (cy, cx, ry, rx), fractions of the height / width
ErasePart = Callable[[Array, np.random.Generator, Optional[Region], float], Optional[Array]]

REFERENCE_SIDE = 224  # the makers' sizes are given for this side
SS = 4  # supersampling of drawn shapes
FLOAT_TOLERANCE = 0.5 / 255  # a float pixel changed when it moved by more than half an 8-bit level
MIN_AREA = 0.0006  # a defect is visible when it changes at least this fraction of the image (and 4 px)
MAX_AREA = 0.06  # ... and at most this fraction: larger is no longer a small, realistic defect
MAX_TRIES = 20  # draws of a defect until one is visible


# --------------------------------------------------------------------------------- images, masks
def as_scene(image: Array) -> Array:
    """An image as a float scene [H, W, C] in [0, 1]: uint8 is divided by 255 (float32), float is taken
    as it is (a view)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy image, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an image [H, W] or [H, W, C] with C = 1 or 3, got {image.shape}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"expected an image of at least 16 x 16 px, got {image.shape[:2]}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a uint8 or float image, got {image.dtype}")
    return image


def check_strength(strength: float) -> None:
    """ValueError unless 0 <= strength <= 1."""
    if not 0.0 <= strength <= 1.0:  # also refuses NaN
        raise ValueError(f"strength must be in [0, 1], got {strength}")


def blend(original: Array, defect: Array, strength: float) -> Array:
    """original + strength * (defect - original), shaped and typed like `original`; `defect` is a scene
    [H, W, C] drawn on as_scene(original). uint8 is rounded and clipped in grey levels (float64)."""
    check_strength(strength)
    if original.dtype == np.uint8:
        x = original.reshape(defect.shape).astype(np.float64)
        out = np.clip(np.rint(x + strength * (defect.astype(np.float64) * 255.0 - x)), 0, 255)
        return out.astype(np.uint8).reshape(original.shape)
    if strength == 1.0:  # the defect image itself, to the bit (x + (D - x) can round differently)
        return defect.reshape(original.shape)
    x = as_scene(original)
    return (x + strength * (defect - x)).reshape(original.shape)


def changed(original: Array, new: Array, tolerance: float = FLOAT_TOLERANCE) -> Array:
    """bool [H, W]: where `new` differs from `original` in some channel (uint8: at all; float: by more
    than `tolerance`)."""
    a, b = _hwc(original), _hwc(new)
    if (original.dtype == np.uint8) != (new.dtype == np.uint8):
        raise ValueError(f"compare images of one kind (uint8 or float), got {original.dtype} and {new.dtype}")
    if original.dtype == np.uint8:
        return (a != b).any(axis=2)
    return (np.abs(b.astype(np.float64) - a.astype(np.float64)) > tolerance).any(axis=2)


def _hwc(image: Array) -> Array:
    return image[..., None] if image.ndim == 2 else image


def visible(mask: Array) -> bool:
    """Whether a defect's mask is a visible, small defect: MIN_AREA (and 4 px) to MAX_AREA of the image."""
    n = int(mask.sum())
    return max(4, int(MIN_AREA * mask.size)) <= n <= MAX_AREA * mask.size


def _side(scene: Array) -> int:
    return min(scene.shape[0], scene.shape[1])


def _scale(scene: Array) -> float:
    """f: the makers' pixel sizes are given at REFERENCE_SIDE and multiplied by this."""
    return _side(scene) / float(REFERENCE_SIDE)


def _channels(scene: Array, c: int) -> Array:
    """A scene with c channels: colour -> grey by the mean, grey -> colour by repetition."""
    if scene.shape[2] == c:
        return scene
    return scene.mean(axis=2, keepdims=True) if c == 1 else np.repeat(scene, c, axis=2)


# ------------------------------------------------------------------------------ drawing helpers
def _box_down(a: Array, ss: int) -> Array:
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss, *a.shape[2:]).mean(axis=(1, 3))


def _lines_coverage(shape: tuple[int, int], paths: list[tuple[Array, float]]) -> Array:
    """Anti-aliased coverage [H, W] of polylines [(points [k, 2] as (y, x), width px)]."""
    h, w = shape
    img = Image.new("L", (w * SS, h * SS), 0)
    draw = ImageDraw.Draw(img)
    for pts, width in paths:
        xy = [(float(x) * SS, float(y) * SS) for y, x in pts]
        draw.line(xy, fill=255, width=max(1, int(round(width * SS))), joint="curve")
    return _box_down(np.asarray(img, np.float32) / 255.0, SS)


def _walk(rng: np.random.Generator, start: Array, angle: float, n: int, step: float,
          turn: float) -> Array:
    """A random walk with a slowly turning heading: [n + 1, 2] points (y, x)."""
    pts = [np.asarray(start, np.float64)]
    for _ in range(n):
        angle += rng.normal(0.0, turn)
        pts.append(pts[-1] + step * np.array([np.sin(angle), np.cos(angle)]))
    return np.stack(pts)


def _inside(shape: tuple[int, int], region: Optional[Region]) -> Array:
    """bool [H, W]: the pixels whose centres lie in the region (all of them for None)."""
    h, w = shape
    if region is None:
        return np.ones((h, w), bool)
    cy, cx, ry, rx = region
    gy, gx = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    return ((gy[:, None] - cy) / ry) ** 2 + ((gx[None, :] - cx) / rx) ** 2 <= 1.0


def _place(rng: np.random.Generator, shape: tuple[int, int], region: Optional[Region],
           weight: Optional[Array] = None) -> Array:
    """A point (y, x) inside the region, optionally weighted by `weight` [H, W]."""
    inside = _inside(shape, region)
    p = inside.astype(np.float64)
    if weight is not None:
        p = p * weight
    if p.sum() <= 0:
        p = inside.astype(np.float64)
    flat = p.ravel() / p.sum()
    k = int(rng.choice(flat.size, p=flat))
    w = shape[1]
    return np.array([k // w + rng.uniform(), k % w + rng.uniform()])


def _blob(shape: tuple[int, int], centre: Array, radius: float, rng: np.random.Generator, rough: float,
          aspect: float = 1.0) -> tuple[tuple[int, int, int, int], Array, Array]:
    """An irregular round shape around `centre`: its window (y0, y1, x0, x1) in the image and,
    at SS resolution over that window, the normalised radius rho (1 on the outline) and the
    direction (unit vectors stacked [2, h, w]) from the centre."""
    reach = radius * 4.5 + 3  # the outline reaches 1.6 radius, a soft edge fades out by 2.8
    y0, x0 = (max(0, int(np.floor(c - reach))) for c in centre)
    y1, x1 = (min(n, int(np.ceil(c + reach))) for c, n in zip(centre, shape))
    ys = y0 + (np.arange((y1 - y0) * SS) + 0.5) / SS - centre[0]
    xs = x0 + (np.arange((x1 - x0) * SS) + 0.5) / SS - centre[1]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    rot = rng.uniform(0, np.pi)
    u = np.cos(rot) * xx + np.sin(rot) * yy
    v = (-np.sin(rot) * xx + np.cos(rot) * yy) / aspect
    ang = np.arctan2(v, u)
    harm = np.ones_like(ang)
    for k in (2, 3, 5):  # a few harmonics make the outline irregular
        harm += rough * rng.normal(0, 1.0 / k) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    dist = np.sqrt(u * u + v * v)
    rho = dist / (radius * np.clip(harm, 0.5, 1.6))
    d = np.maximum(np.sqrt(xx * xx + yy * yy), 1e-6)
    return (y0, y1, x0, x1), rho.astype(np.float32), np.stack([yy / d, xx / d]).astype(np.float32)


def _paste(scene: Array, box: tuple[int, int, int, int], new_ss: Array, alpha_ss: Array) -> Array:
    """Blend a supersampled [h*SS, w*SS, C] layer with coverage alpha into the window `box`."""
    y0, y1, x0, x1 = box
    a = _box_down(alpha_ss, SS)[..., None]
    prem = _box_down(new_ss * alpha_ss[..., None], SS)
    out = scene.copy()
    win = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = win * (1 - a) + prem
    return out


def _up(a: Array) -> Array:
    """[h, w, C] -> [h*SS, w*SS, C] by repetition (values under a supersampled shape)."""
    return np.repeat(np.repeat(a, SS, axis=0), SS, axis=1)


# --------------------------------------------------------------------- defect images at strength 1
def _scratch(scene: Array, rng: np.random.Generator, region: Optional[Region]) -> Array:
    h, w = scene.shape[:2]
    f, s = _scale(scene), _side(scene)
    centre = _place(rng, (h, w), region)
    length = rng.uniform(0.10, 0.32) * s
    ang = rng.uniform(0, np.pi)
    d = np.array([np.sin(ang), np.cos(ang)])
    nrm = np.array([-d[1], d[0]])
    t = np.linspace(-0.5, 0.5, 24)[:, None]
    bend = rng.normal(0, 0.12) * length
    pts = centre + t * length * d + (1 - 4 * t ** 2) * bend * nrm
    width = rng.uniform(1.0, 3.0) * f
    cov = _lines_coverage((h, w), [(pts, width)])
    # a scratch fades out towards its ends
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    t_along = ((yy - centre[0]) * d[0] + (xx - centre[1]) * d[1]) / length
    fade = np.clip((0.5 - np.abs(t_along)) / rng.uniform(0.1, 0.3), 0, 1)
    opacity = rng.uniform(0.5, 0.9) * fade
    if rng.random() < 0.5:  # abraded: lighter
        target = scene + (1.0 - scene) * rng.uniform(0.35, 0.8)
    else:  # a groove: darker
        target = scene * rng.uniform(0.25, 0.6)
    a = (cov * opacity)[..., None]
    return scene * (1 - a) + target * a


def _hole(scene: Array, rng: np.random.Generator, region: Optional[Region]) -> Array:
    f = _scale(scene)
    centre = _place(rng, scene.shape[:2], region)
    radius = rng.uniform(2.2, 5.5) * f
    box, rho, (dy, dx) = _blob(scene.shape[:2], centre, radius, rng, 0.25, rng.uniform(0.7, 1.0))
    y0, y1, x0, x1 = box
    base = _up(scene[y0:y1, x0:x1])
    light = np.float32(rng.uniform(0, 2 * np.pi))
    facing = np.cos(light) * dx + np.sin(light) * dy  # -1..1: rim side facing the light
    inside = np.clip((1.0 - rho) * radius * SS * 0.5 + 0.5, 0, 1)  # anti-aliased disc
    depth = rng.uniform(0.08, 0.25)
    # the pit: dark, its far wall lit a little
    pit = base * depth + 0.06 * np.clip(-facing, 0, 1)[..., None] * inside[..., None]
    rim = np.exp(-((rho - 1.25) / 0.22) ** 2) * (1 - inside)  # the pushed-up lip
    lip = base * (1.0 + 0.45 * rim[..., None] * facing[..., None])
    new = pit * inside[..., None] + lip * (1 - inside[..., None])
    alpha = np.clip(inside + rim * 1.0, 0, 1)
    return _paste(scene, box, new, alpha)


def _stain(scene: Array, rng: np.random.Generator, region: Optional[Region]) -> Array:
    c, f = scene.shape[2], _scale(scene)
    centre = _place(rng, scene.shape[:2], region)
    radius = rng.uniform(4.0, 12.0) * f
    box, rho, _ = _blob(scene.shape[:2], centre, radius, rng, 0.35, rng.uniform(0.6, 1.0))
    y0, y1, x0, x1 = box
    base = _up(scene[y0:y1, x0:x1])
    edge = rng.uniform(0.08, 0.3)
    g = 1.0 / (1.0 + np.exp(np.minimum((rho - 1.0) / edge, 50.0)))  # soft edge
    if rng.random() < 0.5:  # a dried drop: darker at its rim ("coffee ring")
        g = g * (0.6 + 0.5 * np.exp(-((rho - 0.9) / 0.15) ** 2))
    k = rng.uniform(0.10, 0.45)
    if c == 3:
        tint = np.array([[0.62, 0.45, 0.28], [0.35, 0.42, 0.70], [0.55, 0.60, 0.40],
                         [0.70, 0.70, 0.70]], np.float32)[rng.integers(4)]
        new = base * (1 - k * (1 - tint))
    elif rng.random() < 0.7:  # darker
        new = base * (1 - k)
    else:  # bleached
        new = base + (1 - base) * k
    return _paste(scene, box, new, g.astype(np.float32))


def _particle(scene: Array, rng: np.random.Generator, region: Optional[Region]) -> Array:
    c, f = scene.shape[2], _scale(scene)
    if c == 3:
        colour = np.array([[0.95, 0.94, 0.90], [0.08, 0.08, 0.09], [0.15, 0.30, 0.75],
                           [0.20, 0.55, 0.25], [0.75, 0.72, 0.65]], np.float32)[rng.integers(5)]
    else:
        colour = np.array([rng.choice([rng.uniform(0.02, 0.18), rng.uniform(0.85, 1.0)])], np.float32)
    centre = _place(rng, scene.shape[:2], region)
    if rng.random() < 0.35:  # a fibre: thin, curved
        pts = _walk(rng, centre, rng.uniform(0, 2 * np.pi), int(rng.integers(5, 10)), 2.2 * f, 0.5)
        width = rng.uniform(1.0, 1.8) * f
        shadow = _lines_coverage(scene.shape[:2], [(pts + 0.8 * f, width * 1.3)])
        cov = _lines_coverage(scene.shape[:2], [(pts, width)])
        out = scene * (1 - 0.35 * shadow[..., None])
        return out * (1 - cov[..., None]) + colour * cov[..., None]
    radius = rng.uniform(2.5, 5.5) * f
    box, rho, (dy, dx) = _blob(scene.shape[:2], centre, radius, rng, 0.6, rng.uniform(0.5, 1.0))
    y0, y1, x0, x1 = box
    base = _up(scene[y0:y1, x0:x1])
    inside = np.clip((1.0 - rho) * radius * SS * 0.5 + 0.5, 0, 1)
    # the shadow it casts: the same shape moved down-right, soft
    sh_rho = np.roll(rho, (int(round(0.9 * f * SS)), int(round(0.9 * f * SS))), axis=(0, 1))
    shadow = np.clip((1.3 - sh_rho) * 2.0, 0, 1) * 0.45
    shade = 1.0 + 0.25 * (-(dy + dx) * 0.7) * np.clip(rho, 0, 1)  # lit from the top left
    body = np.clip(colour * shade[..., None], 0, 1)
    under = base * (1 - shadow[..., None])
    new = body * inside[..., None] + under * (1 - inside[..., None])
    alpha = np.clip(np.maximum(inside, shadow > 0.01), 0, 1).astype(np.float32)
    return _paste(scene, box, new, alpha)


def _crack(scene: Array, rng: np.random.Generator, region: Optional[Region]) -> Array:
    f = _scale(scene)
    centre = _place(rng, scene.shape[:2], region)
    n = int(rng.integers(10, 18))
    main = _walk(rng, centre, rng.uniform(0, 2 * np.pi), n, 2.6 * f, 0.45)
    width = rng.uniform(1.0, 2.0) * f
    paths = []
    for i in range(n):  # tapering towards the tip
        paths.append((main[i:i + 2], max(0.6 * f, width * (1 - 0.6 * i / n))))
    for _ in range(int(rng.integers(1, 3))):  # branches
        k = int(rng.integers(1, n))
        br = _walk(rng, main[k], rng.uniform(0, 2 * np.pi), int(rng.integers(3, 7)), 2.4 * f, 0.5)
        for i in range(len(br) - 1):
            paths.append((br[i:i + 2], max(0.5 * f, width * 0.7 * (1 - 0.5 * i / len(br)))))
    cov = _lines_coverage(scene.shape[:2], paths)
    a = (cov * rng.uniform(0.6, 0.9))[..., None]
    return scene * (1 - a) + scene * 0.15 * a


def _cutpaste(scene: Array, rng: np.random.Generator, region: Optional[Region], donor: Array) -> Array:
    h, w, c = scene.shape
    patch = _channels(as_scene(donor), c)
    ph, pw = np.minimum((rng.uniform(0.06, 0.16, 2) * _side(scene)).astype(int).clip(2), patch.shape[:2])
    sy, sx = rng.integers(0, patch.shape[0] - ph + 1), rng.integers(0, patch.shape[1] - pw + 1)
    cy, cx = _place(rng, (h, w), region)
    y0, x0 = int(np.clip(round(cy - ph / 2), 0, h - ph)), int(np.clip(round(cx - pw / 2), 0, w - pw))
    out = scene.copy()
    out[y0:y0 + ph, x0:x0 + pw] = patch[sy:sy + ph, sx:sx + pw]
    return out


def _missing(scene: Array, rng: np.random.Generator, region: Optional[Region],
             erase_part: Optional[ErasePart] = None) -> Array:
    f = _scale(scene)
    if erase_part is not None:
        out = erase_part(scene, rng, region, f)
        if out is not None:
            return out
    # a part of the subject gone (filled in from around it) or printed shifted
    grad = ndimage.gaussian_gradient_magnitude(scene.mean(axis=2), 1.0)
    centre = _place(rng, scene.shape[:2], region, weight=grad ** 2)
    radius = rng.uniform(5.0, 10.0) * f
    box, rho, _ = _blob(scene.shape[:2], centre, radius, rng, 0.3, rng.uniform(0.6, 1.0))
    y0, y1, x0, x1 = box
    alpha = np.clip((1.0 - rho) * radius * SS * 0.5 + 0.5, 0, 1)
    if rng.random() < 0.6:
        # inpainted: each pixel of the gap takes the nearest colour around it, softened, so
        # the surrounding areas close over the gap and its detail is gone
        gap = np.zeros(scene.shape[:2], bool)
        gap[y0:y1, x0:x1] = _box_down(alpha, SS) > 0.01
        gap = ndimage.binary_dilation(gap)
        _, (iy, ix) = ndimage.distance_transform_edt(gap, return_indices=True)
        near = scene[iy, ix]
        sigma = max(1.0, radius * 0.2)
        fill = ndimage.gaussian_filter(near, (sigma, sigma, 0))
    else:
        ang = rng.uniform(0, 2 * np.pi)
        shift = rng.uniform(2.5, 5.0) * f * np.array([np.sin(ang), np.cos(ang)])
        fill = ndimage.shift(scene, (shift[0], shift[1], 0), order=1, mode="nearest")
    return _paste(scene, box, _up(fill[y0:y1, x0:x1]), alpha)


def perlin_mask(rng: np.random.Generator, shape: tuple[int, int], region: Optional[Region] = None) -> Array:
    """A Perlin-like coverage [H, W] in [0, 1] (see texture_paste), zero outside the region."""
    h, w = shape
    octaves, cells = int(rng.integers(2, 4)), 2 ** int(rng.integers(1, 4))
    field = np.zeros((h, w))
    for o in range(octaves):
        n = cells * 2 ** o  # cells across the shorter side
        gh, gw = max(1, round(n * h / min(h, w))), max(1, round(n * w / min(h, w)))
        grid = rng.normal(0.0, 1.0, (gh + 1, gw + 1))
        yy, xx = np.meshgrid((np.arange(h) + 0.5) * gh / h, (np.arange(w) + 0.5) * gw / w, indexing="ij")
        field += 0.5 ** o * ndimage.map_coordinates(grid, [yy, xx], order=3, mode="nearest")
    inside = _inside(shape, region)
    values = field[inside]
    threshold = np.percentile(values, rng.uniform(95.0, 99.0))
    edge = 0.05 * values.std() + 1e-12  # a soft edge a few percent of the field's spread wide
    return np.clip((field - threshold) / edge, 0.0, 1.0) * inside


def _texture_paste(scene: Array, rng: np.random.Generator, region: Optional[Region], texture: Array) -> Array:
    h, w, c = scene.shape
    tex = _channels(as_scene(texture), c)
    cover = max(h / tex.shape[0], w / tex.shape[1])
    if cover > 1.0:  # too small to crop from: enlarged until it covers the image
        tex = ndimage.zoom(tex, (cover, cover, 1), order=1, grid_mode=True, mode="grid-mirror")
    ty, tx = rng.integers(0, tex.shape[0] - h + 1), rng.integers(0, tex.shape[1] - w + 1)
    tex = tex[ty:ty + h, tx:tx + w]
    a = (perlin_mask(rng, (h, w), region) * rng.uniform(0.5, 1.0))[..., None].astype(scene.dtype)
    return scene * (1 - a) + tex * a


# ----------------------------------------------------------------------------------- the makers
def _make(draw: Callable[..., Array], image: Array, rng: np.random.Generator, region: Optional[Region],
          strength: float, **extra) -> Array:
    check_strength(strength)
    return blend(image, draw(as_scene(image), rng, region, **extra), strength)


def scratch(image: Array, rng: np.random.Generator, region: Optional[Region] = None,
            strength: float = 1.0) -> Array:
    """A thin curved line, lighter or darker, fading out towards its ends."""
    return _make(_scratch, image, rng, region, strength)


def hole(image: Array, rng: np.random.Generator, region: Optional[Region] = None,
         strength: float = 1.0) -> Array:
    """A small dark pit with a raised rim lit on one side."""
    return _make(_hole, image, rng, region, strength)


def stain(image: Array, rng: np.random.Generator, region: Optional[Region] = None,
          strength: float = 1.0) -> Array:
    """A soft-edged darker, bleached or tinted blob."""
    return _make(_stain, image, rng, region, strength)


def particle(image: Array, rng: np.random.Generator, region: Optional[Region] = None,
             strength: float = 1.0) -> Array:
    """A small opaque flake or fibre with its shadow."""
    return _make(_particle, image, rng, region, strength)


def crack(image: Array, rng: np.random.Generator, region: Optional[Region] = None,
          strength: float = 1.0) -> Array:
    """Thin dark branching lines that taper."""
    return _make(_crack, image, rng, region, strength)


def cutpaste(image: Array, rng: np.random.Generator, region: Optional[Region] = None,
             strength: float = 1.0, *, donor: Array) -> Array:
    """A rectangle of `donor` (another image of any size, grey or colour) pasted in."""
    return _make(_cutpaste, image, rng, region, strength, donor=donor)


def missing(image: Array, rng: np.random.Generator, region: Optional[Region] = None,
            strength: float = 1.0, *, erase_part: Optional[ErasePart] = None) -> Array:
    """Part of the subject erased or shifted. `erase_part(scene [H, W, C], rng, region, f)` is a
    category's own way to remove one of its parts: it returns the scene without it, or None when it
    finds none (then the generic gap or shift is drawn)."""
    return _make(_missing, image, rng, region, strength, erase_part=erase_part)


def texture_paste(image: Array, rng: np.random.Generator, region: Optional[Region] = None,
                  strength: float = 1.0, *, texture: Array) -> Array:
    """`texture` (an image of any size, grey or colour) blended in through a Perlin-like mask."""
    return _make(_texture_paste, image, rng, region, strength, texture=texture)


DEFECT_MAKERS = {"scratch": scratch, "hole": hole, "stain": stain, "particle": particle, "crack": crack,
                 "cutpaste": cutpaste, "missing": missing, "texture_paste": texture_paste}
EVIDENCE_KINDS = ("scratch", "hole", "stain", "particle", "crack", "cutpaste", "missing")


# ------------------------------------------------------------------------------- the batch form
class SyntheticDefects(NamedTuple):
    images: torch.Tensor  # [m, C, H, W] uint8
    masks: torch.Tensor  # [m, H, W] bool, where the pixels changed
    source: torch.Tensor  # [m] long, the index of the normal image each was made from
    kinds: list[str]  # [m]


def _rng(seed: int, index: int, kind: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, zlib.crc32(kind.encode()))))


def synthetic_defects(images: torch.Tensor, seed: int = 0, strength: float = 1.0,
                      kinds: tuple[str, ...] = EVIDENCE_KINDS,
                      textures: Optional[Sequence[Array]] = None) -> SyntheticDefects:
    """One defect of each kind on each normal image [n, C, H, W] uint8 (C = 3 or 1), in the order
    image 0's kinds, image 1's kinds, ...: m = n * len(kinds).

    Each defect has its own random stream from (seed, image index, kind), so it does not depend on
    the other images' count or the other kinds. It is drawn again (up to MAX_TRIES) until it is
    visible at full strength (`visible`), and then blended at `strength`: the same defects at every
    strength, fainter at lower ones, the masks exactly where the uint8 pixels changed (empty at
    strength 0, possibly empty for a faint defect at a low strength or where a kind cannot show, such
    as `missing` on a flat image). Images whose three channels are equal throughout the batch are
    treated as grey (a grey category's stains are grey). cutpaste takes its patch from another image
    of the batch; texture_paste needs `textures` (one is picked per defect)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[1] not in (1, 3):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected uint8 images [n, 3, H, W] (or [n, 1, H, W]), got {got}")
    check_strength(strength)
    unknown = [k for k in kinds if k not in DEFECT_MAKERS]
    if not kinds or unknown:
        raise ValueError(f"unknown defect kinds {unknown or '(none given)'}; choose from {', '.join(DEFECT_MAKERS)}")
    n = images.shape[0]
    if n < 1:
        raise ValueError("synthetic defects need at least 1 normal image, got 0")
    if "cutpaste" in kinds and n < 2:
        raise ValueError(f"cutpaste needs at least 2 normal images (a donor), got {n}")
    if "texture_paste" in kinds and not textures:
        raise ValueError("texture_paste needs textures (e.g. images of scripts/make_procedural.py)")
    grey = images.shape[1] == 3 and bool((images == images[:, :1]).all())
    normals = (images[:, :1] if grey else images).permute(0, 2, 3, 1).contiguous().numpy()  # [n, H, W, C']
    out, masks, source, names = [], [], [], []
    for i in range(n):
        scene = as_scene(normals[i])
        for kind in kinds:
            rng = _rng(seed, i, kind)
            extra: dict = {}
            if kind == "cutpaste":
                extra["donor"] = normals[(i + 1 + int(rng.integers(0, n - 1))) % n]  # any image but i
            elif kind == "texture_paste":
                extra["texture"] = textures[int(rng.integers(len(textures)))]
            for _ in range(MAX_TRIES):
                defect = DEFECT_MAKERS[kind](scene, rng, None, 1.0, **extra)  # float, full strength
                if visible(changed(normals[i], blend(normals[i], defect, 1.0))):
                    break
            img = blend(normals[i], defect, strength)
            out.append(img)
            masks.append(changed(normals[i], img))
            source.append(i)
            names.append(kind)
    stacked = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # [m, C', H, W]
    if grey:
        stacked = stacked.expand(-1, 3, -1, -1)
    return SyntheticDefects(stacked.contiguous(), torch.from_numpy(np.stack(masks)),
                            torch.tensor(source, dtype=torch.long), names)
