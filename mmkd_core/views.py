"""Views: augmentation parameters drawn at extraction time and replayed exactly by the loader.

A view is a crop box in the source image's pixel coordinates plus a horizontal flip, resized to the
teacher's input size in one PIL call. Parameters per view (P = 5): ``top, left, height, width, flip``.
View 0 is the deterministic eval transform: the centred square of side ``crop_pct`` of the shorter side
(the crop that "resize to size/crop_pct, centre-crop size" takes, done as one resample). Views 1..K-1 are
random resized crops (torchvision's sampling rule) with a random flip, drawn from a generator seeded by
(seed, sample index, view), so they do not depend on batching, workers or resumption.

Each view's teacher input is checksummed at extraction (``view_checksum``, rule ``CHECKSUM_RULE``): the
normalised tensor is mapped back to the 8-bit pixel grid it was rendered on and hashed. Rendering goes
through uint8, so the mapping is exact (float error of the normalisation is ~1e-4 grey levels, far below
the half level that rounding forgives) and the checksum does not depend on BLAS or threads; any change of
a pixel by one level, of the crop, the resize or the flip changes it. The libraries that render a view
(``render_versions``) are recorded beside it, so a mismatch can name what changed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image, features

from .errors import MmkdError

NUM_PARAMS = 5
CHECKSUM_RULE = (
    "blake2b digest_size=8 as little-endian uint64 of the teacher input x (3, size, size) mapped "
    "back to 8-bit pixels, uint8(clip(round((x * std + mean) * 255), 0, 255)), C order"
)
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class ViewSpec:
    """How views are drawn and rendered (recorded in store provenance as ``views``).

    Attributes:
        count: K views per sample; view 0 is the eval transform.
        size: Output side in pixels.
        mean: Per-channel mean for normalisation.
        std: Per-channel std for normalisation.
        interpolation: "bicubic", "bilinear" or "nearest".
        crop_pct: Eval crop as a fraction of the shorter side.
        crop_mode: "center" (the centred square above) or "squash" (the whole image, aspect not kept).
        scale: Area range of random crops, as fractions of the image.
        ratio: Aspect-ratio range of random crops.
        flip: Probability of a horizontal flip in random views.
        seed: Seed of the view generator.
        checksum: The rule of ``view_checksum`` (part of the compared provenance: checksums made by
            different rules must not share a store).
    """

    count: int = 1
    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    seed: int = 0
    checksum: str = CHECKSUM_RULE

    def __post_init__(self) -> None:
        if self.count < 1:
            raise MmkdError(f"--views {self.count}: need at least 1 (view 0 is the eval transform)")
        if self.interpolation not in _RESAMPLE:
            raise MmkdError(f"interpolation {self.interpolation!r}: choose one of {', '.join(_RESAMPLE)}")
        if self.crop_mode not in ("center", "squash"):
            raise MmkdError(f"crop_mode {self.crop_mode!r}: choose center or squash")
        if not 0 < self.crop_pct <= 1:
            raise MmkdError(f"crop_pct {self.crop_pct}: must be in (0, 1]")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise MmkdError(f"crop scale {self.scale}: need 0 < min <= max <= 1")

    def describe(self) -> dict:
        return {**asdict(self), "params": ["top", "left", "height", "width", "flip"]}


def eval_params(width: int, height: int, crop_pct: float, crop_mode: str = "center") -> np.ndarray:
    """The crop of view 0: the centred square, or the whole image for "squash"."""
    if crop_mode == "squash":
        return np.array([0, 0, height, width, 0], dtype=np.float32)
    side = max(1, int(round(min(width, height) * crop_pct)))
    top = (height - side) // 2
    left = (width - side) // 2
    return np.array([top, left, side, side, 0], dtype=np.float32)


def random_params(width: int, height: int, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    """A random resized crop (torchvision's rule: 10 tries, then a clamped centre crop) and flip.

    Written out rather than taken from ``torchvision.transforms.RandomResizedCrop.get_params``: that draws
    from torch's global generator, and a stored view must be drawn from (seed, sample, view) alone so that
    extraction, resumption and the loader's replay agree whatever else consumed random numbers.
    """
    area = width * height
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    box = None
    for _ in range(10):
        target = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < spec.ratio[0]:
            w, h = width, int(round(width / spec.ratio[0]))
        elif in_ratio > spec.ratio[1]:
            h, w = height, int(round(height * spec.ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = float(rng.uniform() < spec.flip)
    return np.array([*box, flip], dtype=np.float32)


def draw_params(width: int, height: int, spec: ViewSpec, index: int) -> np.ndarray:
    """Parameters of all K views of source sample ``index``: (K, P) float32."""
    out = np.empty((spec.count, NUM_PARAMS), dtype=np.float32)
    out[0] = eval_params(width, height, spec.crop_pct, spec.crop_mode)
    for v in range(1, spec.count):
        out[v] = random_params(width, height, spec, np.random.default_rng([spec.seed, index, v]))
    return out


def render_pixels(image: Image.Image, params: np.ndarray, spec: ViewSpec) -> np.ndarray:
    """Replay one view's crop, resize and flip: (size, size, 3) uint8."""
    top, left, h, w, flip = (int(p) for p in params)
    if image.mode != "RGB":
        image = image.convert("RGB")
    out = image.resize(
        (spec.size, spec.size), resample=_RESAMPLE[spec.interpolation], box=(left, top, left + w, top + h)
    )
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def normalize(pixels: np.ndarray, spec: ViewSpec) -> torch.Tensor:
    """(..., size, size, 3) uint8 -> (..., 3, size, size) float32, normalised by the spec's mean and std."""
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).movedim(-1, -3)
    mean = torch.tensor(spec.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def render(image: Image.Image, params: np.ndarray, spec: ViewSpec) -> torch.Tensor:
    """Replay one view: (3, size, size) float32, normalised. Same image + same params = same bits."""
    return normalize(render_pixels(image, params, spec), spec)


def render_views(image: Image.Image, params: np.ndarray, spec: ViewSpec) -> torch.Tensor:
    """All views of one image: (K, 3, size, size)."""
    return torch.stack([render(image, p, spec) for p in params])


def view_checksum(pixel_values: torch.Tensor, spec: ViewSpec) -> np.ndarray:
    """Checksum of rendered views by ``spec.checksum`` (see CHECKSUM_RULE): the exact tensor the teacher
    read, (..., 3, size, size) normalised float, -> (...) uint64.

    Mapping back to the uint8 grid makes it exact for views rendered through uint8 and blind to float noise
    below half a grey level (another BLAS, thread count or fused kernel), not to any pixel that changed.
    """
    if spec.checksum != CHECKSUM_RULE:
        raise MmkdError(
            f"view checksum rule {spec.checksum!r} is not the one this mmkd computes "
            f"({CHECKSUM_RULE!r}): verify the store with the mmkd that wrote it"
        )
    x = torch.as_tensor(pixel_values).detach().to("cpu", torch.float32)
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"view_checksum: expected (..., 3, H, W), got {tuple(x.shape)}")
    mean = torch.tensor(spec.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32)[:, None, None]
    flat = x.reshape(-1, *x.shape[-3:])
    out = np.empty(flat.shape[0], dtype=np.uint64)
    for j, view in enumerate(flat):  # one view at a time: bounded memory for large batches
        pixels = (view * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        digest = hashlib.blake2b(pixels.contiguous().numpy().tobytes(), digest_size=8).digest()
        out[j] = int.from_bytes(digest, "little")
    return out.reshape(x.shape[:-3])


def render_versions() -> dict[str, str]:
    """Versions of what decodes and renders a view: Pillow (resize, flip, decoding), the JPEG library it
    decodes with, numpy and torch (normalisation) and torchvision (datasets that decode through it)."""
    try:
        jpeg = features.version("libjpeg_turbo")
    except ValueError:  # a Pillow that does not know the feature
        jpeg = None
    out = {
        "pillow": PIL.__version__,
        "libjpeg": f"libjpeg-turbo {jpeg}" if jpeg else str(features.version("jpg")),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    try:
        out["torchvision"] = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        out["torchvision"] = "not installed"
    return out


def view_spec(record: Any) -> ViewSpec:
    """The one ViewSpec constructor for records: a store's attributes (their ``views``), a ``views`` record
    itself, or an image preprocessing record (an ``ImagePreprocess`` or its dict: the eval view at it)."""
    if hasattr(record, "__dataclass_fields__"):
        record = asdict(record)
    record = dict(record.get("views", record))
    names = {f.name for f in fields(ViewSpec)}
    return ViewSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names})
