"""`shapes`: the built-in generator of images of coloured shapes with captions and paraphrases.

Every sample is a function of (seed, split, index) only, so any sample can be made alone, in any process,
identically on every machine. A scene holds 1..max_objects objects, each a coloured shape in its own cell
of a 3x3 grid, so a caption ("a red circle at the top left and a blue square in the center") says
everything a retrieval hit needs. Objects are listed in reading order of their cells, which makes the
caption a canonical text of the scene: equal scenes have equal captions. Shape size and the exact
position inside the cell vary but are not described.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any, NamedTuple

import numpy as np

from mmkd_core.errors import MmkdError

from .base import DATASETS, BaseDataset
from .files import check_index, check_split, reject_options

log = logging.getLogger(__name__)

# Bump when anything that changes samples changes (drawing, vocabulary, templates, random draws).
GENERATOR_VERSION = "shapes-1"

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 30),
}
CELLS = (
    "top left", "top center", "top right",
    "center left", "center", "center right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip
# The paraphrases' own words for the cells, so a paraphrase shares content, not phrasing, with the caption.
CELLS_ALT = (
    "upper left corner", "middle of the top edge", "upper right corner",
    "middle of the left edge", "middle", "middle of the right edge",
    "lower left corner", "middle of the bottom edge", "lower right corner",
)  # fmt: skip
SPLIT_IDS = {"train": 0, "test": 1, "val": 2}
BACKGROUND = (28, 28, 32)
SUPERSAMPLE = 4


class SceneObject(NamedTuple):
    """One object of a scene: names from SHAPES, COLOURS and CELLS."""

    shape: str
    colour: str
    cell: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _at(cell: str) -> str:
    return "in the center" if cell == "center" else f"at the {cell}"


def caption(scene: list[SceneObject]) -> str:
    """The canonical caption of a scene."""
    return _join([f"{_article(o.colour)} {o.colour} {o.shape} {_at(o.cell)}" for o in scene])


def _alt(o: SceneObject) -> str:
    return CELLS_ALT[CELLS.index(o.cell)]


def _para_list(scene: list[SceneObject]) -> str:
    return "; ".join(f"{o.cell}: {o.colour} {o.shape}" for o in scene)


def _para_there(scene: list[SceneObject]) -> str:
    verb = "is" if len(scene) == 1 else "are"
    return f"there {verb} " + _join([f"{_article(o.colour)} {o.colour} {o.shape} in the {_alt(o)}" for o in scene])


def _para_shows(scene: list[SceneObject]) -> str:
    return "the picture shows " + _join(
        [f"{_article(o.shape)} {o.shape} in {o.colour} in the {_alt(o)}" for o in scene]
    )


PARAPHRASES = (_para_list, _para_there, _para_shows)


def _rot90(x: float, y: float, k: int) -> tuple[float, float]:
    for _ in range(k):
        x, y = -y, x
    return x, y


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        angles, radii = [-90, 30, 150], [r] * 3
    elif shape == "star":
        angles = [-90 + 36 * k for k in range(10)]
        radii = [r if k % 2 == 0 else 0.42 * r for k in range(10)]
    else:  # cross
        a, b = 0.32 * r, r
        quarter = [(-a, -b), (a, -b), (a, -a)]  # one arm's outline, rotated four times
        pts = [p for k in range(4) for p in (_rot90(x, y, k) for x, y in quarter)]
        return [(cx + x, cy + y) for x, y in pts]
    return [
        (cx + rad * math.cos(math.radians(t)), cy + rad * math.sin(math.radians(t)))
        for t, rad in zip(angles, radii, strict=True)
    ]


class ShapesDataset(BaseDataset):
    """Generated images of coloured shapes on a 3x3 grid, with a caption and a paraphrase each.

    Args:
        split: "train", "test" or "val" ("validation" too); each split draws from its own seed stream.
        count: Number of samples.
        seed: Base seed.
        resolution: Image side in pixels.
        min_objects: Fewest objects per image.
        max_objects: Most objects per image (at most 9, one per cell).
    """

    name = "shapes"
    modality = "image_text"

    def __init__(
        self,
        split: str = "train",
        count: int = 10000,
        seed: int = 0,
        resolution: int = 64,
        min_objects: int = 1,
        max_objects: int = 2,
    ) -> None:
        self.split = check_split(self.name, split, tuple(SPLIT_IDS))
        ints = {"count": count, "seed": seed, "resolution": resolution}
        for opt, value in {**ints, "min_objects": min_objects, "max_objects": max_objects}.items():
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise MmkdError(f"dataset 'shapes': option {opt} must be an integer, got {value!r}")
        if count < 1 or seed < 0:
            raise MmkdError(f"dataset 'shapes': need count >= 1 and seed >= 0, got {count}, {seed}")
        if resolution < 12:
            raise MmkdError(f"dataset 'shapes': resolution must be at least 12, got {resolution}")
        if not 1 <= min_objects <= max_objects <= len(CELLS):
            raise MmkdError(
                f"dataset 'shapes': need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}"
            )
        self.count, self.seed, self.resolution = int(count), int(seed), int(resolution)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.classes = list(SHAPES)

    def __len__(self) -> int:
        return self.count

    def options(self) -> dict[str, Any]:
        """The generator's options, as given to the factory."""
        return {
            "count": self.count,
            "seed": self.seed,
            "resolution": self.resolution,
            "min_objects": self.min_objects,
            "max_objects": self.max_objects,
        }

    def _draw(self, i: int) -> tuple[list[SceneObject], int, np.random.Generator]:
        """Sample i's scene, paraphrase template and the generator positioned for the rendering draws."""
        i = check_index(self.name, i, self.count)
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], i])
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        cells = np.sort(rng.choice(len(CELLS), size=n, replace=False))
        shapes = rng.integers(len(SHAPES), size=n)
        colours = rng.integers(len(COLOURS), size=n)
        names = list(COLOURS)
        scene = [SceneObject(SHAPES[s], names[c], CELLS[k]) for k, s, c in zip(cells, shapes, colours, strict=True)]
        template = int(rng.integers(len(PARAPHRASES)))
        return scene, template, rng

    def scene(self, i: int) -> list[SceneObject]:
        """Sample i's objects as (shape, colour, cell) tuples in reading order of the cells."""
        return self._draw(i)[0]

    def text(self, i: int) -> str:
        """Sample i's caption, e.g. "a red circle at the top left and a blue square in the center"."""
        return caption(self.scene(i))

    def paraphrase(self, i: int) -> str:
        """The same content as ``text(i)`` in another template and other words for the positions."""
        scene, template, _ = self._draw(i)
        return PARAPHRASES[template](scene)

    def label(self, i: int) -> int:
        """Index in ``classes`` of the shape of the first object (in reading order)."""
        return SHAPES.index(self.scene(i)[0].shape)

    def image(self, i: int):
        """Sample i's image: RGB, ``resolution`` pixels square, drawn 4x larger and box-downsampled."""
        from PIL import Image, ImageDraw

        scene, _, rng = self._draw(i)
        side = self.resolution * SUPERSAMPLE
        cell = side / 3
        img = Image.new("RGB", (side, side), BACKGROUND)
        draw = ImageDraw.Draw(img)
        radii = rng.uniform(0.26, 0.42, size=len(scene)) * cell
        offsets = rng.uniform(-1.0, 1.0, size=(len(scene), 2))
        for obj, r, off in zip(scene, radii, offsets, strict=True):
            k = CELLS.index(obj.cell)
            slack = 0.5 * cell - r  # keeps the shape inside its cell
            cx = (k % 3 + 0.5) * cell + off[0] * slack
            cy = (k // 3 + 0.5) * cell + off[1] * slack
            colour = COLOURS[obj.colour]
            if obj.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            else:
                draw.polygon(_polygon(obj.shape, cx, cy, r), fill=colour)
        return img.reduce(SUPERSAMPLE)

    def fingerprint(self) -> str:
        """sha256 of the generator version, split and options (the samples are a function of these)."""
        key = {"generator": GENERATOR_VERSION, "split": self.split, **self.options()}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "generator": GENERATOR_VERSION, "options": self.options()}


@DATASETS.register("shapes")
def shapes(root: str | None = None, split: str = "train", **options: Any) -> ShapesDataset:
    """The built-in shapes generator; ``root`` is ignored. Options: see ShapesDataset."""
    known = {"count", "seed", "resolution", "min_objects", "max_objects"}
    reject_options("shapes", {k: v for k, v in options.items() if k not in known})
    return ShapesDataset(split=split, **options)
