"""Hugging Face checkpoint files: a streaming sharded safetensors writer and a validating reader.

Writer: the shard plan (names, dtypes, shapes -> files) is fixed before any tensor is read, so each
file's safetensors header is written first and tensors are appended one conversion unit at a time and
dropped. Memory stays near one unit (the largest: an embedding or a layer's QKV), not one shard:
``safetensors.torch.save_file`` needs the whole shard in memory plus a serialised copy. The format
(8-byte little-endian header length, JSON header with dtype/shape/data_offsets, raw little-endian
bytes) is safetensors' published one; the files are read back with ``safetensors`` itself in the tests.

Reader: the index (or single ``model.safetensors``) is checked before anything is converted: every
listed file exists and its header parses, every tensor the index names is in its file, data sizes match
the header, and the file is as long as its header says (a truncated file is named).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import HFCheckpointError  # re-export: defined in scidfm_megatron/errors.py

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_TORCH = {v: k for k, v in _DTYPES.items()}
_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


# ------------------------------------------------------------------------------------------ write
@dataclass
class _Shard:
    filename: str
    entries: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # name, dtype, shape
    nbytes: int = 0


def plan_shards(tensors: list[list[tuple[str, tuple[int, ...]]]], dtype: torch.dtype,
                max_shard_bytes: int) -> list[_Shard]:
    """Group conversion units (lists of (name, shape)) into files of at most ``max_shard_bytes`` (a unit is
    never split, so one larger than the limit gets a file of its own). HF file names."""
    code = _DTYPES[dtype]
    shards: list[_Shard] = []
    cur = _Shard("")
    for unit in tensors:
        size = sum(_numel(s) * _SIZE[code] for _, s in unit)
        if cur.entries and cur.nbytes + size > max_shard_bytes:
            shards.append(cur)
            cur = _Shard("")
        cur.entries.extend((n, code, s) for n, s in unit)
        cur.nbytes += size
    if cur.entries:
        shards.append(cur)
    n = len(shards)
    for i, s in enumerate(shards):
        s.filename = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class ShardWriter:
    """Writes one safetensors file whose header is known up front; tensors must come in plan order."""

    def __init__(self, path: Path, shard: _Shard, metadata: Optional[dict] = None):
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        off = 0
        self._expect = []
        for name, code, shape in shard.entries:
            n = _numel(shape) * _SIZE[code]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
            self._expect.append((name, code, tuple(shape)))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._i = 0
        self.path = path

    def write(self, name: str, t: torch.Tensor) -> None:
        want_name, code, shape = self._expect[self._i]
        if name != want_name or tuple(t.shape) != shape or _DTYPES.get(t.dtype) != code:
            raise RuntimeError(f"{self.path.name}: expected {want_name} {code}{list(shape)}, got {name} "
                               f"{t.dtype}{list(t.shape)} (conversion plan and data disagree)")
        # numpy's stubs here do not declare the buffer protocol its arrays implement
        self._f.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))  # type: ignore[arg-type]
        self._i += 1

    def close(self) -> None:
        if self._i != len(self._expect):
            raise RuntimeError(f"{self.path.name}: {len(self._expect) - self._i} planned tensors never written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def write_index(directory: Path, shards: list[_Shard]) -> None:
    if len(shards) == 1:
        return
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
             "weight_map": {n: s.filename for s in shards for n, _, _ in s.entries}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- read
def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFCheckpointError(f"{path}: truncated ({size} bytes; not a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise HFCheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, "
                                    f"file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise HFCheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    return header, 8 + n


class HFCheckpoint:
    """A validated HF folder: ``config.json`` + ``model.safetensors`` or an index with its shards."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise HFCheckpointError(f"{self.dir}: no such directory")
        cfg = self.dir / "config.json"
        if not cfg.exists():
            raise HFCheckpointError(f"{self.dir}: no config.json (is this a Hugging Face model folder?)")
        self.config = json.loads(cfg.read_text())
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFCheckpointError(f"{index}: no weight_map")
        elif (self.dir / "model.safetensors").exists():
            weight_map = None
        else:
            raise HFCheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                                    "(only safetensors checkpoints are supported; convert .bin first)")
        self.location: dict[str, str] = {}
        self.meta: dict[str, dict] = {}
        self.data_start: dict[str, int] = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for fn in files:
            path = self.dir / fn
            if not path.exists():
                listed = sum(1 for v in weight_map.values() if v == fn)
                raise HFCheckpointError(f"{path}: missing shard (the index lists {listed} tensors in it)")
            header, data_start = _read_header(path)
            self.data_start[fn] = data_start
            end = data_start
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                b, e = info["data_offsets"]
                if e - b != _numel(info["shape"]) * _SIZE.get(info["dtype"], 0):
                    raise HFCheckpointError(f"{path}: tensor {name} header size disagrees with its shape")
                end = max(end, data_start + e)
                self.location[name] = fn
                self.meta[name] = info
            if path.stat().st_size < end:
                raise HFCheckpointError(f"{path}: truncated ({path.stat().st_size} bytes, its header needs {end})")
        if weight_map:
            for name, fn in weight_map.items():
                if self.location.get(name) != fn:
                    raise HFCheckpointError(f"{self.dir / fn}: tensor {name!r} is in the index but not in the file")
        self._open: dict[str, Any] = {}  # safetensors' safe_open handles

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name]["shape"])

    def dtype(self, name: str) -> Optional[torch.dtype]:
        return _TORCH.get(self.meta[name]["dtype"])

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor ``name`` straight from its file into ``out`` (contiguous, same dtype and size): one
        plain read, no memory map and no intermediate copy, so memory is ``out`` alone."""
        fn = self.location.get(name)
        if fn is None:
            raise HFCheckpointError(f"{self.dir}: tensor {name!r} is missing")
        info = self.meta[name]
        if _TORCH.get(info["dtype"]) != out.dtype or tuple(info["shape"]) != tuple(out.shape) or \
                not out.is_contiguous():
            raise ValueError(f"read_into {name}: {info['dtype']}{info['shape']} into {out.dtype}{list(out.shape)}")
        b, e = info["data_offsets"]
        # a plain buffer over out's memory (not .numpy(), which would pin the storage's size)
        buf = memoryview((ctypes.c_char * (e - b)).from_address(out.data_ptr())).cast("B")
        with open(self.dir / fn, "rb") as f:
            f.seek(self.data_start[fn] + b)
            if f.readinto(buf) != e - b:
                raise HFCheckpointError(f"{self.dir / fn}: truncated while reading {name}")

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fn = self.location.get(name)
        if fn is None:
            raise HFCheckpointError(f"{self.dir}: tensor {name!r} is missing")
        if fn not in self._open:
            self._open.clear()  # one file open at a time: tensors are requested file by file
            self._open[fn] = safe_open(self.dir / fn, framework="pt")
        return self._open[fn].get_tensor(name)
