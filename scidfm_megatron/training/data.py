"""Batches for the trainer, addressed by global sample index so a resumed run sees the same data.

Global batch ``g`` is samples ``[g*B, (g+1)*B)`` of the dataset (megatron's GPTDataset is already a
shuffled, epoch-aware sample index); data-parallel rank ``r`` takes its contiguous share and cuts it
into micro-batches. Resuming at ``consumed_samples`` continues exactly where the run stopped, in any DP
layout with the same global batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class EpochShuffled:
    """``epochs`` passes over a map-style dataset, each in its own seeded permutation (SFT)."""

    def __init__(self, dataset, epochs: float, seed: int):
        self.dataset, self.n, self.seed = dataset, len(dataset), seed
        self.length = int(math.ceil(epochs * self.n))
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        epoch, k = divmod(int(i), self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self._perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.n)
        return self.dataset[int(perm[k])]


def _collate(items: list[dict]) -> dict:
    out = {}
    keys = ["tokens", "labels", "loss_mask", "position_ids"]
    if "document_ids" in items[0]:  # packed SFT: conversation boundaries (model/packing.py)
        keys.append("document_ids")
    for key in keys:
        out[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["loss_mask"] = out["loss_mask"].float()
    return out


def micro_batches(dataset, consumed_samples: int, global_batch: int, micro_batch: int, dp_rank: int,
                  dp_size: int, device=None) -> list[dict]:
    """This DP rank's micro-batches of the global batch that starts at ``consumed_samples``, on ``device``
    (default: the training device; from pinned memory without blocking on a GPU)."""
    from ..device import to_device

    per_rank = global_batch // dp_size
    start = consumed_samples + dp_rank * per_rank
    if start + per_rank > len(dataset):
        raise IndexError(f"dataset has {len(dataset)} samples; the run needs sample {start + per_rank - 1}")
    idx = list(range(start, start + per_rank))
    return [to_device(_collate([dataset[i] for i in idx[k:k + micro_batch]]), device)
            for k in range(0, per_rank, micro_batch)]

