"""Scenes of the synthetic task: sampling shapes on the grid and drawing them."""
from __future__ import annotations

import base64
import io
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from PIL import Image, ImageDraw

from mue_fairseq.metrics.synthetic_content import COLOR_WORDS, GRID, HOLLOW, SHAPES, SIZES

if TYPE_CHECKING:
    from data_utils.synthetic.config import SyntheticTaskConfig

COLORS = dict(zip(COLOR_WORDS, (
    (214, 39, 40),
    (44, 160, 44),
    (31, 90, 220),
    (235, 200, 20),
    (140, 60, 180),
    (245, 125, 15),
)))
OUTLINE_COLOR = (45, 45, 45)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: Optional[str]  # None = hollow
    size: str
    row: int
    col: int
    cx: float
    cy: float

    @property
    def color_word(self) -> str:
        return self.color if self.color is not None else HOLLOW


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    clutter: int  # clutter level index
    background: tuple[int, int, int]
    clutter_marks: tuple[tuple, ...]

    def by_shape(self, shape: str) -> Optional[SceneObject]:
        for obj in self.objects:
            if obj.shape == shape:
                return obj
        return None


def sample_scene(rng: random.Random, cfg: SyntheticTaskConfig) -> Scene:
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample(range(GRID * GRID), n)
    cell = cfg.image_size / GRID
    objects = []
    for shape, c in zip(shapes, cells):
        row, col = divmod(c, GRID)
        size = rng.choice(SIZES)
        radius = _radius(size, cell)
        slack = max(0.0, cell / 2 - radius - 2)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        color = None if rng.random() < cfg.hollow_prob else rng.choice(sorted(COLORS))
        objects.append(SceneObject(shape, color, size, row, col, round(cx, 2), round(cy, 2)))
    clutter = rng.randrange(len(cfg.clutter_levels))
    background = tuple(rng.randint(232, 255) for _ in range(3))
    marks = []
    for _ in range(cfg.clutter_levels[clutter]):
        gray = rng.randint(140, 200)
        x, y = rng.uniform(0, cfg.image_size), rng.uniform(0, cfg.image_size)
        if rng.random() < 0.5:
            marks.append(("dot", round(x, 1), round(y, 1), gray))
        else:
            angle = rng.uniform(0, math.pi)
            length = rng.uniform(3, 7)
            marks.append(
                ("line", round(x, 1), round(y, 1), round(x + length * math.cos(angle), 1),
                 round(y + length * math.sin(angle), 1), gray)
            )
    objects.sort(key=lambda o: (o.col, o.row))
    return Scene(tuple(objects), clutter, background, tuple(marks))


def _radius(size: str, cell: float) -> float:
    return cell * (0.38 if size == "large" else 0.2)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":
        points = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return points
    if shape == "cross":
        a = r * 0.33
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene as an RGB image."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for mark in scene.clutter_marks:
        if mark[0] == "dot":
            _, x, y, g = mark
            draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(g, g, g))
        else:
            _, x0, y0, x1, y1, g = mark
            draw.line((x0, y0, x1, y1), fill=(g, g, g), width=1)
    cell = image_size / GRID
    for obj in scene.objects:
        r = _radius(obj.size, cell)
        fill = COLORS[obj.color] if obj.color is not None else None
        outline = None if fill is not None else OUTLINE_COLOR
        width = 0 if fill is not None else 2
        if obj.shape == "circle":
            draw.ellipse((obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r), fill=fill, outline=outline, width=width)
        else:
            points = _shape_polygon(obj.shape, obj.cx, obj.cy, r)
            if fill is not None:
                draw.polygon(points, fill=fill)
            else:
                draw.line(points + [points[0]], fill=outline, width=width, joint="curve")
    return image


def image_to_base64(image: Image.Image) -> str:
    """PNG bytes in standard base64, the encoding OFA's TSVs use."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")
