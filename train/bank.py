"""The memory bank: pooled teacher targets of other samples, read from the store, as extra negatives for
contrastive KD (``--bank-size``)."""

from __future__ import annotations

import numpy as np
import torch


def memory_bank(reader, size: int, seed: int, epoch: int) -> tuple[torch.Tensor, np.ndarray]:
    """Pooled teacher targets (view 0) of ``size`` samples in whole chunk runs chosen at random for the
    epoch, with their sample indices."""
    chunk = reader.chunk_size
    starts = np.arange(0, len(reader), chunk)
    rng = np.random.default_rng([seed, epoch, 2])
    picked, rows, idx = rng.permutation(starts), [], []
    for lo in picked:
        if sum(len(i) for i in idx) >= size:
            break
        part = reader.read(int(lo), int(min(lo + chunk, len(reader))), ("pooled", "index"))
        rows.append(part["pooled"][:, 0])
        idx.append(part["index"])
    bank, index = np.concatenate(rows)[:size], np.concatenate(idx)[:size]
    return torch.from_numpy(bank), index


def without_batch(bank: tuple[torch.Tensor, np.ndarray], index: torch.Tensor) -> torch.Tensor:
    """The bank's targets less those of the batch's own samples (``index``): they are positives, not
    negatives."""
    return bank[0][~np.isin(bank[1], index.numpy())]
