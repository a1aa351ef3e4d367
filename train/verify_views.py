"""Before training: the loader must render the pixels the teacher saw, or the stored targets are not theirs.

Extraction stores a checksum of every view's teacher input (``view_checksum``, rule ``views.CHECKSUM_RULE``)
and the versions of the libraries that rendered it (group attribute ``mmkd.view_render.versions``). A
Pillow or torchvision upgrade that changes resizing or cropping, or a source image that changed on disk,
would otherwise pair each student input with targets computed from other pixels, silently.
``verify_views`` re-renders a deterministic sample of (sample, view) pairs, or all of them, exactly as the
loader does, and refuses the first that differs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mmkd_core import views
from mmkd_core.errors import MmkdError
from mmkd_core.views import ViewSpec, view_spec

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 64
_warned: set[str] = set()  # stores already warned about (no checksums): once per store per process


def verify_views(
    reader, source, spec: ViewSpec | None = None, sample: int | None = DEFAULT_SAMPLE, seed: int = 0
) -> None:
    """Re-render stored views from the source dataset and compare their checksums with the store's.

    Args:
        reader: The open store (``StoreReader``).
        source: The source dataset the store indexes into (``image(i)`` gives a PIL image).
        spec: How the store's views render (the teacher's preprocessing); None reads it from the store.
        sample: (sample, view) pairs to check, drawn deterministically from ``seed``; None checks every view
            of every sample (``--verify-views``); 0 checks none.
        seed: Seed of the sample.

    Raises:
        MmkdError: naming the first mismatching sample (store row and dataset index) and view, and the
            rendering library versions recorded at extraction against those now where they differ.

    Stores without views (text) have nothing to verify; stores written before checksums existed cannot be
    verified: a warning, once, and training goes on.
    """
    if sample is not None and sample < 0:
        raise MmkdError(f"view verification sample {sample}: must be 0 or more (or all)")
    if not reader.has("view_params") or sample == 0:
        return
    if not reader.has("view_checksum"):
        if str(reader.path) not in _warned:
            _warned.add(str(reader.path))
            log.warning(
                "%s has no view_checksum (extracted before views were checksummed): its views cannot be "
                "verified against what the teacher saw; re-extract it to have them checked",
                reader.path,
            )
        return
    if source is None:
        raise MmkdError(f"{reader.path}: verifying its views needs the source dataset it was extracted from")
    spec = spec if spec is not None else view_spec(reader.attrs)
    n, v = len(reader), reader.views
    picked = _pick(n, v, sample, seed)
    checked = 0
    for lo, hi in _runs(picked, n, reader.chunk_size, reader.shard_size):
        part = reader.read(lo, hi, ("view_params", "view_checksum", "index"))
        for row in range(lo, hi):
            wanted = picked.get(row) if picked is not None else range(v)
            if not wanted:
                continue
            index = int(part["index"][row - lo])
            image = source.image(index)
            for view in wanted:
                stored = int(part["view_checksum"][row - lo, view])
                now = int(views.view_checksum(views.render(image, part["view_params"][row - lo, view], spec), spec))
                if now != stored:
                    raise MmkdError(_mismatch(reader, row, index, view, stored, now))
                checked += 1
    log.info("views verified: %d of %d re-render as the teacher saw them (%s)", checked, n * v, reader.path)


def _pick(n: int, v: int, sample: int | None, seed: int) -> dict[int, list[int]] | None:
    """Store row -> views to check; None for all of them."""
    if sample is None or sample >= n * v:
        return None
    flat = np.sort(np.random.default_rng([seed, 0x7E51]).choice(n * v, size=sample, replace=False))
    out: dict[int, list[int]] = {}
    for p in flat.tolist():
        out.setdefault(p // v, []).append(p % v)
    return out


def _runs(picked: dict[int, list[int]] | None, n: int, chunk: int, cap: int) -> list[tuple[int, int]]:
    """Contiguous row ranges to read, never a fancy selection: a range grows over the rows it needs while they
    share a chunk or follow each other, up to ``cap`` rows (a shard); all rows (None) read shard by shard."""
    if picked is None:
        return [(lo, min(lo + cap, n)) for lo in range(0, n, cap)]
    rows = sorted(picked)
    runs: list[tuple[int, int]] = []
    lo = last = rows[0]
    for r in rows[1:]:
        if (r // chunk == last // chunk or r == last + 1) and r - lo < cap:
            last = r
            continue
        runs.append((lo, last + 1))
        lo = last = r
    runs.append((lo, last + 1))
    return runs


def _mismatch(reader, row: int, index: int, view: int, stored: int, now: int) -> str:
    recorded: dict[str, Any] = (reader.attrs.get("view_render") or {}).get("versions") or {}
    current = views.render_versions()
    differ = [
        f"{k} {recorded.get(k, '<not recorded>')} at extraction, {current.get(k, '<absent>')} now"
        for k in sorted(set(recorded) | set(current))
        if recorded.get(k) != current.get(k)
    ]
    if differ:
        why = "rendering versions differ: " + "; ".join(differ)
        fix = "install the recorded versions or re-extract the store with these"
    else:
        why = (
            "same versions ("
            + ", ".join(f"{k} {current[k]}" for k in sorted(current))
            + "): the source image changed (or the view's stored parameters)"
        )
        fix = "train on the data the store was extracted from (--data-root) or re-extract the store"
    return (
        f"{reader.path}: sample {row} (dataset index {index}), view {view} does not re-render the pixels its "
        f"teacher targets were computed from (checksum {stored:016x} at extraction, {now:016x} now); "
        f"{why}; {fix}"
    )
