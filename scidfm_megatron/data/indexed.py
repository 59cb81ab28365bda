"""Streaming writer for Megatron's indexed dataset format (``.bin`` + ``.idx``), in O(1) memory.

The format is megatron-core's ``MMIDIDX`` version 1 (``megatron.core.datasets.indexed_dataset``):
header ``MMIDIDX\\x00\\x00``, ``<Q`` version 1, ``<B`` dtype code, ``<Q`` sequence count, ``<Q`` document
count (+1), then int32 sequence lengths, int64 byte pointers, int64 document indices. The tests read
every file this writes with megatron-core's own ``IndexedDataset``.

Why not megatron's ``IndexedDatasetBuilder``: it keeps every length in Python lists (tens of bytes per
document: gigabytes for a 100M-document corpus) and importing it loads torch (~250 MB per process).
This writer spools lengths to a side file and computes pointers chunk by chunk at the end, needing only
numpy. Everything is written under temporary names and renamed only by :meth:`finalize`, so an
interrupted run leaves nothing at the output names.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}
_CHUNK = 1 << 20


def optimal_dtype(vocab_size: int):
    """uint16 when every id fits (megatron-core's rule), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def read_index_counts(prefix: str | os.PathLike) -> tuple[int, int]:
    """(sequences, documents) of a Megatron dataset, from its .idx header. FileNotFoundError if absent."""
    path = idx_path(prefix)
    with open(path, "rb") as f:
        head = f.read(len(INDEX_HEADER) + 8 + 1 + 8 + 8)
    if head[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise ValueError(f"{path}: not a Megatron index file")
    sequences, doc_entries = struct.unpack("<QQ", head[len(INDEX_HEADER) + 9:])
    return sequences, doc_entries - 1


def read_sequence_lengths(prefix: str | os.PathLike) -> np.ndarray:
    """The int32 length of every sequence, read from the .idx (no torch, no mmap of the .bin)."""
    sequences, _ = read_index_counts(prefix)
    with open(idx_path(prefix), "rb") as f:
        f.seek(len(INDEX_HEADER) + 8 + 1 + 8 + 8)
        return np.fromfile(f, dtype=np.int32, count=sequences)


class IndexedWriter:
    """Append documents (1-D int arrays); :meth:`finalize` writes the index and renames into place."""

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}")
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = Path(f"{prefix}.bin.tmp")
        self._tmp_idx = Path(f"{prefix}.idx.tmp")
        self._tmp_len = Path(f"{prefix}.lengths.tmp")
        self._bin = open(self._tmp_bin, "wb")
        self._len = open(self._tmp_len, "wb")
        self.documents = 0
        self.tokens = 0
        self._max = np.iinfo(self.dtype).max

    def add_document(self, tokens) -> None:
        self.add_documents(np.asarray(tokens), np.asarray([len(tokens)], dtype=np.int32))

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray, *_unused) -> None:
        """Many documents at once: ``flat_tokens`` is their concatenation, ``lengths`` their sizes."""
        if flat_tokens.size and (int(flat_tokens.max()) > self._max or int(flat_tokens.min()) < 0):
            raise ValueError(f"token id out of range for {self.dtype} in {self.prefix}")
        self._bin.write(np.ascontiguousarray(flat_tokens, dtype=self.dtype).tobytes())
        self._len.write(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())
        self.documents += len(lengths)
        self.tokens += int(flat_tokens.size)

    def finalize(self) -> None:
        for f in (self._bin, self._len):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        n = self.documents
        with open(self._tmp_idx, "wb") as idx, open(self._tmp_len, "rb") as lens:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype.type]))
            idx.write(struct.pack("<Q", n))
            idx.write(struct.pack("<Q", n + 1))
            while chunk := lens.read(4 * _CHUNK):
                idx.write(chunk)
            lens.seek(0)
            offset = 0
            while chunk := lens.read(4 * _CHUNK):
                lengths = np.frombuffer(chunk, dtype=np.int32).astype(np.int64) * self.dtype.itemsize
                pointers = np.cumsum(lengths) - lengths + offset
                offset = int(pointers[-1] + lengths[-1])
                idx.write(pointers.tobytes())
            for start in range(0, n + 1, _CHUNK):
                idx.write(np.arange(start, min(n + 1, start + _CHUNK), dtype=np.int64).tobytes())
            idx.flush()
            os.fsync(idx.fileno())
        os.remove(self._tmp_len)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))  # the .idx appears last: its presence means complete

    def abort(self) -> None:
        for f in (self._bin, self._len):
            if not f.closed:
                f.close()
        for p in (self._tmp_bin, self._tmp_idx, self._tmp_len):
            p.unlink(missing_ok=True)
