"""A procedurally generated MVTec-style category (raw MVTec layout), for demos and tests.

Three kinds:
  capsule  an oblong two-tone gelatin capsule (dark red cap, ivory body with a printed code) on a
           plain light background, modelled on MVTec AD's capsule. Defects: crack, poke, scratch,
           faulty_imprint, squeeze.
  texture  a woven, slightly grainy textile seen from above (like MVTec's carpet). Defects: cut,
           stain, hole, thread.
  pcb      a photographed close-up of a small SMD circuit board: green solder mask with glass-fibre
           grain, copper traces of slightly varying width, silkscreen, an IC, resistors and
           capacitors with metal end caps, vias; uneven light with a soft reflection, mild blur,
           read and shot noise; each board shifted and turned a little, each part placed within
           a tolerance of 1-2 px. Defects: missing_component, solder_bridge, scratch,
           contamination, broken_trace.

Images are rendered at 3x (capsule) or 2x (texture, pcb) supersampling and box-downscaled, so edges are
anti-aliased, then lit (vignetting, gain), and sensor noise is added. Every anomalous image is
rendered twice from the same random state, with and without its defect; its mask is the set of
pixels the defect changed (more than 6/255 in some channel), so the ground truth is exact and lies
on the object. Each image has its own random stream derived from (seed, split, defect, index): the
output is fully determined by the seed, and changing one count does not change other images.

The defects do not come from util/defects.py (whose makers draw on finished images): they are part
of each renderer's scene, placed on the object's own geometry and drawn before lighting and noise
(a scratch through a trace, a bridge between two IC pins, a missing part left out of the board).
"""
import argparse
import json
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import OneLineArgumentParser, UserError, run_cli  # noqa: E402

DEFECTS = {
    "capsule": ("crack", "poke", "scratch", "faulty_imprint", "squeeze"),
    "texture": ("cut", "stain", "hole", "thread"),
    "pcb": ("missing_component", "solder_bridge", "scratch", "contamination", "broken_trace"),
}
MARKER = ".synthetic_mvtec.json"  # written into DST; lets a rerun replace its own output
MASK_THRESHOLD = 6.0 / 255.0  # a pixel belongs to the defect when the defect changed it this much
_KIND_CODE = {"capsule": 1, "texture": 2, "pcb": 3}

Array = np.ndarray


def _rng(seed: int, kind: str, split: int, defect: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(
        seed, spawn_key=(_KIND_CODE[kind], split, defect, index)))


def _box_down(a: Array, ss: int) -> Array:
    """Average ss x ss blocks: [H*ss, W*ss, ...] -> [H, W, ...] (anti-aliasing)."""
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss, *a.shape[2:]).mean(axis=(1, 3))


def _layer(shape: Tuple[int, int]) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (shape[1], shape[0]), 0)
    return img, ImageDraw.Draw(img)


def _coverage(img: Image.Image) -> Array:
    return np.asarray(img, dtype=np.float32) / 255.0


def _smooth_path(rng: np.random.Generator, start: Array, angle: float, n: int, step: float,
                 turn: float) -> Array:
    """A random walk with a slowly turning heading: [n + 1, 2] points."""
    pts = [np.asarray(start, dtype=np.float64)]
    for _ in range(n):
        angle += rng.normal(0.0, turn)
        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    return np.stack(pts)


def _lighting(size: int, rng: np.random.Generator, vignette: Tuple[float, float]) -> Array:
    """Multiplicative light field [S, S, 1]: vignetting, a faint gradient and a global gain."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    cx, cy = rng.normal(0, 0.08, 2)
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) / 2.0
    k = rng.uniform(*vignette)
    g = rng.normal(0, 0.015, 2)
    field = (1 - k * r2) * (1 + g[0] * x + g[1] * y) * rng.uniform(0.96, 1.04)
    return field[..., None].astype(np.float32)


def _finish(img: Array, noise: Array) -> Array:
    return np.clip(np.rint((img + noise) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------- capsule
class _Capsule:
    """Geometry of the capsule in its own frame (u along the axis, v across), in output pixels.

    Rendering works on a crop around the capsule only (it covers about a fifth of the image)."""

    SS = 3

    def __init__(self, size: int):
        self.size = s = size
        self.length = 0.70 * s
        self.r = 0.118 * s  # body radius
        self.r_cap = 1.045 * self.r  # the cap sits over the body, slightly wider
        self.a = self.length / 2 - self.r  # half-length of the straight part
        self.seam = -0.03 * s  # u of the cap's rim; cap is u < seam
        light = np.array([-0.35, -0.55, 0.76])
        self.light = (light / np.linalg.norm(light)).astype(np.float32)
        # a broad studio light above: a glossy stripe along the whole capsule
        h = np.array([0.0, -0.45, 1.0])
        self.half = (h / np.linalg.norm(h)).astype(np.float32)
        self.text = self._text_layer()

    def _text_layer(self) -> Tuple[Array, float, float]:
        """The printed code, flat, at SS resolution: (coverage, u0, v0) of its top-left corner."""
        fs = max(8, int(round(0.092 * self.size * self.SS)))
        font = ImageFont.load_default(size=fs)
        text = "AD 25"
        box = font.getbbox(text)
        w, h = box[2] - box[0], box[3] - box[1]
        pad = 2 * self.SS
        img, draw = _layer((h + 2 * pad, w + 2 * pad))
        draw.text((pad - box[0], pad - box[1]), text, fill=255, font=font)
        cov = _coverage(img)
        u_mid = (self.seam + self.length / 2) / 2  # centred on the body half
        return cov, u_mid - cov.shape[1] / self.SS / 2, -cov.shape[0] / self.SS / 2

    def grid(self, cx: float, cy: float, theta: float) -> Tuple[Tuple[int, int, int, int], Array, Array]:
        """Crop box (x0, y0, x1, y1) in output pixels and the object coordinates u, v of its
        supersampled pixel centres [h*SS, w*SS]."""
        s, ss = self.size, self.SS
        ct, st = np.cos(theta), np.sin(theta)
        hx = self.length / 2 * abs(ct) + self.r_cap * abs(st) + 3
        hy = self.length / 2 * abs(st) + self.r_cap * abs(ct) + 3
        x0, x1 = max(0, int(np.floor(cx - hx))), min(s, int(np.ceil(cx + hx)))
        y0, y1 = max(0, int(np.floor(cy - hy))), min(s, int(np.ceil(cy + hy)))
        xs = (x0 + (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss) - np.float32(cx)
        ys = (y0 + (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss) - np.float32(cy)
        ct, st = np.float32(ct), np.float32(st)
        u = ct * xs[None, :] + st * ys[:, None]
        v = -st * xs[None, :] + ct * ys[:, None]
        return (x0, y0, x1, y1), u, v

    def to_layer(self, pts_uv: Array, p: dict, box: Tuple[int, int, int, int]
                 ) -> List[Tuple[float, float]]:
        """Object-frame points [k, 2] -> pixel coordinates in the crop at SS resolution."""
        ct, st = np.cos(p["theta"]), np.sin(p["theta"])
        u, v = pts_uv[:, 0], pts_uv[:, 1]
        x = (p["cx"] + ct * u - st * v - box[0]) * self.SS
        y = (p["cy"] + st * u + ct * v - box[1]) * self.SS
        return list(zip(x.tolist(), y.tolist()))

    def shape(self, u: Array, v: Array) -> Tuple[Array, Array, Array]:
        """-> alpha (anti-aliased coverage), cap (soft 0/1), radius, all [h, w]."""
        du = np.maximum(np.abs(u) - np.float32(self.a), 0.0)
        rad = np.where(u < self.seam, np.float32(self.r_cap), np.float32(self.r))
        d = np.sqrt(du * du + v * v) - rad  # signed distance to the outline, output pixels
        alpha = np.clip(0.5 - d * self.SS, 0.0, 1.0)
        cap = np.clip(0.5 - (u - np.float32(self.seam)) * self.SS, 0.0, 1.0)
        return alpha, cap, rad

    def shading(self, u: Array, v: Array, rad: Array) -> Tuple[Array, Array]:
        """Lambert + gloss from the normal of a cylinder with hemispherical ends."""
        du = np.sign(u) * np.maximum(np.abs(u) - np.float32(self.a), 0.0)
        nx, ny = du / rad, v / rad
        nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
        lx, ly, lz = (float(c) for c in self.light)
        diff = np.clip(nx * lx + ny * ly + nz * lz, 0.0, 1.0)
        hy, hz = float(self.half[1]), float(self.half[2])
        spec = np.clip(ny * hy + nz * hz, 0.0, 1.0) ** 40 * np.clip(nz * 1.5, 0, 1)
        rim = np.clip(1.0 - nz, 0.0, 1.0) ** 3  # darker silhouette edge
        return (0.30 + 0.80 * diff) * (1.0 - 0.35 * rim), spec

    def text_coverage(self, u: Array, v: Array, layer: Array, du: float, dv: float) -> Array:
        _, u0, v0 = self.text
        sc = float(self.SS)
        # printed on a cylinder: the distance along the surface is r*asin(v/r), so the code is
        # foreshortened towards the edges as on a photographed capsule
        va = self.r * np.arcsin(np.clip(v / self.r, -1.0, 1.0))
        rows = (va - (v0 + dv)) * sc - 0.5
        cols = (u - (u0 + du)) * sc - 0.5
        out = np.zeros(u.shape, dtype=np.float32)
        inside = (rows > -1) & (rows < layer.shape[0]) & (cols > -1) & (cols < layer.shape[1])
        if inside.any():
            out[inside] = ndimage.map_coordinates(layer, [rows[inside], cols[inside]], order=1,
                                                  mode="constant", cval=0.0)
        return out


@lru_cache(maxsize=4)
def _capsule_geometry(size: int) -> _Capsule:
    return _Capsule(size)


def _capsule_params(rng: np.random.Generator, size: int) -> dict:
    return {
        "cx": float(size / 2 + rng.normal(0, 0.008 * size)),
        "cy": float(size / 2 + rng.normal(0, 0.008 * size)),
        "theta": float(np.deg2rad(rng.normal(0, 1.2))),
        "bg": (np.array([0.80, 0.80, 0.78]) * rng.uniform(0.97, 1.03)
               + rng.normal(0, 0.005, 3)).astype(np.float32),
        "cap": (np.array([0.46, 0.07, 0.08]) * rng.uniform(0.93, 1.07)).astype(np.float32),
        "body": (np.array([0.95, 0.91, 0.82]) * rng.uniform(0.97, 1.02)).astype(np.float32),
        "ink": float(rng.uniform(0.80, 0.95)), "ink_du": float(rng.normal(0, 0.004 * size)),
        "ink_dv": float(rng.normal(0, 0.003 * size)),
    }


def _capsule_defect_params(rng: np.random.Generator, defect: str, g: _Capsule) -> dict:
    s = g.size
    side = float(rng.choice([-1.0, 1.0]))
    p: dict = {"defect": defect}
    if defect == "crack":
        start = np.array([rng.uniform(-0.8, 0.8) * g.a, rng.uniform(-0.45, 0.45) * g.r])
        main = _smooth_path(rng, start, rng.uniform(0, 2 * np.pi), int(rng.integers(7, 11)),
                            0.017 * s, 0.6)
        k = int(rng.integers(2, len(main) - 1))
        branch = _smooth_path(rng, main[k], rng.uniform(0, 2 * np.pi), int(rng.integers(2, 4)),
                              0.016 * s, 0.6)
        p.update(main=main, branch=branch, width=0.013 * s)
    elif defect == "poke":
        p.update(u=rng.uniform(-0.85, 0.85) * g.a, v=rng.uniform(-0.4, 0.4) * g.r,
                 radius=rng.uniform(0.034, 0.046) * s)
    elif defect == "scratch":
        n = int(rng.integers(1, 4))
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(0.16, 0.28) * s
        centre = np.array([rng.uniform(-0.6, 0.6) * g.a, rng.uniform(-0.3, 0.3) * g.r])
        d = np.array([np.cos(ang), np.sin(ang)])
        nrm = np.array([-d[1], d[0]])
        bend = rng.normal(0, 0.04 * s)
        lines = []
        for i in range(n):
            off = nrm * (i - (n - 1) / 2) * rng.uniform(0.012, 0.02) * s
            t = np.linspace(-0.5, 0.5, 12)[:, None]
            lines.append(centre + off + t * length * d + (1 - 4 * t ** 2) * bend * nrm)
        p.update(lines=lines, width=0.0085 * s)
    elif defect == "faulty_imprint":
        p.update(mode=str(rng.choice(["missing", "smear", "double"])),
                 start=float(rng.uniform(0.05, 0.5)), frac=float(rng.uniform(0.35, 0.55)),
                 shift=(float(rng.uniform(0.012, 0.025) * s * side),
                        float(rng.uniform(0.01, 0.02) * s * side)))
    elif defect == "squeeze":
        p.update(side=side, u0=float(rng.uniform(-0.9, 0.9) * g.a),
                 depth=float(rng.uniform(0.22, 0.35) * g.r), width=float(rng.uniform(0.05, 0.08) * s))
    return p


def _faulty_text(text: Array, d: dict, ss: int) -> Array:
    text = text.copy()
    w = text.shape[1]
    a0, a1 = int(d["start"] * w), int((d["start"] + d["frac"]) * w)
    if d["mode"] == "missing":  # part of the code was not printed
        text[:, a0:a1] = 0.0
    elif d["mode"] == "smear":  # wet ink dragged sideways over part of the code
        k = max(2, int(abs(d["shift"][0]) * ss))
        sm = ndimage.uniform_filter1d(text[:, a0:a1], size=2 * k + 1, axis=1)
        text[:, a0:a1] = np.clip(sm * 1.3, 0, 1)
    else:  # printed twice with an offset
        sh = ndimage.shift(text, (d["shift"][1] * ss * 0.5, d["shift"][0] * ss), order=1)
        text = np.clip(text + 0.8 * sh, 0.0, 1.0)
    return text


def _render_capsule(g: _Capsule, p: dict, d: Optional[dict]) -> Tuple[Array, Array]:
    """-> (premultiplied colour [S, S, 3], coverage [S, S]) of the capsule, before lighting."""
    ss, s = g.SS, g.size
    box, u, v = g.grid(p["cx"], p["cy"], p["theta"])
    kind = d["defect"] if d else None
    if kind == "squeeze":
        # a dent pushed in from one side: the outline moves inwards and the surface there is
        # compressed, which moves its shading too
        bump = np.exp(-((u - d["u0"]) / d["width"]) ** 2)
        on_side = (np.sign(v) == d["side"]).astype(np.float32)
        v = v * (1.0 + on_side * (g.r / (g.r - d["depth"] * bump) - 1.0))
    alpha, cap, rad = g.shape(u, v)
    shade, spec = g.shading(u, v, rad)
    if kind == "squeeze":
        shade = shade * (1.0 - 0.25 * bump * on_side * np.clip(np.abs(v) / g.r, 0, 1))
    text = _faulty_text(g.text[0], d, ss) if kind == "faulty_imprint" else g.text[0]
    ink = g.text_coverage(u, v, text, p["ink_du"], p["ink_dv"]) * p["ink"]
    ink = ink * (u > g.seam + 0.01 * s)  # the print lies on the body only
    cap3 = cap[..., None]
    albedo = cap3 * p["cap"] + (1 - cap3) * p["body"]
    seam = 0.45 * np.exp(-((u - g.seam) * (1 / 0.6)) ** 2)  # the cap's rim casts a thin line
    albedo = albedo * (1.0 - seam[..., None])
    ink3 = ink[..., None]
    albedo = albedo * (1.0 - ink3) + ink3 * np.array([0.10, 0.09, 0.09], dtype=np.float32)

    if kind == "poke":
        du, dv = u - d["u"], v - d["v"]
        dist = np.sqrt(du * du + dv * dv)
        rho = dist / d["radius"]
        inside = (rho < 1.0).astype(np.float32)
        slope = np.sin(np.pi * np.clip(rho, 0, 1)) * inside
        # the dent's wall faces its centre: the part facing the light is brighter
        tilt = -(du * float(g.light[0]) + dv * float(g.light[1])) / np.maximum(dist, 1e-3)
        shade = shade * (1.0 + 0.9 * slope * tilt) * (1.0 - 0.55 * np.exp(-(rho / 0.35) ** 2))
        spec = spec * (1.0 - inside)
    colour = albedo * shade[..., None] + 0.45 * spec[..., None]

    if kind in ("crack", "scratch"):
        img, draw = _layer(u.shape)
        w = max(2, int(round(d["width"] * ss)))
        if kind == "crack":
            halo_img, halo = _layer(u.shape)
            for path, pw in ((d["main"], w), (d["branch"], max(2, int(w * 0.65)))):
                pts = g.to_layer(path, p, box)
                draw.line(pts, fill=255, width=pw, joint="curve")
                halo.line(pts, fill=255, width=int(pw * 2.2), joint="curve")
            dark, light, strength = (0.13, 0.09, 0.08), (0.90, 0.84, 0.78), 0.95
            # the broken edges catch the light next to the dark gap
            edge = np.clip(_coverage(halo_img) - _coverage(img), 0, 1) * (alpha > 0.99)
            colour = colour * (1.0 + 0.22 * edge[..., None])
        else:
            for line in d["lines"]:
                draw.line(g.to_layer(line, p, box), fill=255, width=w, joint="curve")
            dark, light, strength = (0.42, 0.38, 0.34), (0.80, 0.74, 0.72), 0.7
        cov = _coverage(img) * strength * np.clip(alpha * 1.2 - 0.2, 0, 1)  # stays on the object
        # on the dark cap the defect shows light (abrasion, powder); on the body it shows dark
        target = cap3 * np.array(light, np.float32) + (1 - cap3) * np.array(dark, np.float32)
        colour = colour * (1 - cov[..., None]) + target * cov[..., None]

    prem = np.zeros((s, s, 3), np.float32)
    a = np.zeros((s, s), np.float32)
    x0, y0, x1, y1 = box
    prem[y0:y1, x0:x1] = _box_down(colour * alpha[..., None], ss)
    a[y0:y1, x0:x1] = _box_down(alpha, ss)
    return prem, a


def _capsule_image(g: _Capsule, rng: np.random.Generator, defect: Optional[str]
                   ) -> Tuple[Array, Optional[Array]]:
    s = g.size
    p = _capsule_params(rng, s)
    light = _lighting(s, rng, (0.10, 0.18))
    noise = rng.normal(0, 1.8 / 255, (s, s, 3)).astype(np.float32)
    noise += rng.normal(0, 1.2 / 255, (s, s, 1)).astype(np.float32)

    prem0, a0 = _render_capsule(g, p, None)
    # soft contact shadow of the (intact) capsule, cast down-right
    sh = ndimage.shift(ndimage.gaussian_filter(a0, 0.018 * s), (0.012 * s, 0.008 * s), order=1)
    bg = p["bg"] * (1.0 - 0.22 * sh[..., None])

    def compose(prem: Array, a: Array) -> Array:
        return (bg * (1 - a[..., None]) + prem) * light

    clean = compose(prem0, a0)
    if defect is None:
        return _finish(clean, noise), None
    for _ in range(10):  # a defect that changes no pixel (possible at tiny sizes) is redrawn
        d = _capsule_defect_params(rng, defect, g)
        bad = compose(*_render_capsule(g, p, d))
        mask = (np.abs(bad - clean).max(axis=2) > MASK_THRESHOLD) & (a0 > 0.05)
        if mask.any():
            return _finish(bad, noise), mask
    raise RuntimeError(f"could not draw a visible {defect} at size {s}")


# --------------------------------------------------------------------------------------- texture
class _Weave:
    """A plain-weave textile: warp threads along y, weft threads along x, over-under alternating."""

    SS = 2

    def __init__(self, size: int):
        self.size = size
        self.pitch = max(3.0, size / 30.0)  # thread spacing in output pixels
        c = (np.arange(size * self.SS, dtype=np.float32) + 0.5) / self.SS
        self.c = c  # supersampled pixel centres along one axis, output units


@lru_cache(maxsize=4)
def _weave_geometry(size: int) -> _Weave:
    return _Weave(size)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Smooth random field [size, size] of about unit spread, with `cells` blobs across."""
    coarse = rng.normal(0, 1, (cells + 3, cells + 3))
    f = ndimage.zoom(coarse, size / cells, order=3)
    off = (f.shape[0] - size) // 2
    return (f[off:off + size, off:off + size] * 0.6).astype(np.float32)


def _texture_params(rng: np.random.Generator, size: int) -> dict:
    pal = np.array([0.66, 0.53, 0.38]) * rng.uniform(0.96, 1.04)
    return {
        "theta": float(np.deg2rad(rng.normal(0, 1.0))),
        "phase": (float(rng.uniform(0, 200)), float(rng.uniform(0, 200))),
        "warp": pal.astype(np.float32),
        "weft": (pal * np.array([0.86, 0.84, 0.86])).astype(np.float32),
        "thread_var": rng.normal(0, 0.05, (2, 512)).astype(np.float32),
        "wave": (float(rng.uniform(0.1, 0.3)), float(rng.uniform(20, 40)),
                 float(rng.uniform(0, 2 * np.pi))),
        # dye unevenness (smooth) and fibre grain (fine), applied at the output resolution
        "blotch": _smooth_noise(rng, size, 10),
        "grain": rng.normal(0, 1, (size, size, 1)).astype(np.float32),
    }


def _weave_colour(w: _Weave, p: dict) -> Array:
    """Colour of the intact weave at SS resolution, [n, n, 3]."""
    ct, st = np.float32(np.cos(p["theta"])), np.float32(np.sin(p["theta"]))
    x, y = w.c[None, :], w.c[:, None]
    u = ct * x + st * y + np.float32(p["phase"][0])
    v = -st * x + ct * y + np.float32(p["phase"][1])
    pitch = np.float32(w.pitch)
    amp, lam, ph = p["wave"]
    k = np.float32(2 * np.pi / (lam * w.pitch))
    u = u + np.float32(amp * w.pitch) * np.sin(v * k + np.float32(ph))
    fx, fy = u / pitch, v / pitch
    ix, iy = np.floor(fx), np.floor(fy)
    ax, ay = fx - ix, fy - iy  # position within the cell, [0, 1)
    gap = 0.10
    prof_x = np.sqrt(np.clip(1 - ((ax - 0.5) * (1 / (0.5 - gap))) ** 2, 0, 1))  # warp cross-section
    prof_y = np.sqrt(np.clip(1 - ((ay - 0.5) * (1 / (0.5 - gap))) ** 2, 0, 1))  # weft cross-section
    warp_top = ((ix + iy) % 2) == 0
    # along its length a thread rises in the middle of the cell and dives at the crossings
    h_w = prof_x * np.where(warp_top, 0.55 + 0.45 * np.sin(np.pi * ay), 0.45)
    h_f = prof_y * np.where(warp_top, 0.45, 0.55 + 0.45 * np.sin(np.pi * ax))
    show_w = h_w >= h_f
    # plied yarn: slanted twist striations across each thread
    tw = np.where(show_w, np.sin(2 * np.pi * (3 * ax + 1.5 * fy)),
                  np.sin(2 * np.pi * (3 * ay - 1.5 * fx)))
    var = np.where(show_w, p["thread_var"][0][ix.astype(np.int64) % 512],
                   p["thread_var"][1][iy.astype(np.int64) % 512])
    shade = (0.25 + 0.85 * np.maximum(h_w, h_f)) * (0.88 + 0.12 * tw) * (1 + var)
    base = np.where(show_w[..., None], p["warp"], p["weft"])
    return base * shade[..., None]


def _ribbon(path: Array, widths: Array) -> Array:
    """Polygon [2k, 2] of a path [k, 2] with a varying width [k] (a slit, a tapered thread)."""
    t = np.gradient(path, axis=0)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)
    n = np.stack([-t[:, 1], t[:, 0]], 1)
    left = path + n * widths[:, None] / 2
    right = path - n * widths[:, None] / 2
    return np.concatenate([left, right[::-1]])


def _texture_defect_params(rng: np.random.Generator, defect: str, size: int) -> dict:
    s = size
    c = rng.uniform(0.2, 0.8, 2) * s
    p: dict = {"defect": defect, "c": c}
    if defect == "cut":
        path = _smooth_path(rng, c, rng.uniform(0, np.pi), 10, rng.uniform(0.014, 0.019) * s, 0.08)
        t = np.linspace(0, 1, len(path))
        # the cut gapes in the middle: a spindle-shaped slit
        widths = rng.uniform(0.022, 0.032) * s * np.sin(np.pi * t) ** 0.7 + 0.004 * s
        p.update(poly=_ribbon(path, widths),
                 fibres=[(path[int(rng.integers(1, len(path) - 1))], rng.uniform(0, 2 * np.pi))
                         for _ in range(6)])
    elif defect in ("stain", "hole"):
        r0 = (rng.uniform(0.045, 0.07) if defect == "stain" else rng.uniform(0.03, 0.045)) * s
        k = np.arange(1, 5)
        amp = rng.normal(0, 0.12, 4) / k
        ph = rng.uniform(0, 2 * np.pi, 4)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        r = r0 * (1 + (amp[None] * np.cos(k[None] * t[:, None] + ph[None])).sum(1))
        p.update(poly=np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], 1), r0=r0,
                 tint=(np.array([0.55, 0.42, 0.38]) * rng.uniform(0.8, 1.1)).astype(np.float32),
                 ends=[(rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.5)) for _ in range(7)])
    elif defect == "thread":
        p.update(path=_smooth_path(rng, c, rng.uniform(0, 2 * np.pi), 14,
                                   rng.uniform(0.02, 0.03) * s, 0.3),
                 width=rng.uniform(0.010, 0.014) * s,
                 colour=np.array([0.86, 0.84, 0.78] if rng.random() < 0.5 else [0.30, 0.18, 0.12],
                                 dtype=np.float32))
    return p


def _render_texture(w: _Weave, p: dict, d: Optional[dict]) -> Array:
    """-> colour [S, S, 3] before lighting and noise."""
    ss, s = w.SS, w.size
    col = _weave_colour(w, p)
    kind = d["defect"] if d else None
    to_ss = lambda pts: [(float(x) * ss, float(y) * ss) for x, y in pts]  # noqa: E731
    shape = col.shape[:2]
    if kind == "cut":
        img, draw = _layer(shape)
        draw.polygon(to_ss(d["poly"]), fill=255)
        cov = _coverage(img)
        fib_img, fd = _layer(shape)
        for (x, y), ang in d["fibres"]:  # cut fibre ends sticking out over the slit
            ln = 0.02 * s
            fd.line(to_ss([(x - ln * np.cos(ang), y - ln * np.sin(ang)),
                           (x + ln * np.cos(ang), y + ln * np.sin(ang))]),
                    fill=255, width=max(1, int(0.005 * s * ss)))
        fib = _coverage(fib_img) * np.clip(ndimage.uniform_filter(cov, 3 * ss) * 3, 0, 1)
        # the slit shows the dark backing, darkest in its middle
        inner = ndimage.gaussian_filter(cov, ss)
        backing = (0.10 - 0.06 * inner[..., None]) * p["warp"] / 0.66
        col = col * (1 - cov[..., None]) + cov[..., None] * backing
        col = col * (1 - fib[..., None]) + fib[..., None] * p["warp"] * 1.1
    elif kind in ("stain", "hole"):
        img, draw = _layer(shape)
        draw.polygon(to_ss(d["poly"]), fill=255)
        cov = _coverage(img)
        if kind == "stain":
            soft = ndimage.gaussian_filter(cov, 1.0 * ss)
            ring = np.clip(soft - ndimage.gaussian_filter(cov, 2.5 * ss), 0, 1)  # coffee-ring edge
            mult = 1 - soft[..., None] * (1 - d["tint"]) - 0.6 * ring[..., None]
            col = col * np.clip(mult, 0, 1)
        else:
            ends_img, ed = _layer(shape)
            c = np.asarray(d["c"])
            for ang, frac in d["ends"]:  # torn threads reaching into the hole
                a = c + d["r0"] * 1.05 * np.array([np.cos(ang), np.sin(ang)])
                b = c + d["r0"] * (1 - frac) * np.array([np.cos(ang + 0.2), np.sin(ang + 0.2)])
                ed.line(to_ss([a, b]), fill=255, width=max(2, int(0.008 * s * ss)))
            ends = _coverage(ends_img) * cov
            dist = ndimage.distance_transform_edt(cov > 0.5) / (d["r0"] * ss)
            inner = (0.05 * (1 + 1.5 * np.clip(1 - dist, 0, 1))).astype(np.float32)[..., None]
            inner = inner * np.array([1, 0.8, 0.7], np.float32)
            col = col * (1 - cov[..., None]) + cov[..., None] * inner
            col = col * (1 - ends[..., None]) + ends[..., None] * p["warp"] * 0.8
    elif kind == "thread":
        pts = d["path"]
        wpx = max(2, int(d["width"] * ss))
        shadow, sd = _layer(shape)
        sd.line(to_ss(pts + 0.35 * d["width"]), fill=255, width=wpx + 2, joint="curve")
        body, bd = _layer(shape)
        bd.line(to_ss(pts), fill=255, width=wpx, joint="curve")
        hi, hd = _layer(shape)
        hd.line(to_ss(pts - 0.2 * d["width"]), fill=255, width=max(1, wpx // 3), joint="curve")
        sh = ndimage.gaussian_filter(_coverage(shadow), 0.6 * ss)
        col = col * (1 - 0.45 * sh[..., None])
        b, h = _coverage(body), _coverage(hi) * _coverage(body)
        col = col * (1 - b[..., None]) + b[..., None] * d["colour"] * 0.85
        col = col * (1 + 0.25 * h[..., None])
    out = _box_down(col.astype(np.float32), ss)
    return out * (1 + 0.06 * p["blotch"][..., None]) * (1 + 0.03 * p["grain"])


def _texture_image(w: _Weave, rng: np.random.Generator, defect: Optional[str]
                   ) -> Tuple[Array, Optional[Array]]:
    s = w.size
    p = _texture_params(rng, s)
    light = _lighting(s, rng, (0.06, 0.12))
    noise = rng.normal(0, 2.0 / 255, (s, s, 3)).astype(np.float32)
    clean = _render_texture(w, p, None) * light
    if defect is None:
        return _finish(clean, noise), None
    for _ in range(10):
        d = _texture_defect_params(rng, defect, s)
        bad = _render_texture(w, p, d) * light
        mask = np.abs(bad - clean).max(axis=2) > MASK_THRESHOLD
        if mask.any():
            return _finish(bad, noise), mask
    raise RuntimeError(f"could not draw a visible {defect} at size {s}")


# ------------------------------------------------------------------------------------------- pcb
class _Board:
    """The fixed design of a small SMD board (one product, like an MVTec category), in fractions of
    the image side: a 14-pin IC, six two-terminal parts, vias, a fiducial, traces and silkscreen.

    Every image places this design with its own shift, rotation and part tolerances; all geometry is
    drawn with PIL at SS resolution through `to_ss`, so only coordinates are transformed."""

    SS = 2
    IC = (0.60, 0.42, 0.30, 0.20)  # centre x, y, body width, height
    PIN_PITCH, PIN_W, PIN_OUT = 0.038, 0.018, 0.035  # pins stick out of the body by PIN_OUT
    # (x, y, vertical, kind R or C, label)
    PARTS = ((0.17, 0.22, False, "R", "R1"), (0.17, 0.40, False, "R", "R2"),
             (0.15, 0.66, True, "C", "C1"), (0.42, 0.80, False, "C", "C2"),
             (0.82, 0.76, True, "R", "R3"), (0.88, 0.22, True, "C", "C3"))
    PART_L, PART_W, CAP_L, PAD_OFF = 0.10, 0.05, 0.022, 0.045
    VIAS = ((0.08, 0.88), (0.33, 0.12), (0.92, 0.48), (0.64, 0.90), (0.30, 0.55))
    TRACES = (
        ((0.215, 0.22), (0.42, 0.22), (0.486, 0.285)),
        ((0.562, 0.285), (0.562, 0.20), (0.60, 0.16), (0.60, -0.05)),
        ((0.638, 0.285), (0.638, 0.22), (0.70, 0.16), (0.86, 0.16), (0.88, 0.175)),
        ((0.714, 0.285), (0.78, 0.22), (0.78, -0.05)),
        ((0.215, 0.40), (0.30, 0.40), (0.30, 0.55)),
        ((0.524, 0.555), (0.524, 0.62), (0.465, 0.68), (0.465, 0.80)),
        ((0.60, 0.555), (0.60, 0.70), (0.64, 0.74), (0.64, 0.90)),
        ((0.676, 0.555), (0.676, 0.62), (0.82, 0.62), (0.82, 0.715)),
        ((0.82, 0.805), (0.82, 1.05)),
        ((0.15, 0.615), (0.15, 0.52), (0.11, 0.48), (0.11, 0.40), (0.125, 0.40)),
        ((0.15, 0.705), (0.15, 0.81), (0.08, 0.88)),
        ((0.375, 0.80), (0.25, 0.80), (0.20, 0.92), (-0.05, 0.92)),
        ((0.125, 0.22), (-0.05, 0.22)),
        ((0.92, 0.48), (1.05, 0.48)),
    )
    TRACE_W = 0.02

    def __init__(self, size: int):
        self.size = s = size
        self.pins = [(self.IC[0] + (i - 3) * self.PIN_PITCH, side)
                     for side in (-1, 1) for i in range(7)]  # (x, -1 top / +1 bottom row)
        # traces resampled every half output pixel, so a union of discs draws them smoothly
        self.traces = []
        for poly in self.TRACES:
            pts = np.asarray(poly, dtype=np.float64) * s
            seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
            t = np.concatenate([[0.0], np.cumsum(seg)])
            q = np.linspace(0.0, t[-1], max(2, int(t[-1] * 2)))
            self.traces.append(np.stack([np.interp(q, t, pts[:, 0]),
                                         np.interp(q, t, pts[:, 1])], 1))  # [k, 2]

    def part_box(self, j: int, a0: float, a1: float, c0: float, c1: float
                 ) -> Tuple[float, float, float, float]:
        """A box on part j as (x0, y0, x1, y1) in fractions, given along (a) and across (c) the
        part, relative to its centre."""
        x, y, vertical = self.PARTS[j][:3]
        if vertical:
            return x + c0, y + a0, x + c1, y + a1
        return x + a0, y + c0, x + a1, y + c1

    def pin_rect(self, i: int, length_extra: float = 0.0) -> Tuple[float, float, float, float]:
        """Pin i's lead as (x0, y0, x1, y1) in fractions: from inside the body to its tip."""
        x, side = self.pins[i]
        edge = self.IC[1] + side * self.IC[3] / 2
        y0, y1 = sorted((edge - side * 0.01, edge + side * (self.PIN_OUT + length_extra)))
        return x - self.PIN_W / 2, y0, x + self.PIN_W / 2, y1


@lru_cache(maxsize=4)
def _board_geometry(size: int) -> _Board:
    return _Board(size)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _pcb_params(rng: np.random.Generator, b: _Board) -> dict:
    s = b.size
    return {
        "theta": float(np.deg2rad(np.clip(rng.normal(0, 0.6), -1.4, 1.4))),
        "shift": np.clip(rng.normal(0, 0.008 * s, 2), -0.02 * s, 0.02 * s),
        # placement tolerance of each part and of the silkscreen print, output pixels / radians
        "part_shift": np.clip(rng.normal(0, 0.003 * s, (len(b.PARTS) + 1, 2)),
                              -0.009 * s, 0.009 * s),
        "part_turn": np.deg2rad(np.clip(rng.normal(0, 1.0, len(b.PARTS) + 1), -2.5, 2.5)),
        "silk_shift": rng.normal(0, 0.002 * s, 2),
        # etching makes trace widths wander slightly along each trace
        "trace_w": [1.0 + 0.08 * np.interp(np.arange(len(t)), np.linspace(0, len(t), 8),
                                           rng.normal(0, 1, 8)) for t in b.traces],
        "mask": (np.array([0.09, 0.33, 0.17]) * rng.uniform(0.92, 1.08)
                 * rng.normal(1.0, 0.03, 3)).astype(np.float32),
        "metal": (np.array([0.80, 0.79, 0.75]) * rng.uniform(0.93, 1.05)).astype(np.float32),
        "blur": float(rng.uniform(0.45, 0.75)),
        # glass-fibre weave under the mask (fine, anisotropic) and uneven mask thickness (smooth)
        "grain": rng.normal(0, 1, (2, s, s)).astype(np.float32),
        "blotch": _smooth_noise(rng, s, 8),
        "metal_var": ndimage.gaussian_filter(rng.normal(0, 2.0, (s, s)), 0.8).astype(np.float32),
    }


def _pcb_defect_params(rng: np.random.Generator, defect: str, b: _Board) -> dict:
    s = b.size
    p: dict = {"defect": defect}
    if defect == "missing_component":
        p["part"] = int(rng.integers(len(b.PARTS)))
    elif defect == "solder_bridge":
        i = int(rng.choice([k for k in range(len(b.pins) - 1) if k != 6]))  # neighbours on one side
        (x0, side), (x1, _) = b.pins[i], b.pins[i + 1]
        edge = b.IC[1] + side * b.IC[3] / 2
        centre = np.array([(x0 + x1) / 2, edge + side * rng.uniform(0.012, 0.026)]) * s
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        rx = (b.PIN_PITCH / 2 + b.PIN_W * rng.uniform(0.25, 0.5)) * s
        ry = rng.uniform(0.010, 0.016) * s
        wob = 1 + rng.normal(0, 0.06, 24)
        p["poly"] = np.stack([centre[0] + rx * wob * np.cos(t),
                              centre[1] + ry * wob * np.sin(t)], 1)
    elif defect == "scratch":
        # through a trace, so it crosses both bare mask and copper
        tr = b.traces[int(rng.integers(len(b.traces)))]
        c = tr[int(rng.integers(len(tr) // 4, max(len(tr) // 4 + 1, 3 * len(tr) // 4)))]
        path = _smooth_path(rng, c, rng.uniform(0, 2 * np.pi), 10,
                            rng.uniform(0.018, 0.03) * s, 0.05)
        p.update(path=path - (path[-1] - path[0]) / 2, width=rng.uniform(0.004, 0.007) * s)
    elif defect == "contamination":
        c = rng.uniform(0.15, 0.85, 2) * s
        if rng.random() < 0.5:  # a brown stain (flux residue, a dried drop)
            k = np.arange(1, 5)
            amp, ph = rng.normal(0, 0.15, 4) / k, rng.uniform(0, 2 * np.pi, 4)
            t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
            wobble = (amp[None] * np.cos(k[None] * t[:, None] + ph[None])).sum(1)
            r = rng.uniform(0.03, 0.05) * s * (1 + wobble)
            p.update(stain=np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], 1))
        else:  # a dark dust fibre lying on the board
            p.update(fibre=_smooth_path(rng, c, rng.uniform(0, 2 * np.pi), 12,
                                        rng.uniform(0.010, 0.016) * s, 0.35),
                     width=rng.uniform(0.004, 0.006) * s)
    elif defect == "broken_trace":
        k = int(rng.integers(len(b.traces)))
        tr = b.traces[k]
        j = int(rng.integers(int(0.3 * len(tr)), max(int(0.3 * len(tr)) + 1, int(0.7 * len(tr)))))
        d = tr[min(j + 1, len(tr) - 1)] - tr[max(j - 1, 0)]
        d = d / max(np.linalg.norm(d), 1e-9)
        n = np.array([-d[1], d[0]])
        gap, across = rng.uniform(0.012, 0.025) * s / 2, b.TRACE_W * s
        corners = [tr[j] + sa * gap * d + sb * across * n
                   for sa, sb in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        p.update(poly=np.asarray(corners) + rng.normal(0, 0.08 * gap, (4, 2)))
    return p


def _paint(col: Array, cov: Array, colour) -> None:
    """In place: col <- col + cov * (colour - col) where cov > 0 (most layers cover little).
    colour is one colour [3] or per pixel [n, n, 3]."""
    idx = np.flatnonzero(cov)
    flat = col.reshape(-1, 3)
    colour = np.asarray(colour, np.float32)
    target = colour.reshape(-1, 3)[idx] if colour.ndim == 3 else colour
    cur = flat[idx]
    flat[idx] = cur + cov.reshape(-1)[idx, None] * (target - cur)


class _Pose:
    """Where one image puts the board design: its shift and turn, drawn at SS resolution."""

    def __init__(self, b: _Board, p: dict):
        self.s, self.ss, self.theta, self.shift = b.size, b.SS, p["theta"], p["shift"]

    def to_ss(self, pts, off=(0.0, 0.0), turn: float = 0.0, pivot=None
              ) -> List[Tuple[float, float]]:
        """Board points [k, 2] in output pixels -> image coordinates at SS resolution; a part's
        own tolerance (offset, turn about its pivot) is applied first."""
        s, ct, st = self.s, np.cos(self.theta), np.sin(self.theta)
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        if turn:
            c, sn = np.cos(turn), np.sin(turn)
            q = pts - pivot
            pts = pivot + np.stack([c * q[:, 0] - sn * q[:, 1], sn * q[:, 0] + c * q[:, 1]], 1)
        q = pts + np.asarray(off) - s / 2
        x = s / 2 + ct * q[:, 0] - st * q[:, 1] + self.shift[0]
        y = s / 2 + st * q[:, 0] + ct * q[:, 1] + self.shift[1]
        return list(zip((x * self.ss).tolist(), (y * self.ss).tolist()))

    def rect(self, x0: float, y0: float, x1: float, y1: float, **tol) -> List[Tuple[float, float]]:
        """Corners of a rectangle given in fractions of the side."""
        return self.to_ss(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) * self.s, **tol)

    def disc(self, draw: ImageDraw.ImageDraw, centre: Tuple[float, float], r: float) -> None:
        """A filled circle; centre and radius in fractions of the side."""
        (x, y), = self.to_ss(np.asarray(centre) * self.s)
        r = r * self.s * self.ss
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)

    def text(self, layer: Image.Image, words: str, centre: Tuple[float, float], height: float,
             off=(0.0, 0.0)) -> None:
        """Print words centred at centre (fractions), turned with the board."""
        font = _font(max(6, int(round(height * self.s * self.ss))))
        box = font.getbbox(words)
        im, dr = _layer((box[3] - box[1] + 4, box[2] - box[0] + 4))
        dr.text((2 - box[0], 2 - box[1]), words, fill=255, font=font)
        im = im.rotate(-np.rad2deg(self.theta), resample=Image.BILINEAR, expand=True)
        (x, y), = self.to_ss(np.asarray(centre) * self.s, off=off)
        layer.paste(im, (int(round(x - im.width / 2)), int(round(y - im.height / 2))), mask=im)


def _draw_board(b: _Board, pose: _Pose, p: dict, d: Optional[dict]) -> Dict[str, Array]:
    """Coverage layers [n, n] of the board at SS resolution: trace (copper under the mask), pad
    (bare tinned copper), hole, silk, R / C / IC (part bodies), ink (IC marking), caps (end caps
    and leads), plus the defect's own layer under its name (not for missing_component)."""
    s, ss, n = b.size, b.SS, b.size * b.SS
    kind = d["defect"] if d else None
    names = ("trace", "pad", "hole", "silk", "R", "C", "IC", "ink", "caps") + \
        ((kind,) if kind not in (None, "missing_component") else ())
    layers = {name: _layer((n, n)) for name in names}
    draw = {name: dr for name, (_, dr) in layers.items()}
    for tr, w in zip(b.traces, p["trace_w"]):
        for (x, y), r in zip(pose.to_ss(tr), b.TRACE_W * s / 2 * ss * w):
            draw["trace"].ellipse((x - r, y - r, x + r, y + r), fill=255)
    for i in range(len(b.pins)):
        x0, y0, x1, y1 = b.pin_rect(i, 0.02)
        draw["pad"].polygon(pose.rect(x0 - 0.003, y0, x1 + 0.003, y1), fill=255)
    for centre in b.VIAS:
        pose.disc(draw["pad"], centre, 0.018)
        pose.disc(draw["hole"], centre, 0.008)
    pose.disc(draw["pad"], (0.93, 0.93), 0.014)  # fiducial
    silk = dict(off=p["silk_shift"])
    silk_w = max(1, int(0.006 * s * ss))
    half_l, half_w = b.PART_L / 2, b.PART_W / 2
    for j, (x, y, vertical, part, label) in enumerate(b.PARTS):
        for sgn in (-1, 1):
            draw["pad"].polygon(pose.rect(*b.part_box(j, sgn * b.PAD_OFF - 0.0175,
                                                      sgn * b.PAD_OFF + 0.0175, -0.0325, 0.0325)),
                                fill=255)
        for sgn in (-1, 1):  # silkscreen: the two long sides of the outline, beside the pads
            side = np.array(b.part_box(j, -0.08, 0.08, sgn * 0.05, sgn * 0.05)).reshape(2, 2) * s
            draw["silk"].line(pose.to_ss(side, **silk), fill=255, width=silk_w)
        lab = np.array([x, y]) + (np.array([0.085, 0.0]) if vertical else np.array([0.0, -0.065]))
        pose.text(layers["silk"][0], label, lab, 0.05, **silk)
        if kind == "missing_component" and d["part"] == j:
            continue
        tol = dict(off=p["part_shift"][j], turn=p["part_turn"][j], pivot=np.array([x, y]) * s)
        draw[part].polygon(pose.rect(*b.part_box(j, -half_l, half_l, -half_w, half_w), **tol),
                           fill=255)
        for sgn in (-1, 1):
            lo, hi = sorted((sgn * half_l, sgn * (half_l - b.CAP_L)))
            draw["caps"].polygon(pose.rect(*b.part_box(j, lo, hi, -half_w, half_w), **tol),
                                 fill=255)
    cx, cy, bw, bh = b.IC
    tol = dict(off=p["part_shift"][-1], turn=p["part_turn"][-1], pivot=np.array([cx, cy]) * s)
    draw["IC"].polygon(pose.rect(cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, **tol),
                       fill=255)
    for i in range(len(b.pins)):
        draw["caps"].polygon(pose.rect(*b.pin_rect(i), **tol), fill=255)
    dot = pose.to_ss(np.array([[cx - bw / 2 + 0.02, cy + bh / 2 - 0.045],
                               [cx - bw / 2 + 0.045, cy + bh / 2 - 0.02]]) * s, **tol)
    draw["ink"].ellipse(dot, fill=150)  # pin-1 mark
    pose.text(layers["ink"][0], "MX7A 2541", (cx, cy - 0.02), 0.04, off=tol["off"])
    u1 = np.array([[cx - bw / 2 - 0.02, cy - 0.05], [cx - bw / 2 - 0.02, cy + 0.05]]) * s
    draw["silk"].line(pose.to_ss(u1, **silk), fill=255, width=silk_w)
    pose.text(layers["silk"][0], "U1", (cx - bw / 2 - 0.06, cy), 0.05, **silk)
    pose.text(layers["silk"][0], "MAE-AD REV.B", (0.30, 0.965), 0.045, **silk)
    if kind in ("broken_trace", "solder_bridge"):
        draw[kind].polygon(pose.to_ss(d["poly"]), fill=255)
    elif kind == "scratch":
        draw[kind].line(pose.to_ss(d["path"]), fill=255, width=max(1, int(round(d["width"] * ss))),
                        joint="curve")
    elif kind == "contamination" and "stain" in d:
        draw[kind].polygon(pose.to_ss(d["stain"]), fill=255)
    elif kind == "contamination":
        draw[kind].line(pose.to_ss(d["fibre"]), fill=255, width=max(1, int(round(d["width"] * ss))),
                        joint="curve")
    return {name: _coverage(img) for name, (img, _) in layers.items()}


def _render_pcb(b: _Board, p: dict, d: Optional[dict]) -> Tuple[Array, Array]:
    """-> colour [S, S, 3] of the board before lighting, blur and noise, and its metal
    coverage [S, S] (shiny: it takes more of the reflection)."""
    ss, n = b.SS, b.size * b.SS
    kind = d["defect"] if d else None
    cov = _draw_board(b, _Pose(b, p), p, d)
    trace = cov["trace"]
    if kind == "broken_trace":  # etched away across the whole trace: the mask lies on bare laminate
        trace = trace * (1 - cov[kind])
    col = np.empty((n, n, 3), np.float32)
    col[:] = p["mask"]
    _paint(col, trace, p["mask"] * np.array([1.55, 1.30, 1.25]))  # copper under the green mask
    if kind == "broken_trace":  # the cut edges of the copper leave a dark rim
        rim = np.clip(ndimage.gaussian_filter(cov[kind], 0.5 * ss) - cov[kind], 0, 1)
        col = col * (1 - 0.5 * rim[..., None])
    _paint(col, cov["pad"], p["metal"] * 0.95)
    _paint(col, cov["hole"], (0.03, 0.03, 0.03))
    _paint(col, cov["silk"] * 0.92, (0.93, 0.93, 0.88))
    parts = cov["R"] + cov["C"] + cov["IC"]
    # parts stand above the board: a soft shadow down-right of them
    shadow = np.roll(ndimage.gaussian_filter(np.clip(parts + cov["caps"], 0, 1), 0.8 * ss),
                     (ss, ss), (0, 1))
    col = col * (1 - 0.45 * shadow[..., None])
    _paint(col, cov["R"], (0.07, 0.07, 0.07))
    _paint(col, cov["C"], (0.60, 0.48, 0.33))
    _paint(col, cov["IC"], (0.11, 0.11, 0.12))
    _paint(col, cov["ink"] * 0.8, (0.32, 0.32, 0.32))
    _paint(col, cov["caps"], p["metal"])
    metal = np.clip(cov["pad"] + cov["caps"], 0, 1)
    if kind == "solder_bridge":
        blob = cov[kind]
        dome = ndimage.gaussian_filter(blob, 1.0 * ss)  # a rounded blob: bright crest, darker rim
        _paint(col, blob, p["metal"] * (0.55 + 0.6 * dome[..., None]))
        metal = np.maximum(metal, blob)
    elif kind == "scratch":
        sc = cov[kind] * (1 - np.clip(parts + cov["caps"], 0, 1))
        # through the mask: bright copper on a trace, pale scuffed mask elsewhere
        target = trace[..., None] * np.array([0.85, 0.55, 0.35], np.float32) + \
            (1 - trace[..., None]) * np.array([0.45, 0.62, 0.48], np.float32)
        col = col + (0.85 * sc)[..., None] * (target - col)
    elif kind == "contamination" and "stain" in d:
        soft = ndimage.gaussian_filter(cov[kind], 1.2 * ss)
        col = col * (1 - soft[..., None] * np.array([0.35, 0.55, 0.70], np.float32))
    elif kind == "contamination":
        _paint(col, cov[kind] * 0.9, (0.06, 0.05, 0.04))
    out = _box_down(col, ss)
    metal = _box_down(metal, ss)
    # glass-fibre weave shows faintly through the mask; metal has its own grainy sheen
    weave = (ndimage.gaussian_filter(p["grain"][0], (0.5, 2.5))
             + ndimage.gaussian_filter(p["grain"][1], (2.5, 0.5)))
    tex = (1 - metal) * (0.10 * weave + 0.05 * p["blotch"]) + metal * 0.12 * p["metal_var"]
    return out * (1 + tex[..., None]), metal


def _pcb_image(b: _Board, rng: np.random.Generator, defect: Optional[str]
               ) -> Tuple[Array, Optional[Array]]:
    s = b.size
    p = _pcb_params(rng, b)
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1) * 2 - 1
    ang = rng.uniform(0, 2 * np.pi)
    light = _lighting(s, rng, (0.15, 0.30))
    light = light * (1 + rng.uniform(0.05, 0.15) * (np.cos(ang) * x + np.sin(ang) * y))[..., None]
    hx, hy = rng.uniform(-0.6, 0.6, 2)
    hr, hk = rng.uniform(0.25, 0.5), rng.uniform(0.06, 0.14)
    # a soft reflection of the lamp, strongest on metal
    highlight = (hk * np.exp(-((x - hx) ** 2 + (y - hy) ** 2) / hr ** 2))[..., None]
    read = rng.normal(0, 1.5 / 255, (s, s, 3)).astype(np.float32)
    shot = rng.normal(0, 1, (s, s, 3)).astype(np.float32)

    def photo(col: Array, metal: Array) -> Array:
        blurred = ndimage.gaussian_filter(col, (p["blur"], p["blur"], 0))
        gloss = 0.35 + 0.65 * ndimage.gaussian_filter(metal, p["blur"])[..., None]
        return blurred * light + highlight * gloss

    def finish(img: Array) -> Array:  # read noise + photon (shot) noise growing with brightness
        return _finish(img, read + 0.012 * np.sqrt(np.clip(img, 0, 1)) * shot)

    clean = photo(*_render_pcb(b, p, None))
    if defect is None:
        return finish(clean), None
    for _ in range(10):
        d = _pcb_defect_params(rng, defect, b)
        bad = photo(*_render_pcb(b, p, d))
        mask = np.abs(bad - clean).max(axis=2) > MASK_THRESHOLD
        if mask.any():
            return finish(bad), mask
    raise RuntimeError(f"could not draw a visible {defect} at size {s}")


# ------------------------------------------------------------------------------------ category
def render_image(kind: str, size: int, seed: int, split: int, defect: Optional[str], index: int
                 ) -> Tuple[Array, Optional[Array]]:
    """One image: (uint8 [S, S, 3], bool mask [S, S] or None). split: 0 train, 1 test."""
    if kind not in DEFECTS:
        raise UserError(f"unknown --kind {kind}; choose one of {', '.join(DEFECTS)}")
    code = 0 if defect is None else 1 + DEFECTS[kind].index(defect)
    return render_from(kind, size, _rng(seed, kind, split, code, index), defect)


def render_from(kind: str, size: int, rng: np.random.Generator, defect: Optional[str]
                ) -> Tuple[Array, Optional[Array]]:
    """render_image from a given random stream. Each kind draws the normal image's randomness
    before the defect's, so with defect=None the same stream gives the defect-free original."""
    if kind == "capsule":
        return _capsule_image(_capsule_geometry(size), rng, defect)
    if kind == "pcb":
        return _pcb_image(_board_geometry(size), rng, defect)
    return _texture_image(_weave_geometry(size), rng, defect)


def _save_png(arr: Array, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)


def make_category(dst: Path, seed: int = 0, size: int = 224, n_train: int = 200,
                  n_test_good: int = 40, n_per_defect: int = 15, kind: str = "capsule",
                  overwrite: bool = False, progress: bool = False) -> Dict[str, int]:
    """Write a synthetic category to `dst` in the raw MVTec layout; returns {folder: count}.

    `dst` must be empty or missing, or hold an earlier output of this function (recognised by its
    marker file), whose train/, test/ and ground_truth/ are replaced; `overwrite` allows any `dst`.
    """
    if kind not in DEFECTS:
        raise UserError(f"unknown --kind {kind}; choose one of {', '.join(DEFECTS)}")
    if size < 32:
        raise UserError(f"--size {size} is too small; use at least 32")
    for flag, count in (("--n_train", n_train), ("--n_test_good", n_test_good), ("--n_per_defect", n_per_defect)):
        if count < 0:
            raise UserError(f"{flag} {count}: image counts must be 0 or more")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"--dst {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / MARKER).is_file() and not overwrite:
        raise UserError(f"--dst {dst} is not empty and was not made by this script; choose an "
                        f"empty folder or pass --overwrite")
    for part in ("train", "test", "ground_truth"):
        if (dst / part).is_dir():
            shutil.rmtree(dst / part)
    jobs: List[Tuple[str, int, Optional[str], int]] = []  # (folder, split, defect, index)
    jobs += [("train/good", 0, None, i) for i in range(n_train)]
    jobs += [("test/good", 1, None, i) for i in range(n_test_good)]
    for defect in DEFECTS[kind]:
        jobs += [(f"test/{defect}", 1, defect, i) for i in range(n_per_defect)]
    counts: Dict[str, int] = {"train/good": n_train, "test/good": n_test_good}
    for defect in DEFECTS[kind]:
        counts[f"test/{defect}"] = n_per_defect
        counts[f"ground_truth/{defect}"] = n_per_defect
        (dst / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
    for folder in ("train/good", "test/good") + tuple(f"test/{d}" for d in DEFECTS[kind]):
        (dst / folder).mkdir(parents=True, exist_ok=True)
    it = jobs
    if progress:
        from tqdm import tqdm
        it = tqdm(jobs, desc=f"rendering {kind}", leave=False)
    for folder, split, defect, i in it:
        img, mask = render_image(kind, size, seed, split, defect, i)
        _save_png(img, dst / folder / f"{i:03d}.png")
        if mask is not None:
            _save_png(mask.astype(np.uint8) * 255, dst / "ground_truth" / defect / f"{i:03d}_mask.png")
    (dst / MARKER).write_text(json.dumps({
        "kind": kind, "seed": seed, "size": size, "n_train": n_train, "n_test_good": n_test_good,
        "n_per_defect": n_per_defect, "defects": list(DEFECTS[kind])}, indent=1) + "\n")
    return counts


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        description="Generate a synthetic MVTec-style category in the raw MVTec AD layout: "
                    "DST/<category>/train/good/000.png, .../test/good/000.png, "
                    ".../test/<defect>/000.png and .../ground_truth/<defect>/000_mask.png "
                    "(0/255 masks of exactly the pixels each defect changed). Kind 'capsule' is a two-tone printed capsule on a light "
                    "background (defects: crack, poke, scratch, faulty_imprint, squeeze); kind "
                    "'texture' is a woven textile (defects: cut, stain, hole, thread); kind 'pcb' "
                    "is a photo-like circuit board close-up (defects: missing_component, "
                    "solder_bridge, scratch, contamination, broken_trace). The output "
                    "is determined by --seed. About 30 s at the defaults on 2 CPU cores.",
        epilog="Example: python scripts/make_synthetic_mvtec.py --dst data && "
               "python main_train.py --data_path data/capsule_synth ...",
    )
    p.add_argument("--dst", type=Path, required=True,
                   help="output root, like the MVTec AD root: the category is written to "
                        "DST/<category> (pass that folder as --data_path)")
    p.add_argument("--category", default=None,
                   help="category folder name inside DST (default: capsule_synth for --kind "
                        "capsule, texture_synth for --kind texture, pcb_synth for --kind pcb)")
    p.add_argument("--kind", default="capsule", choices=sorted(DEFECTS),
                   help="what to draw (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; same seed, same files (default: %(default)s)")
    p.add_argument("--size", type=int, default=224,
                   help="image side in pixels, square images (default: %(default)s)")
    p.add_argument("--n_train", type=int, default=200,
                   help="normal training images (default: %(default)s)")
    p.add_argument("--n_test_good", type=int, default=40,
                   help="normal test images (default: %(default)s)")
    p.add_argument("--n_per_defect", type=int, default=15,
                   help="anomalous test images per defect type (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty DST/<category> not made by this script (its train/, "
                        "test/ and "
                        "ground_truth/ are replaced); an earlier output of this script is always "
                        "replaced")
    p.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    return p


def main(args: argparse.Namespace) -> None:
    dst = args.dst / (args.category or f"{args.kind}_synth")
    t0 = time.time()
    counts = make_category(dst, seed=args.seed, size=args.size, n_train=args.n_train,
                           n_test_good=args.n_test_good, n_per_defect=args.n_per_defect,
                           kind=args.kind, overwrite=args.overwrite, progress=True)
    images = sum(v for k, v in counts.items() if not k.startswith("ground_truth"))
    print(f"wrote {images} images ({args.kind}, {args.size}px, seed {args.seed}) to {dst} in "
          f"{time.time() - t0:.1f} s")
    for k, v in counts.items():
        print(f"  {k:28s} {v}")


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    sys.exit(run_cli(main, _args, _args.debug))
