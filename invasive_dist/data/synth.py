"""A synthetic stand-in for the Kaggle Invasive Species Monitoring data, in exactly its layout.

    root/train/<name>.jpg           names 1..n_train, baseline RGB JPEG, 4:4:4 like the real files
    root/test/<name>.jpg            names 1..n_test
    root/train_labels.csv           name,invasive  (CRLF line endings, as published)
    root/sample_submission.csv      name,invasive  (every value 0.5, LF like the published full file)
    root/test_labels_hidden.csv     name,invasive  (the test labels, to score a submission)
    root/synth.json                 the parameters (marks the folder as synthetic; see below)

    from invasive_dist.data.synth import synthesize
    summary = synthesize(Path("data/synthetic"), n_train=300, n_test=100, size=(384, 288), workers=2)

or ``invasive-dist synth --out data/synthetic``.

Images are foliage: a blurred low-frequency green background (sometimes with pale sky at the top),
grass blades, brown branches, leaves of varied greens. Label-1 images add 1-4 hydrangea-like flower
heads: a dark dome covered in small four-petal florets of one light blue / blue-violet / pink-purple
shade, radius 8-18 % of the shorter side (10-23 px when the image is scaled to 128 px), some partly
hidden behind leaves. Distractors appear in both classes with the same probability, so only the
flower heads carry the label: white/yellow small flowers, flat white umbels, orange flower spikes,
brown soil patches, sky.

``difficulty="hard"`` (``synth --difficulty hard``) is closer to the real photos' problem, where a
recipe's choices show in the AUC: 1-2 smaller heads (radius 6-12 % of the shorter side, 8-15 px
when a 4:3 image is scaled to 128 px), washed 10-30 % towards the foliage, a third of them near the
left or right edge, each partly hidden by 1-3 leaves; in both classes, with the same probabilities,
look-alikes: violet and lilac
blossom clusters of round florets (no four-petal structure), white-green domes of four-petal
florets (an unripe head, the wrong colour), violet-tinted foliage; and a harsher camera: wider
exposure and white-balance range, defocus blur on a third of the images, JPEG quality 35-95 per
image. The default ``"easy"`` level is the drawing above, unchanged.

Determinism: each image is drawn from ``np.random.default_rng([seed, split, name])`` and the labels
from ``[seed, split, 0]`` (names start at 1), so a seed gives byte-identical files whatever
``workers`` is (with the same Pillow/libjpeg build).

Safety: every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written JPEG under its final name. Running again with the same parameters keeps the images
already written and finishes the rest. A non-empty folder without ``synth.json`` is refused, so real
data is never overwritten.

Cost (CPU only, measured on this project's 2-core dev machine): about 35 ms per 384x288 image, so
300 images take about 6 s with workers=2 on idle cores; about 0.19 s per 1154x866 image, so the
full-size 3,826-image set takes about 12 minutes on one core, 6 with workers=2.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UserError
from ..files import is_temp, write_bytes
from ..progress import track

SPLITS = {"train": 1, "test": 2}  # part of every image's seed, so train/5 and test/5 differ
_LABEL_STREAM = 0  # rng entropy [seed, split, 0] draws the labels; image names start at 1
MANIFEST = "synth.json"
FLOWER_PLACES = ("anywhere", "edges")  # where flower heads go (synthesize's ``flowers``)
DIFFICULTIES = ("easy", "hard")  # synthesize's ``difficulty``; see the module docstring
FORMAT_VERSION = 1  # bump when the drawing changes, so an old folder is regenerated, not resumed

# Flower-head base colours (RGB): light blue, blue, blue-violet, violet, lilac, pink-purple.
HYDRANGEA_COLOURS = np.array(
    [(150, 185, 240), (110, 140, 228), (135, 118, 218), (165, 122, 208), (190, 165, 235), (208, 132, 198)],
    dtype=np.float32,
)


@dataclass
class SynthSummary:
    out: Path
    n_train: int
    n_test: int
    n_train_positive: int
    n_test_positive: int
    size: tuple[int, int]  # (width, height)
    seed: int
    n_written: int  # images encoded by this call (the others were kept from an interrupted run)
    seconds: float

    def format(self) -> str:
        w, h = self.size
        return (
            f"wrote synthetic data set to {self.out}: {self.n_train} train images "
            f"({self.n_train_positive} invasive, {self.n_train - self.n_train_positive} not), "
            f"{self.n_test} test images ({self.n_test_positive} invasive, labels in test_labels_hidden.csv), "
            f"{w}x{h}, seed {self.seed}; {self.n_written} images encoded in {self.seconds:.1f} s"
        )


# ----------------------------------------------------------------------------------------------
# Drawing. Sizes are fractions of the shorter side ``s`` so an image looks the same at any size.


def _leaf_polygons(
    cx: np.ndarray, cy: np.ndarray, length: np.ndarray, width: np.ndarray, angle: np.ndarray, k: int = 14
) -> np.ndarray:
    """(n, 2k) flat polygon coordinates of pointed leaves (a lens shape), rotated by ``angle``."""
    t = np.linspace(0.0, 2.0 * np.pi, k, endpoint=False)
    x = length[:, None] * np.cos(t)
    y = width[:, None] * np.sin(t) * np.sqrt(1.0 - np.abs(np.cos(t)) * 0.85)
    ca, sa = np.cos(angle)[:, None], np.sin(angle)[:, None]
    xr = cx[:, None] + x * ca - y * sa
    yr = cy[:, None] + x * sa + y * ca
    return np.stack([xr, yr], axis=-1).reshape(len(cx), -1)


def _greens(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) leaf colours: mostly greens, some yellow-green, some in shade."""
    g = rng.uniform(70, 190, n)
    r = g * rng.uniform(0.3, 0.75, n)
    r = np.where(rng.random(n) < 0.12, g * rng.uniform(0.75, 0.95, n), r)  # yellow-green
    b = g * rng.uniform(0.12, 0.45, n)
    shade = rng.uniform(0.45, 1.1, n)
    return np.clip(np.stack([r, g, b], axis=1) * shade[:, None], 0, 255)


def _smooth_field(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """(h, w) float32 smooth noise in about [0, 1]: a coarse random grid upsampled bicubically."""
    cw = max(2, cells)
    ch = max(2, round(cells * h / w))
    small = rng.random((ch, cw), dtype=np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _fill(c: np.ndarray) -> tuple[int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]))


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Out-of-focus canopy: drawn at a quarter of the size (it is blurred anyway), then upscaled."""
    sw, sh = max(8, w // 4), max(8, h // 4)
    f = (
        0.5 * _smooth_field(rng, sw, sh, 4)
        + 0.3 * _smooth_field(rng, sw, sh, 12)
        + 0.2 * _smooth_field(rng, sw, sh, 40)
    )
    f = np.clip(f, 0.0, 1.0)[..., None]
    dark = np.array([14, 30, 10], np.float32) * rng.uniform(0.7, 1.3)
    mid = np.array([55, 96, 36], np.float32) * rng.uniform(0.8, 1.2)
    light = np.array([125, 150, 72], np.float32) * rng.uniform(0.8, 1.15)
    img = np.where(f < 0.5, dark + (mid - dark) * (f / 0.5), mid + (light - mid) * ((f - 0.5) / 0.5))
    if rng.random() < 0.35:  # pale sky behind the canopy, in both classes (a blue-ish distractor)
        edge = sh * rng.uniform(0.08, 0.3) + sh * 0.12 * (_smooth_field(rng, sw, 1, 10)[0] - 0.5)
        rows = np.arange(sh, dtype=np.float32)[:, None]
        sky = (rows < edge[None, :])[..., None]
        sky_colour = np.array(
            [rng.uniform(195, 235), rng.uniform(212, 240), rng.uniform(228, 252)], np.float32
        )
        img = np.where(sky, sky_colour - 25 * f, img)
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    small = small.filter(ImageFilter.GaussianBlur(radius=min(sw, sh) * rng.uniform(0.004, 0.012)))
    return small.resize((w, h), Image.Resampling.BICUBIC)


def _grass(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: int) -> None:
    n = int(rng.integers(40, 160))
    x0 = rng.uniform(0, w, n)
    y0 = rng.uniform(0.45 * h, 1.05 * h, n)
    length = s * rng.uniform(0.08, 0.35, n)
    lean = rng.normal(0, 0.35, n)
    colours = _greens(rng, n) * 1.15
    widths = np.maximum(1, s * rng.uniform(0.002, 0.007, n)).astype(int)
    for i in range(n):
        mx, my = x0[i] + lean[i] * length[i] * 0.4, y0[i] - length[i] * 0.55
        tx, ty = x0[i] + lean[i] * length[i], y0[i] - length[i]
        draw.line(
            [(x0[i], y0[i]), (mx, my), (tx, ty)],
            fill=_fill(np.clip(colours[i], 0, 255)),
            width=int(widths[i]),
        )


def _branches(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: int) -> None:
    for _ in range(int(rng.integers(2, 9))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        angle = rng.uniform(0, 2 * np.pi)
        pts = [(x, y)]
        for _ in range(int(rng.integers(2, 5))):
            step = s * rng.uniform(0.05, 0.2)
            angle += rng.normal(0, 0.35)
            x, y = x + step * np.cos(angle), y + step * np.sin(angle)
            pts.append((x, y))
        brown = np.array([rng.uniform(60, 120), rng.uniform(40, 80), rng.uniform(20, 45)])
        draw.line(pts, fill=_fill(brown), width=max(1, int(s * rng.uniform(0.004, 0.014))), joint="curve")


def _soil(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: int) -> None:
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, w), rng.uniform(0.3 * h, h)
        base = np.array([rng.uniform(75, 120), rng.uniform(58, 90), rng.uniform(35, 58)])
        for _ in range(int(rng.integers(4, 10))):
            r = s * rng.uniform(0.03, 0.09)
            x, y = cx + rng.normal(0, s * 0.06), cy + rng.normal(0, s * 0.03)
            c = np.clip(base * rng.uniform(0.75, 1.15), 0, 255)
            draw.ellipse([x - r, y - 0.6 * r, x + r, y + 0.6 * r], fill=_fill(c))


def _leaves(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: int, n: int) -> None:
    cx, cy = rng.uniform(-0.05 * w, 1.05 * w, n), rng.uniform(-0.05 * h, 1.05 * h, n)
    length = s * rng.uniform(0.02, 0.075, n)
    width = length * rng.uniform(0.28, 0.55, n)
    angle = rng.uniform(0, np.pi, n)
    polys = _leaf_polygons(cx, cy, length, width, angle)
    colours = _greens(rng, n)
    rib = rng.random(n) < 0.4
    for i in range(n):
        draw.polygon(polys[i].tolist(), fill=_fill(colours[i]))
        if rib[i] and length[i] > 6:  # a darker midrib on some leaves
            dx, dy = np.cos(angle[i]) * length[i] * 0.85, np.sin(angle[i]) * length[i] * 0.85
            draw.line(
                [(cx[i] - dx, cy[i] - dy), (cx[i] + dx, cy[i] + dy)], fill=_fill(colours[i] * 0.65), width=1
            )


def _small_flowers(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: int) -> None:
    """Distractors in both classes: scattered five-petal white/cream/yellow flowers."""
    n = int(rng.integers(5, 40))
    groups = rng.uniform((0, 0), (w, h), (int(rng.integers(1, 4)), 2))
    centres = groups[rng.integers(0, len(groups), n)] + rng.normal(0, s * 0.12, (n, 2))
    palette = np.array([(240, 240, 235), (250, 245, 215), (245, 225, 90), (235, 235, 250)], np.float32)
    for x, y in centres:
        r = s * rng.uniform(0.006, 0.016)
        petal = np.clip(palette[rng.integers(0, len(palette))] * rng.uniform(0.8, 1.05), 0, 255)
        phase = rng.uniform(0, 2 * np.pi)
        for k in range(5):
            a = phase + k * 2 * np.pi / 5
            px, py = x + 0.9 * r * np.cos(a), y + 0.9 * r * np.sin(a)
            draw.ellipse([px - 0.6 * r, py - 0.6 * r, px + 0.6 * r, py + 0.6 * r], fill=_fill(petal))
        draw.ellipse([x - 0.4 * r, y - 0.4 * r, x + 0.4 * r, y + 0.4 * r], fill=(235, 180, 40))


def _umbels(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: int) -> None:
    """Distractors in both classes: flat white clusters of tiny dots (yarrow-like), smaller than
    a flower head and without florets."""
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = s * rng.uniform(0.03, 0.06)
        n = int(rng.integers(25, 60))
        rad = r * np.sqrt(rng.random(n))
        phi = rng.uniform(0, 2 * np.pi, n)
        dot = max(1.0, s * 0.004)
        for x, y in zip(cx + rad * np.cos(phi), cy + 0.45 * rad * np.sin(phi)):
            c = rng.uniform(215, 250)
            draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=(int(c), int(c), int(c * 0.95)))


def _orange_spikes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: int) -> None:
    """Distractors in both classes: arching sprays of small orange flowers (crocosmia-like)."""
    for _ in range(int(rng.integers(1, 4))):
        x, y = rng.uniform(0, w), rng.uniform(0.4 * h, h)
        angle = rng.uniform(-np.pi, 0)
        for _ in range(int(rng.integers(5, 12))):
            r = s * rng.uniform(0.006, 0.012)
            c = (int(rng.uniform(210, 250)), int(rng.uniform(90, 140)), int(rng.uniform(30, 70)))
            draw.ellipse([x - r, y - 0.6 * r, x + r, y + 0.6 * r], fill=c)
            angle += rng.normal(0, 0.15)
            x, y = x + 2.2 * r * np.cos(angle), y + 2.2 * r * np.sin(angle)


# flowers="edges": head centres in the outer EDGE_BAND of the width, left or right. A 4:3 image
# resized and centre-cropped to a square keeps the middle 3/4 x 0.875 = 66 % of the width, so its
# centre crop starts 17 % in from each side: a head centred 2-12 % in is at most half visible there.
EDGE_BAND = (0.02, 0.12)


def _flower_head(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    w: int,
    h: int,
    s: int,
    edges: bool = False,
    hard: bool = False,
    palette: np.ndarray = HYDRANGEA_COLOURS,
) -> tuple[float, float, float]:
    """One hydrangea-like head: a shadowed dome covered with four-petal florets of one shade;
    ``edges``: centred near the left or right edge (``EDGE_BAND``); ``hard``: smaller and
    desaturated towards the foliage. ``palette``: the shades to draw from (a look-alike passes
    others). Returns (cx, cy, radius)."""
    big_r = s * (rng.uniform(0.06, 0.12) if hard else rng.uniform(0.08, 0.18))
    cx, cy = rng.uniform(0.08 * w, 0.92 * w), rng.uniform(0.08 * h, 0.92 * h)
    if edges:
        cx = w * rng.uniform(*EDGE_BAND)
        if rng.random() < 0.5:
            cx = w - cx
    squash = rng.uniform(0.78, 1.0)
    base = palette[rng.integers(0, len(palette))] * rng.uniform(0.88, 1.08, 3)
    if hard:  # washed towards the foliage: seen through haze, in shade, past its best
        mix = rng.uniform(0.1, 0.3)
        base = (1 - mix) * base + mix * np.array([95, 120, 80], np.float32)
    draw.ellipse(
        [cx - 0.95 * big_r, cy - 0.95 * big_r * squash, cx + 0.95 * big_r, cy + 0.95 * big_r * squash],
        fill=_fill(0.35 * base + 0.65 * np.array([20, 45, 18])),
    )
    floret_r = big_r * rng.uniform(0.11, 0.16)
    n = int(2.3 * (big_r / floret_r) ** 2)
    rad = big_r * 0.92 * np.sqrt(rng.random(n))
    phi = rng.uniform(0, 2 * np.pi, n)
    xs, ys = cx + rad * np.cos(phi), cy + squash * rad * np.sin(phi)
    # Light from the upper left on a dome: darker to the lower right and towards the rim.
    light = 1.05 - 0.22 * ((xs - cx) + 1.4 * (ys - cy)) / big_r - 0.25 * (rad / big_r) ** 2
    colours = np.clip(base * np.clip(light, 0.5, 1.2)[:, None] + rng.normal(0, 10, (n, 3)), 0, 255)
    order = np.argsort(ys)  # back (top) to front (bottom)
    rot = rng.uniform(0, np.pi / 2, n)
    pr = floret_r * 0.55
    for i in order:
        x, y, c = xs[i], ys[i], _fill(colours[i])
        for k in range(4):
            a = rot[i] + k * np.pi / 2
            px, py = x + 0.55 * floret_r * np.cos(a), y + 0.55 * floret_r * np.sin(a)
            draw.ellipse([px - pr, py - pr, px + pr, py + pr], fill=c)
        e = max(0.5, floret_r * 0.14)
        draw.ellipse([x - e, y - e, x + e, y + e], fill=_fill(np.clip(colours[i] * 1.2 + 25, 0, 255)))
    return cx, cy, big_r


# Hard level's look-alikes (both classes): lilac/violet/blue blossom shades, and the white-green
# of an unripe head.
LOOKALIKE_BLOSSOMS = np.array(
    [(170, 140, 215), (140, 120, 205), (185, 160, 230), (120, 135, 215), (200, 150, 210)], dtype=np.float32
)
UNRIPE_HEADS = np.array([(205, 225, 170), (225, 235, 205), (180, 210, 150)], dtype=np.float32)


def _blossom_clusters(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: int) -> None:
    """Hard level, both classes: violet/lilac clusters of round florets (lavender, clover, asters):
    the hydrangea's colours without its four-petal florets on a dome."""
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = s * rng.uniform(0.025, 0.07)
        n = int(rng.integers(12, 40))
        rad = r * np.sqrt(rng.random(n))
        phi = rng.uniform(0, 2 * np.pi, n)
        base = LOOKALIKE_BLOSSOMS[rng.integers(0, len(LOOKALIKE_BLOSSOMS))]
        dot = max(1.0, r * rng.uniform(0.12, 0.2))
        for x, y in zip(cx + rad * np.cos(phi), cy + rad * np.sin(phi) * rng.uniform(0.6, 1.6)):
            c = np.clip(base * rng.uniform(0.7, 1.1), 0, 255)
            draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=_fill(c))


def _violet_foliage(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, s: int) -> None:
    """Hard level, both classes: leaves tinted violet (purple-leaved shrubs, a magenta cast)."""
    n = int(rng.integers(10, 40))
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    length = s * rng.uniform(0.02, 0.06, n)
    polys = _leaf_polygons(cx, cy, length, length * rng.uniform(0.3, 0.55, n), rng.uniform(0, np.pi, n))
    tint = np.stack([rng.uniform(80, 150, n), rng.uniform(50, 95, n), rng.uniform(95, 165, n)], axis=1)
    for i in range(n):
        draw.polygon(polys[i].tolist(), fill=_fill(tint[i]))


def _occlude(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, head: tuple[float, float, float], s: int
) -> None:
    """Hard level: leaves drawn over a flower head, hiding part of it."""
    cx, cy, r = head
    n = int(rng.integers(1, 4))
    phi = rng.uniform(0, 2 * np.pi, n)
    dist = r * rng.uniform(0.6, 1.2, n)
    length = r * rng.uniform(0.4, 0.8, n)
    polys = _leaf_polygons(
        cx + dist * np.cos(phi),
        cy + dist * np.sin(phi),
        length,
        length * rng.uniform(0.3, 0.55, n),
        rng.uniform(0, np.pi, n),
    )
    colours = _greens(rng, n)
    for i in range(n):
        draw.polygon(polys[i].tolist(), fill=_fill(colours[i]))


def render_image(
    rng: np.random.Generator,
    size: tuple[int, int],
    invasive: bool,
    flowers: str = "anywhere",
    difficulty: str = "easy",
) -> Image.Image:
    """One synthetic photo, drawn from ``rng`` (width, height); flower heads iff ``invasive``,
    anywhere or (``flowers="edges"``) near the left and right edges; ``difficulty``: see the
    module docstring."""
    if difficulty == "hard":
        return _render_hard(rng, size, invasive)
    w, h = size
    s = min(w, h)
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    _grass(draw, rng, w, h, s)
    if rng.random() < 0.35:
        _soil(draw, rng, w, h, s)
    _branches(draw, rng, w, h, s)
    _leaves(draw, rng, w, h, s, int(rng.integers(220, 420)))
    # The distractors are decided by the same draws in both classes.
    if rng.random() < 0.6:
        _small_flowers(draw, rng, w, h, s)
    if rng.random() < 0.3:
        _umbels(draw, rng, w, h, s)
    if rng.random() < 0.2:
        _orange_spikes(draw, rng, w, h, s)
    if invasive:
        for _ in range(int(rng.integers(1, 5))):
            _flower_head(draw, rng, w, h, s, edges=flowers == "edges")
    _leaves(draw, rng, w, h, s, int(rng.integers(15, 60)))  # in front: some heads partly hidden

    # Camera: exposure, white balance, a sun gradient, sensor noise, a little softness.
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.72, 1.25) * rng.uniform(0.93, 1.07, 3)
    gx, gy = rng.normal(0, 1, 2)
    ramp = (
        np.linspace(-1, 1, w, dtype=np.float32)[None, :] * gx
        + np.linspace(-1, 1, h, dtype=np.float32)[:, None] * gy
    ) / 2
    arr = arr * gain + (18 * ramp)[..., None]
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(2, 6))
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.8) * s / 866 + 0.2))


def _render_hard(rng: np.random.Generator, size: tuple[int, int], invasive: bool) -> Image.Image:
    w, h = size
    s = min(w, h)
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    _grass(draw, rng, w, h, s)
    if rng.random() < 0.35:
        _soil(draw, rng, w, h, s)
    _branches(draw, rng, w, h, s)
    _leaves(draw, rng, w, h, s, int(rng.integers(220, 420)))
    # Distractors and look-alikes: the same draws in both classes.
    if rng.random() < 0.5:
        _violet_foliage(draw, rng, w, h, s)
    if rng.random() < 0.6:
        _small_flowers(draw, rng, w, h, s)
    if rng.random() < 0.4:
        _blossom_clusters(draw, rng, w, h, s)
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 3))):
            _flower_head(draw, rng, w, h, s, hard=True, palette=UNRIPE_HEADS)
    if rng.random() < 0.3:
        _umbels(draw, rng, w, h, s)
    if rng.random() < 0.2:
        _orange_spikes(draw, rng, w, h, s)
    if invasive:
        for _ in range(1 if rng.random() < 0.7 else 2):
            head = _flower_head(draw, rng, w, h, s, edges=rng.random() < 0.33, hard=True)
            _occlude(draw, rng, head, s)
    _leaves(draw, rng, w, h, s, int(rng.integers(15, 60)))

    # A harsher camera than the easy level's: exposure, white balance, haze, defocus, noise.
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.55, 1.35) * rng.uniform(0.86, 1.14, 3)
    gx, gy = rng.normal(0, 1, 2)
    ramp = (
        np.linspace(-1, 1, w, dtype=np.float32)[None, :] * gx
        + np.linspace(-1, 1, h, dtype=np.float32)[:, None] * gy
    ) / 2
    haze = rng.uniform(0.0, 0.25)
    arr = (arr * gain + (24 * ramp)[..., None]) * (1 - haze) + 150 * haze
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(2, 9))
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    radius = rng.uniform(0.3, 0.8) * s / 866 + 0.2
    if rng.random() < 0.33:  # out of focus
        radius += rng.uniform(1.0, 3.0) * s / 866
    return out.filter(ImageFilter.GaussianBlur(radius=radius))


def image_rng(seed: int, split: str, name: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], name])


def draw_labels(seed: int, split: str, n: int, positive_frac: float) -> np.ndarray:
    """Labels of names 1..n: exactly round(positive_frac * n) ones, in an order shuffled by seed."""
    n_pos = int(round(positive_frac * n))
    labels = np.zeros(n, dtype=np.int64)
    labels[:n_pos] = 1
    return np.random.default_rng([seed, SPLITS[split], _LABEL_STREAM]).permutation(labels)


# ----------------------------------------------------------------------------------------------
# Files.


def _csv_bytes(rows: list[tuple[int, str]], newline: str) -> bytes:
    lines = ["name,invasive"] + [f"{n},{v}" for n, v in rows]
    return (newline.join(lines) + newline).encode()


def _write_image(task: tuple[Path, str, int, int, tuple[int, int], int, int, str, str]) -> None:
    path, split, name, label, size, seed, quality, flowers, difficulty = task
    rng = image_rng(seed, split, name)
    img = render_image(rng, size, bool(label), flowers, difficulty)
    if difficulty == "hard":  # phones and trail cameras: the quality varies from shot to shot
        quality = min(quality, int(rng.integers(35, 96)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=0, progressive=False, optimize=False)
    write_bytes(path, buf.getvalue())


def _prepare(out: Path, params: dict) -> bool:
    """Make ``out`` ready; True if the images already there can be kept (same parameters)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    manifest = out / MANIFEST
    if out.is_dir() and any(out.iterdir()) and not manifest.is_file():
        raise UserError(
            f"{out} is not empty and has no {MANIFEST}, so it was not made by `invasive-dist synth`; "
            "choose a new or empty folder (synth never overwrites other data)"
        )
    try:
        old = json.loads(manifest.read_text()) if manifest.is_file() else None
    except (OSError, ValueError):
        old = None
    keep = isinstance(old, dict) and old.get("params") == params
    for split, n in (("train", params["n_train"]), ("test", params["n_test"])):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.iterdir():  # leftovers of an interrupted run, and images of an older run
            stale = not (p.stem.isdigit() and 1 <= int(p.stem) <= n and p.suffix == ".jpg")
            if is_temp(p) or (p.is_file() and (stale or not keep)):
                p.unlink()
    # The manifest goes first, so an interrupted run is recognised (and resumed) next time.
    write_bytes(manifest, json.dumps({"params": params, "complete": False}, indent=1).encode())
    return keep


def synthesize(
    out: Path,
    n_train: int = 2295,
    n_test: int = 1531,
    size: tuple[int, int] = (1154, 866),
    seed: int = 0,
    positive_frac: float = 0.63,
    quality: int = 90,
    workers: int = 1,
    flowers: str = "anywhere",
    difficulty: str = "easy",
) -> SynthSummary:
    """Write a synthetic data set in the Kaggle layout to ``out`` (see the module docstring).

    The defaults match the real competition: 2,295 train and 1,531 test images of 1154x866,
    63 % invasive. ``workers`` > 1 renders in that many processes; the files are the same.
    ``flowers="edges"`` puts every flower head near the left or right edge (``EDGE_BAND``), where a
    centre crop does not see it: the set that measures ``data.eval_geometry``.
    ``difficulty="hard"``: small, hidden, washed-out heads among look-alikes (module docstring)."""
    out = Path(out)
    w, h = (int(v) for v in size)
    problems = []
    if n_train < 2:
        problems.append(f"n_train={n_train} must be at least 2")
    if n_test < 1:
        problems.append(f"n_test={n_test} must be at least 1")
    if w < 16 or h < 16:
        problems.append(f"size={w}x{h}: width and height must be at least 16")
    if not 0.0 <= positive_frac <= 1.0:
        problems.append(f"positive_frac={positive_frac} must be in [0, 1]")
    if not 1 <= quality <= 100:
        problems.append(f"quality={quality} must be in 1..100")
    if seed < 0:
        problems.append(f"seed={seed} must be >= 0")
    if workers < 1:
        problems.append(f"workers={workers} must be >= 1")
    if flowers not in FLOWER_PLACES:
        problems.append(f"flowers={flowers!r} must be one of {', '.join(FLOWER_PLACES)}")
    if difficulty not in DIFFICULTIES:
        problems.append(f"difficulty={difficulty!r} must be one of {', '.join(DIFFICULTIES)}")
    if difficulty == "hard" and flowers != "anywhere":
        problems.append(
            "flowers=edges is an easy-level option (the hard level puts a third of its heads near the edges)"
        )
    if problems:
        raise UserError("synth: " + "; ".join(problems))

    t0 = time.perf_counter()
    params = {
        "version": FORMAT_VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "size": [w, h],
        "seed": seed,
        "positive_frac": positive_frac,
        "quality": quality,
    }
    if flowers != "anywhere":
        params["flowers"] = flowers  # only then: the default's manifest is what it always was
    if difficulty != "easy":
        params["difficulty"] = difficulty
    keep = _prepare(out, params)
    labels = {
        split: draw_labels(seed, split, n, positive_frac)
        for split, n in (("train", n_train), ("test", n_test))
    }
    tasks = []
    for split, split_labels in labels.items():
        for name, label in enumerate(split_labels.tolist(), start=1):
            path = out / split / f"{name}.jpg"
            if not (keep and path.is_file()):
                tasks.append((path, split, name, label, (w, h), seed, quality, flowers, difficulty))
    if workers > 1 and len(tasks) > 1:
        # fork where it exists: spawn would re-import torch (via invasive_dist.data) in every worker.
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(min(workers, len(tasks))) as pool:
            for _ in track(pool.imap_unordered(_write_image, tasks, chunksize=4), "synth", len(tasks), "img"):
                pass
    else:
        for task in track(tasks, "synth", len(tasks), "img"):
            _write_image(task)

    names = {split: range(1, len(v) + 1) for split, v in labels.items()}
    train_rows = list(zip(names["train"], labels["train"].tolist()))
    write_bytes(out / "train_labels.csv", _csv_bytes(train_rows, "\r\n"))
    write_bytes(out / "sample_submission.csv", _csv_bytes([(n, "0.5") for n in names["test"]], "\n"))
    test_rows = list(zip(names["test"], labels["test"].tolist()))
    write_bytes(out / "test_labels_hidden.csv", _csv_bytes(test_rows, "\r\n"))
    write_bytes(out / MANIFEST, json.dumps({"params": params, "complete": True}, indent=1).encode())
    return SynthSummary(
        out=out,
        n_train=n_train,
        n_test=n_test,
        n_train_positive=int(labels["train"].sum()),
        n_test_positive=int(labels["test"].sum()),
        size=(w, h),
        seed=seed,
        n_written=len(tasks),
        seconds=time.perf_counter() - t0,
    )
