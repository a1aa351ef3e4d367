"""Storage encodings of float32 target arrays: float32, float16, bfloat16 (bits as uint16) and int8.

int8 is per-token absmax with outliers kept apart: the K largest-magnitude channels of each token are
stored as float16 values plus their channel indices, and the int8 scale is taken over the remaining
channels. A plain per-token absmax lets a few outlier channels set the scale of every other channel;
taking them out keeps the scale near the bulk of the distribution.

The same encoding applies to every target array A (``tokens`` and ``pooled``); its dequantisation rule
(recorded in the store's ``storage`` attribute)::

    x = A * A_scale[..., None] / 127                          (in float32, left to right)
    x[..., A_outlier_idx[..., k]] = A_outlier_val[..., k]    for k < K

``decode_int8`` evaluates exactly this expression (``INT8_RULE``, recorded in stores, states the same),
so any reader that follows the recorded rule gets the same float32 values bit for bit. ``encode_int8``
stores ``rint(x / scale * 127)``, so a non-outlier channel decodes to within ``scale / 254`` of its value
(plus float32 rounding); outlier channels decode to their float16 value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import MmkdError

DTYPES = ("float16", "float32", "bfloat16", "int8")

# How a bfloat16 store's uint16 arrays decode (recorded in stores, on the arrays and in ``storage``):
# the stored 16 bits are the upper half of a float32. ``decode_float`` evaluates exactly this.
BFLOAT16_RULE = "float32 bits = uint16 << 16"

INT8_RULE = (
    "for A in (tokens, pooled): x = A * A_scale[..., None] / 127; then x[..., A_outlier_idx[..., k]] = "
    "A_outlier_val[..., k] for every k (per-vector absmax over the non-outlier channels; the K "
    "largest-magnitude channels of each vector kept as float16)"
)
INT8_PARTS = ("", "_scale", "_outlier_idx", "_outlier_val")


def outliers_for(dim: int) -> int:
    """How many outlier channels int8 keeps per token: 1 in 96 (4 for D=384, 8 for D=768)."""
    return max(1, dim // 96)


def storage_dtype(dtype: str) -> str:
    """The zarr dtype that holds a logical dtype (bfloat16 is not a zarr dtype in zarr 3.1)."""
    if dtype not in DTYPES:
        raise MmkdError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return {"bfloat16": "uint16"}.get(dtype, dtype)


def encode_float(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> stored array for float16/float32/bfloat16 (bfloat16 rounded to nearest even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        # torch's own cast: round to nearest even, and a NaN stays a NaN (a hand-written shift made it -0.0)
        import torch

        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    raise MmkdError(f"dtype {dtype!r} is not a float encoding")


def decode_float(x: np.ndarray, dtype: str) -> np.ndarray:
    """Stored array -> float32 (bfloat16: literally ``BFLOAT16_RULE``)."""
    if dtype == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


def encode_int8(x: np.ndarray, k: int, name: str = "tokens") -> dict[str, np.ndarray]:
    """float32 (..., D) -> ``{name: int8 codes, name_scale, name_outlier_idx, name_outlier_val}``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    a = np.abs(x)
    # indices of the K largest |x| per token (order within the K does not matter)
    idx = np.argpartition(a, -k, axis=-1)[..., -k:]
    val = np.take_along_axis(x, idx, axis=-1)
    rest = x.copy()
    np.put_along_axis(rest, idx, 0.0, axis=-1)
    scale = np.abs(rest).max(axis=-1)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = np.clip(np.rint(rest / safe * 127.0), -127, 127).astype(np.int8)
    return {
        name: q,
        f"{name}_scale": scale.astype(np.float32),
        f"{name}_outlier_idx": idx.astype(np.uint16),
        f"{name}_outlier_val": val.astype(np.float16),
    }


def decode_int8(q: np.ndarray, scale: np.ndarray, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Inverse of ``encode_int8``: literally INT8_RULE, ``x = A * A_scale[..., None] / 127`` in float32."""
    x = q.astype(np.float32) * scale.astype(np.float32)[..., None] / np.float32(127)
    np.put_along_axis(x, idx.astype(np.int64), val.astype(np.float32), axis=-1)
    return x


def decode_int8_tensor(q: Any, scale: Any, idx: Any, val: Any) -> Any:
    """``decode_int8`` on torch tensors, wherever they are (a GPU widens its own batches): the same rule, in
    the same float32 operations, so the values equal ``decode_int8``'s bit for bit."""
    x = q.float() * scale.float()[..., None] / 127
    return x.scatter_(-1, idx.long(), val.float())
