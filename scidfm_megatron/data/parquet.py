"""Parquet inputs (``pyarrow``, ``pip install 'scidfm-megatron[parquet]'``) as blocks of jsonl lines.

Each row becomes one JSON line holding only the columns preprocessing reads, so a parquet row goes
through exactly the checks a jsonl line does: a missing column, a null, a number or any non-string value
is rejected and listed with the file and the row number (1-based, in the ``line`` field) and the reason.
Values JSON cannot hold (bytes, timestamps, decimals) are reported as "an object". A parquet file is
never split by --shard (it goes whole to one shard).
"""

from __future__ import annotations

import json
from typing import Iterator


def _unjsonable(value):
    return {f"<parquet {type(value).__name__}>": None}


def parquet_blocks(path: str, file_index: int, columns: list[str],
                   block_bytes: int) -> Iterator[tuple[int, int, bytes]]:
    """(file index, first row number, jsonl bytes) blocks of about ``block_bytes``."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        from .preprocess import PreprocessError

        raise PreprocessError(f"{path}: reading .parquet needs pyarrow "
                              f"(pip install 'scidfm-megatron[parquet]')") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    present = [c for c in columns if c in names]
    # A column the file lacks: each row is rejected as missing that key, listing the file's columns.
    others = {c: None for c in names[:8] if c not in present} if len(present) < len(columns) else {}
    row = 1
    lines: list[bytes] = []
    size = 0
    first = row
    for batch in pf.iter_batches(batch_size=1024, columns=present or names[:1]):
        records = batch.to_pylist() if present else [{} for _ in range(batch.num_rows)]
        for rec in records:
            if others:
                rec = {**others, **rec}
            line = json.dumps(rec, ensure_ascii=False, default=_unjsonable).encode() + b"\n"
            lines.append(line)
            size += len(line)
            row += 1
            if size >= block_bytes:
                yield file_index, first, b"".join(lines)
                lines, size, first = [], 0, row
    if lines:
        yield file_index, first, b"".join(lines)
