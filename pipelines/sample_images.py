"""The synthetic sample's pictures: coloured shapes on plain backgrounds, drawn from a seeded scene, and the
captions that describe them (:mod:`pipelines.sample` builds docs, queries and qrels on top)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

Pair = tuple[str, str]  # (color, shape)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
    "purple": (130, 50, 170),
    "orange": (245, 130, 20),
    "pink": (240, 110, 180),
    "cyan": (30, 200, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")


def article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def phrase(pairs: Sequence[Pair], articles: bool = True) -> str:
    items = [f"{article(c)} {c} {s}" if articles else f"{c} {s}" for c, s in pairs]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption(pairs: Sequence[Pair], background: str) -> str:
    return f"{phrase(pairs)} on {article(background)} {background} background"


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - 0.866 * r, cy + 0.5 * r), (cx + 0.866 * r, cy + 0.5 * r)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            ang = -np.pi / 2 + i * np.pi / 5
            pts.append((round(cx + rad * np.cos(ang), 2), round(cy + rad * np.sin(ang), 2)))
        return pts
    raise ValueError(shape)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill: Any) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "cross":
        t = max(1, round(0.35 * r))
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        draw.polygon(shape_points(shape, cx, cy, r), fill=fill)


@dataclass(frozen=True)
class Scene:
    pairs: tuple[Pair, ...]  # drawing order, distinct
    background: str
    boxes: tuple[tuple[int, int, int], ...]  # (cx, cy, r) per pair

    @property
    def caption(self) -> str:
        return caption(self.pairs, self.background)


def random_scene(rng: np.random.Generator, size: tuple[int, int]) -> Scene:
    """1-3 distinct (color, shape) pairs, each in its own cell of a 2x2 grid so none is hidden."""
    colors = list(COLORS)
    k = int(rng.integers(1, 4))
    pairs: list[Pair] = []
    while len(pairs) < k:
        p = (colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))])
        if p not in pairs:
            pairs.append(p)
    return place(rng, size, pairs)


def place(rng: np.random.Generator, size: tuple[int, int], pairs: Sequence[Pair]) -> Scene:
    """A seeded background and one 2x2-grid cell per pair (at most 4 pairs)."""
    w, h = size
    backgrounds = list(BACKGROUNDS)
    k = len(pairs)
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    cells = rng.permutation(4)[:k]
    cw, ch = w / 2, h / 2
    boxes = []
    for cell in cells:
        x0, y0 = (int(cell) % 2) * cw, (int(cell) // 2) * ch
        r = max(2, int(rng.uniform(0.30, 0.46) * min(cw, ch)))
        cx = int(x0 + rng.uniform(r, max(r, cw - r)))
        cy = int(y0 + rng.uniform(r, max(r, ch - r)))
        boxes.append((cx, cy, r))
    return Scene(tuple(pairs), background, tuple(boxes))


def render(scene: Scene, size: tuple[int, int], palette: dict[str, Any] | None = None) -> Image.Image:
    pal: dict[str, Any] = dict(palette or {**COLORS, **BACKGROUNDS})
    img = Image.new("RGB", size, pal[scene.background])
    draw = ImageDraw.Draw(img)
    for (color, shape), (cx, cy, r) in zip(scene.pairs, scene.boxes, strict=True):
        draw_shape(draw, shape, cx, cy, r, pal[color])
    return img


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        kw.setdefault("quality", 90)
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()
