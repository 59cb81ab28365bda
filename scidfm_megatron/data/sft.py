"""Instruction-tuning data: packed conversations with assistant-only loss masks, stored as three aligned
indexed datasets, read lazily by :class:`SFTDataset` with each position's conversation id for isolated
packing (docs/data.md, "SFT data")."""

from __future__ import annotations

import numpy as np

from .indexed import IndexedWriter


class SFTPacker:
    """Writes tokenized conversations into packed training sequences (greedy, never splitting a conversation)
    with their loss masks and conversation lengths."""

    def __init__(self, prefix: str, seq_length: int, dtype, pack: bool = True):
        if seq_length < 2:
            raise ValueError("SFT sequence length must be >= 2")
        self.capacity = seq_length + 1
        self.seq_length = seq_length
        self.pack = pack
        self.tokens = IndexedWriter(f"{prefix}_tokens", dtype)
        self.mask = IndexedWriter(f"{prefix}_lossmask", np.uint8)
        self.lens = IndexedWriter(f"{prefix}_convlens", np.int32)
        self._buf_ids: list[np.ndarray] = []
        self._buf_mask: list[np.ndarray] = []
        self._buf_len = 0
        self.conversations = self.truncated = self.assistant_tokens = 0

    def _flush(self):
        if self._buf_len:
            ids, mask = np.concatenate(self._buf_ids), np.concatenate(self._buf_mask)
            self.tokens.add_document(ids)
            self.mask.add_document(mask)
            self.lens.add_document(np.asarray([len(x) for x in self._buf_ids], dtype=np.int32))
            self._buf_ids, self._buf_mask, self._buf_len = [], [], 0

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> None:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for k in range(len(lengths)):
            ids, m = flat[offsets[k]:offsets[k + 1]], mask[offsets[k]:offsets[k + 1]]
            if len(ids) > self.capacity:
                ids, m = ids[:self.capacity], m[:self.capacity]
                self.truncated += 1
            self.conversations += 1
            self.assistant_tokens += int(m.sum())
            if not self.pack or self._buf_len + len(ids) > self.capacity:
                self._flush()
            self._buf_ids.append(ids)
            self._buf_mask.append(m)
            self._buf_len += len(ids)
        if not self.pack:
            self._flush()

    def finalize(self):
        self._flush()
        self.tokens.finalize()
        self.mask.finalize()
        self.lens.finalize()

    def abort(self):
        self.tokens.abort()
        self.mask.abort()
        self.lens.abort()

    def stats(self) -> dict:
        return dict(conversations=self.conversations, sequences=self.tokens.documents, truncated=self.truncated,
                    assistant_tokens=self.assistant_tokens, seq_length=self.seq_length, packed=self.pack)


def document_layout(conv_lengths, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(document_ids, position_ids) of the ``seq_length`` input positions of a sequence whose packed
    conversations have ``conv_lengths`` tokens (inputs are tokens[:-1]): each conversation's index and a
    position restarting at 0 in each; padding gets id -1 and positions from 0."""
    doc = np.full(seq_length, -1, dtype=np.int64)
    pos = np.empty(seq_length, dtype=np.int64)
    start = 0
    for k, n in enumerate(conv_lengths):
        end = min(start + int(n), seq_length)
        doc[start:end] = k
        pos[start:end] = np.arange(end - start)
        start = end
        if start >= seq_length:
            break
    pos[start:] = np.arange(seq_length - start)
    return doc, pos


def missing_sft_file(prefix: str) -> str | None:
    """The first file of an SFT dataset that is not there, with the fix; None when all are. Data written
    before packing became isolated has no ``<prefix>_convlens``."""
    import os

    for part in ("tokens", "lossmask", "convlens"):
        if not os.path.exists(f"{prefix}_{part}.idx"):
            return (f"{prefix}_{part}.idx does not exist; write the SFT data with scidfm-preprocess --sft-seq-length "
                    f"(conversation boundaries, <prefix>_convlens, are stored since packing became isolated)")
    return None


class SFTDataset:
    """Map-style dataset of padded SFT sequences: dict(tokens, labels, loss_mask, position_ids,
    document_ids)."""

    def __init__(self, prefix: str, seq_length: int, pad_id: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        missing = missing_sft_file(prefix)
        if missing:
            raise ValueError(missing)
        self.tokens = IndexedDataset(f"{prefix}_tokens")
        self.mask = IndexedDataset(f"{prefix}_lossmask")
        self.lens = IndexedDataset(f"{prefix}_convlens")
        for name, ds in (("lossmask", self.mask), ("convlens", self.lens)):
            if len(ds) != len(self.tokens):
                raise ValueError(f"{prefix}: tokens ({len(self.tokens)}) and {name} ({len(ds)}) differ in length; "
                                 f"re-run scidfm-preprocess")
        self.seq_length, self.pad_id = seq_length, pad_id

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        import torch

        ids = np.asarray(self.tokens[i], dtype=np.int64)[: self.seq_length + 1]
        mask = np.asarray(self.mask[i], dtype=np.float32)[: self.seq_length + 1]
        pad = self.seq_length + 1 - len(ids)
        if pad:
            ids = np.concatenate([ids, np.full(pad, self.pad_id, dtype=np.int64)])
            mask = np.concatenate([mask, np.zeros(pad, dtype=np.float32)])
        doc, pos = document_layout(np.asarray(self.lens[i]), self.seq_length)
        return dict(tokens=torch.from_numpy(ids[:-1].copy()), labels=torch.from_numpy(ids[1:].copy()),
                    loss_mask=torch.from_numpy(mask[1:].copy()), position_ids=torch.from_numpy(pos),
                    document_ids=torch.from_numpy(doc))
