"""Read slices of a megatron-core dist checkpoint (torch_dist format) in one process, no model built.

A checkpoint written at any TP/PP/EP/DP layout holds each model tensor as chunks of one *global*
tensor whose leading axes are the stacked layers (and experts), e.g.
``decoder.layers.mlp.experts.experts.linear_fc1.weight`` of shape (layers, experts, 2*ffn, hidden).
The chunk index is PyTorch Distributed Checkpoint (DCP) metadata, so a slice -- one layer's one
expert -- is read with DCP's own reader and a small load planner that asks for exactly that region
(``create_read_items_for_chunk_list``). Nothing else is loaded: memory is the requested slices.

megatron-core's ``dist_checkpointing.load`` cannot do this in one process: it insists that the
requested shards of every rank tile each tensor exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner

from ..config import ModelConfig, from_dict
from ..errors import McoreCheckpointError  # re-export: defined in scidfm_megatron/errors.py
from ..model.state_dict import canonical_name

_ITER = re.compile(r"^iter_(\d{7})$")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run's checkpoint root (with ``latest``), a run directory containing ``checkpoints/`` or an
    ``iter_*`` directory -> the ``iter_*`` directory to read."""
    from ..training.checkpoint import find_resume

    p = Path(path)
    if not p.exists():
        raise McoreCheckpointError(f"{p}: no such checkpoint directory")
    if (p / "metadata.json").exists() or _ITER.match(p.name):
        return p
    for root in (p, p / "checkpoints"):
        found = find_resume(root, cleanup=False)
        if found is not None:
            return found
    tmp = sorted(p.glob("iter_*.tmp")) + sorted((p / "checkpoints").glob("iter_*.tmp"))
    hint = f" (only the interrupted save {tmp[-1].name})" if tmp else ""
    raise McoreCheckpointError(f"{p}: no complete megatron checkpoint (iter_XXXXXXX with metadata.json){hint}")


@dataclass(frozen=True)
class _Slice:
    key: str  # DCP / megatron sharded key
    offsets: tuple[int, ...]  # along the prepended (layer, expert) axes
    shape: tuple[int, ...]  # the tensor without the prepended axes


class McoreCheckpoint:
    """A validated checkpoint directory: model config, tensor index and slice reads."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = resolve_checkpoint_dir(path)
        for fn in ("metadata.json", ".metadata"):
            if not (self.dir / fn).exists():
                raise McoreCheckpointError(f"{self.dir}: incomplete checkpoint, {fn} is missing")
        meta_file = self.dir / "scidfm_meta.json"
        if not meta_file.exists():
            raise McoreCheckpointError(f"{meta_file}: missing (it records the model config of the run; "
                                       "checkpoints written by scidfm-megatron have it)")
        self.meta = json.loads(meta_file.read_text())
        try:
            self.model_config: ModelConfig = from_dict(ModelConfig, self.meta["config"]["model"], "model")
        except KeyError:
            raise McoreCheckpointError(f"{meta_file}: no config.model section") from None
        self.reader = FileSystemReader(str(self.dir))
        try:
            self.dcp_meta = self.reader.read_metadata()
        except Exception as exc:  # noqa: BLE001 - report any unreadable metadata by file name
            raise McoreCheckpointError(f"{self.dir / '.metadata'}: unreadable ({exc})") from None
        self._check_files()
        self.slices: dict[str, _Slice] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for key, md in self.dcp_meta.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata) or _is_non_model(key):
                continue
            n_pre = _prepended_axes(key)
            shape = tuple(md.size)
            for off in _offsets(shape[:n_pre]):
                self.slices[canonical_name(key, off)] = _Slice(key, off, shape[n_pre:])
                self.dtypes[canonical_name(key, off)] = md.properties.dtype

    def _check_files(self) -> None:
        need: dict[str, int] = {}
        for info in self.dcp_meta.storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for fn, size in sorted(need.items()):
            f = self.dir / fn
            if not f.exists():
                raise McoreCheckpointError(f"{f}: missing checkpoint shard (listed in {self.dir / '.metadata'})")
            if f.stat().st_size < size:
                raise McoreCheckpointError(f"{f}: truncated ({f.stat().st_size} bytes, the checkpoint index "
                                           f"needs {size})")

    def shape(self, name: str) -> tuple[int, ...]:
        return self._slice(name).shape

    def _slice(self, name: str) -> _Slice:
        s = self.slices.get(name)
        if s is None:
            raise McoreCheckpointError(f"{self.dir}: model tensor {name!r} is not in the checkpoint")
        return s

    def read(self, names: list[str], dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The named global tensors (or per-layer / per-expert slices of stacked ones), one DCP read."""
        import torch.distributed.checkpoint as dcp

        wanted = {}
        for n in names:
            s = self._slice(n)
            wanted[n] = (s, torch.empty((1,) * len(s.offsets) + s.shape, dtype=self.dtypes[n]))
        planner = _SlicePlanner(wanted)
        try:
            dcp.load({}, storage_reader=self.reader, planner=planner, no_dist=True)
        except Exception as exc:
            raise McoreCheckpointError(f"{self.dir}: reading {names[:3]} failed: {exc}") from exc
        return {n: (t.reshape(s.shape) if dtype is None else t.reshape(s.shape).to(dtype))
                for n, (s, t) in wanted.items()}


def _is_non_model(key: str) -> bool:
    return key.startswith(("chained_", "optimizer.")) or "_extra_state" in key or key in ("rng_state",)


def _prepended_axes(key: str) -> int:
    if key.startswith("decoder.layers.mlp.experts.experts."):
        return 2
    return 1 if key.startswith("decoder.layers.") else 0


def _offsets(shape: tuple[int, ...]):
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _offsets(shape[1:]):
            yield (i,) + rest


class _SlicePlanner(DefaultLoadPlanner):
    """DCP load planner that reads chosen regions of stored tensors into given buffers."""

    def __init__(self, wanted: dict[str, tuple[_Slice, torch.Tensor]]):
        super().__init__()
        self.by_key: dict[str, list[tuple[_Slice, torch.Tensor]]] = {}
        for s, t in wanted.values():
            self.by_key.setdefault(s.key, []).append((s, t))

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items = []
        for key, reqs in self.by_key.items():
            md = self.metadata.state_dict_metadata[key]  # type: ignore[union-attr]  # set by set_up_planner
            chunks = [ChunkStorageMetadata(offsets=torch.Size(s.offsets + (0,) * len(s.shape)),
                                           sizes=torch.Size(t.shape)) for s, t in reqs]
            items.extend(create_read_items_for_chunk_list(key, md, chunks))  # type: ignore[arg-type]  # tensors
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.by_key[index.fqn][index.index][1]

    def resolve_tensor(self, read_item):
        t = self.lookup_tensor(read_item.dest_index)
        for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=False)):
            t = t.narrow(dim, o, n)
        return t

    def commit_tensor(self, read_item, tensor):
        pass
