"""Target values on their way into a store: batches encoded to the stored dtype (``encode_targets``), and the
checks that refuse a NaN, an inf or a value the stored dtype would turn into inf, naming the array, the sample
and the value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import quant
from ..errors import MmkdError


def _where(name: str, pos: tuple[int, ...], lo: int, index: np.ndarray | None) -> str:
    """'array 'tokens', sample 12 (dataset index 40), view 0, time step 3' for a position in a shard array."""
    i = int(pos[0])
    out = f"array {name!r}, sample {lo + i}"
    if index is not None and len(index) > i and int(index[i]) != lo + i:
        out += f" (dataset index {int(index[i])})"
    if len(pos) > 1:
        out += f", view {int(pos[1])}"
    if name == "tokens" and len(pos) > 2:
        out += f", time step {int(pos[2])}"
    return out


def _first(bad: np.ndarray) -> tuple[int, ...] | None:
    flat = np.flatnonzero(bad)
    return tuple(int(i) for i in np.unravel_index(flat[0], bad.shape)) if flat.size else None


def _nonfinite(where: str, value: Any) -> MmkdError:
    return MmkdError(
        f"{where}: the teacher's target is {value}; a non-finite target is never stored — check the weights "
        "and --autocast (float16 compute can overflow)"
    )


def _unstorable(where: str, value: float, dtype: str, what: str | None = None) -> MmkdError:
    hint = "--dtype float32" if dtype == "bfloat16" else "--dtype bfloat16 or --dtype float32"
    return MmkdError(
        f"{where}: value {value:.7g} is beyond the range of {what or dtype} and would be stored as inf; use {hint}"
    )


# the exponent bits of float16 and bfloat16 (as uint16): all ones is inf or NaN
_EXPONENT = {"float16": 0x7C00, "bfloat16": 0x7F80}


def _nonfinite_bits(bits: np.ndarray, dtype: str) -> np.ndarray | None:
    """Where the 16-bit floats ``bits`` (uint16) are inf or NaN, or None when nowhere: a mask and one max, some
    times faster than ``np.isfinite`` on float16."""
    mask = _EXPONENT[dtype]
    exponent = bits & np.uint16(mask)
    if not exponent.size or int(exponent.max()) != mask:
        return None
    return exponent == mask


def encode_targets(name: str, x: Any, dtype: str, locate: Callable[[int], tuple[int, int]]) -> np.ndarray:
    """A batch of float32 targets (a torch tensor on any device, or an array) in the stored form of a float16,
    bfloat16 or float32 store, checked as ``StoreWriter.write_shard`` checks a float32 shard.

    Encoding batch by batch lets extraction keep its shard buffers in the stored dtype (half the bytes of
    float32 for float16/bfloat16, and half the bytes copied from a GPU), while a value that the dtype cannot
    hold is still refused before anything is written.

    Args:
        name: The array (``tokens``, ``pooled``), for the message.
        x: float32 values, one row per result: (B, T, D) tokens or (B, E) pooled.
        dtype: float16, bfloat16 or float32.
        locate: ``locate(row of x) -> (sample, view)`` for the message (the first sample given that row).

    Raises:
        MmkdError: a value is NaN or inf, or the dtype turns it into inf (float16 above 65504); the message
            names the array, the sample and the value, as ``write_shard``'s does.
    """
    import torch

    def where(pos: tuple[int, ...]) -> str:
        return _where(name, (*locate(int(pos[0])), *pos[1:]), 0, None)

    t = torch.as_tensor(x)
    t = t if t.dtype == torch.float32 else t.float()
    if t.device.type != "cpu":  # check and cast on the device, where both are cheap; copy half the bytes over
        y = t if dtype == "float32" else t.to(torch.float16 if dtype == "float16" else torch.bfloat16)
        if bool(torch.isfinite(y).all()):
            y = y.cpu()
            return y.numpy() if dtype != "bfloat16" else y.view(torch.int16).numpy().view(np.uint16)
        t = t.cpu()  # a refusal: find and name it below
    a = t.numpy()
    finite = np.isfinite(a)  # numpy's is much faster than torch's on the CPU
    if not finite.all():
        pos = _first(~finite)
        raise _nonfinite(where(pos), a[pos])
    if dtype == "float32":
        return a
    # torch's cast: round to nearest even like numpy's astype (bit-identical), several times faster on the CPU
    bits = t.to(torch.float16 if dtype == "float16" else torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    bad = _nonfinite_bits(bits, dtype)
    if bad is not None:
        pos = _first(bad)
        raise _unstorable(where(pos), float(a[pos]), dtype)
    return bits.view(np.float16) if dtype == "float16" else bits


def check_finite(name: str, x: np.ndarray, lo: int, index: np.ndarray | None) -> None:
    """Refuse a NaN or inf in a float32 shard array.

    Args:
        name: The array, for the message.
        x: The shard's values of it.
        lo: The shard's first sample.
        index: The shard's dataset indices (named where they differ from the sample number), or None.

    Raises:
        MmkdError: naming the array, the sample and the value.
    """
    pos = _first(~np.isfinite(x))
    if pos is not None:
        raise _nonfinite(_where(name, pos, lo, index), x[pos])


def check_encoded(name: str, x: np.ndarray, dtype: str, lo: int, index: np.ndarray | None) -> None:
    """Refuse inf or NaN in a shard that arrives encoded (``encode_targets`` checked it batch by batch; this
    catches a caller that did not).

    Args:
        name: The array, for the message.
        x: The shard's values of it.
        dtype: Its logical dtype: float16 or bfloat16.
        lo: The shard's first sample.
        index: The shard's dataset indices (named where they differ from the sample number), or None.

    Raises:
        MmkdError: naming the array, the sample and the value.
    """
    bad = _nonfinite_bits(x.view(np.uint16), dtype)
    if bad is not None:
        pos = _first(bad)
        raise _nonfinite(_where(name, pos, lo, index), float(quant.decode_float(np.asarray(x[pos]), dtype)))


def check_storable(
    name: str, x: np.ndarray, enc: dict[str, np.ndarray], dtype: str, lo: int, index: np.ndarray | None
) -> None:
    """Refuse finite float32 targets that the storage dtype turns into inf (float16 above 65504, the float16
    outliers of int8, bfloat16 near float32's maximum).

    Args:
        name: The array, for the message.
        x: The shard's values of it.
        enc: The shard's encoded arrays (int8's parts included).
        dtype: The store's logical dtype.
        lo: The shard's first sample.
        index: The shard's dataset indices (named where they differ from the sample number), or None.

    Raises:
        MmkdError: naming the array, the sample and the value.
    """
    if dtype == "float16":
        bad = _nonfinite_bits(enc[name].view(np.uint16), dtype)
        pos, value, what = (None if bad is None else _first(bad)), x, "float16"
    elif dtype == "int8":  # int8 keeps each vector's largest channels as float16
        val = enc[f"{name}_outlier_val"]
        pos, what = _first(~np.isfinite(val)), "float16 (int8 keeps its outlier channels as float16)"
        value = np.take_along_axis(x, enc[f"{name}_outlier_idx"].astype(np.int64), axis=-1)
    elif dtype == "bfloat16":
        pos, value, what = _first((enc[name] & 0x7F80) == 0x7F80), x, "bfloat16"
    else:
        return
    if pos is not None:
        raise _unstorable(_where(name, pos, lo, index), float(value[pos]), dtype, what)
