"""Hugging Face Mixtral folder -> weights-only megatron-core checkpoint, streamed in one process with about
one tensor in memory: megatron's own sharded structure (a model on the ``meta`` device) written by PyTorch
DCP's writer through a planner that makes each chunk when asked (docs/conversion.md, "What comes out" and
"How it streams")."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, cast

import torch
from torch.distributed.checkpoint import DefaultSavePlanner

from ..utils import staged_dir
from . import mapping
from . import tokenizer_files as tokfiles
from .hf_io import HFCheckpoint, HFCheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class HFTensors:
    """HF tensors by Mixtral (per-expert) name, also when the file stores fused expert tensors."""

    def __init__(self, ckpt: HFCheckpoint, cfg):
        self.ckpt, self.cfg = ckpt, cfg
        self._fused_cache: dict[str, torch.Tensor] = {}

    def names(self) -> set[str]:
        out = set()
        for n in self.ckpt.location:
            m = mapping._FUSED.match(n)
            if not m:
                out.add(n)
                continue
            layer, kind = m.groups()
            ws = ("w1", "w3") if kind == "gate_up_proj" else ("w2",)
            out.update(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                       for e in range(self.cfg.num_experts) for w in ws)
        return {n.replace(".mlp.gate.", ".block_sparse_moe.gate.") for n in out}

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Tensor ``name`` into ``out``: straight from the file when stored as is, else through a copy."""
        if name in self.ckpt.location and self.ckpt.dtype(name) == out.dtype:
            self.ckpt.read_into(name, out)
        else:
            out.copy_(self.get(name))

    def read(self, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        self.read_into(name, out)
        return out

    def get(self, name: str) -> torch.Tensor:
        if name in self.ckpt.location:
            return self.ckpt.get(name)
        alt = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        if alt in self.ckpt.location:
            return self.ckpt.get(alt)
        parts = name.split(".")  # model.layers.L.block_sparse_moe.experts.E.wX.weight
        if len(parts) == 8 and parts[4] == "experts":
            layer, e, w = parts[2], int(parts[5]), parts[6]
            fused = f"model.layers.{layer}.mlp.experts.{'down_proj' if w == 'w2' else 'gate_up_proj'}"
            if fused in self.ckpt.location:
                if fused not in self._fused_cache:
                    self._fused_cache = {fused: self.ckpt.get(fused)}
                t = self._fused_cache[fused][e]
                if w == "w2":
                    return t
                return t.chunk(2, dim=0)[0 if w == "w1" else 1]
        raise HFCheckpointError(f"{self.ckpt.dir}: tensor {name!r} is missing")


def check_hf_tensors(ckpt: HFCheckpoint, cfg) -> None:
    """Every tensor the config implies, with the implied shape; nothing unexpected. Names the tensor."""
    src = HFTensors(ckpt, cfg)
    have = src.names()
    maps = mapping.tensor_maps(cfg)
    want = {n: s for m in maps for n, s in zip(m.hf, mapping.hf_shapes(m, cfg), strict=False)}
    missing = sorted(set(want) - have)
    extra = sorted(have - set(want) - (set() if cfg.untie_embeddings else {"lm_head.weight"}))
    if missing:
        raise HFCheckpointError(f"{ckpt.dir}: {len(missing)} tensors the config needs are missing, e.g. {missing[:4]}")
    if extra:
        raise HFCheckpointError(f"{ckpt.dir}: {len(extra)} tensors the config does not explain, e.g. {extra[:4]}")
    for n, shape in want.items():
        if n in ckpt.meta and ckpt.shape(n) != tuple(shape):
            raise HFCheckpointError(f"{ckpt.dir / ckpt.location[n]}: {n} has shape {ckpt.shape(n)}, config.json "
                                    f"implies {tuple(shape)}")




# ------------------------------------------------------------------------------ checkpoint structure
@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a megatron sharded tensor: ``region`` of global tensor ``name``."""

    key: str  # megatron sharded key (layers / experts stacked along prepended axes)
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]  # in the stacked tensor
    sizes: tuple[int, ...]
    name: str  # global per-layer / per-expert name (mapping.py's megatron side)
    region: tuple[slice, ...]  # of that global tensor


def megatron_structure(cfg) -> tuple[list[Chunk], dict[str, object]]:
    """The chunks and ``_extra_state`` objects a TP1 x PP1 x EP1 save of this model writes, read from
    megatron's own ``sharded_state_dict()`` of the model built on the meta device (no weights allocated).
    Needs a process group (one rank is enough); the local spec is used (checkpoint keys are the same for
    every backend)."""
    from unittest import mock

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from .. import device as device_module
    from ..config import ParallelConfig
    from ..model.builder import build_model
    from ..model.state_dict import canonical_name

    # build_model ends with ``.to(device())``, which meta tensors refuse: keep them where they are. CPU
    # initialisation, because megatron's GPU path allocates on an explicit CUDA device (past the meta
    # context), and no initialisation: nothing is computed.
    with torch.device("meta"), mock.patch.object(device_module, "device", lambda: torch.device("meta")):
        model = build_model(cfg, ParallelConfig(), precision="fp32", backend="local", use_cpu_initialization=True,
                            perform_initialization=False)
    chunks: list[Chunk] = []
    objects: dict[str, object] = {}
    for obj in nested_values(model.sharded_state_dict()):
        parts = obj.build() if isinstance(obj, ShardedTensorFactory) else obj
        for st in (nested_values(parts) if isinstance(parts, (dict, list)) else [parts]):
            if isinstance(st, ShardedObject):
                objects[st.unique_key] = st.data
                continue
            if not isinstance(st, ShardedTensor):
                raise TypeError(f"unexpected entry in megatron's sharded state dict: {type(st).__name__}")
            if st.flattened_range is not None or any(st.replica_id if isinstance(st.replica_id, tuple)
                                                     else (st.replica_id,)):
                raise RuntimeError(f"{st.key}: not a main-replica, unflattened shard at TP1 x PP1 x EP1")
            p = st.prepend_axis_num
            name = canonical_name(st.key, tuple(st.global_offset[:p]))
            region = tuple(slice(o, o + n) for o, n in zip(st.global_offset[p:], st.local_shape, strict=False))
            chunks.append(Chunk(st.key, tuple(st.global_shape), tuple(st.global_offset),
                                (1,) * p + tuple(st.local_shape), name, region))
    return chunks, objects


class StreamingSavePlanner(DefaultSavePlanner):
    """A DCP save planner over chunks that do not exist yet: ``resolve_data`` makes each one when the
    writer asks for it (DCP's single-threaded writer asks in plan order and drops each after writing)."""

    def __init__(self, chunks: list[Chunk], objects: dict, make_unit, dtype: torch.dtype):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = {(c.key, c.offsets): c for c in chunks}
        self.objects = objects
        self.make_unit, self.dtype = make_unit, dtype
        self._unit: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

        items = [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self.objects]
        for c in self.chunks.values():
            items.append(WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=self.dtype), size=torch.Size(c.global_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if fqn in self.objects:  # megatron stores a ShardedObject as torch.save([data]) (its torch strategy)
            buf = io.BytesIO()
            torch.save([self.objects[fqn]], buf)
            buf.seek(0)
            return buf
        c = self.chunks[(fqn, tuple(write_item.index.offset))]
        if self._unit[0] != c.name:  # the SwiGLU halves of one fc1 come one after the other
            prev, self._unit = self._unit[1], (None, None)
            if prev is not None:
                # DCP's writer (torch 2.13 filesystem._write_files_from_queue) keeps every tensor it wrote
                # in a dict, which only its safetensors format reads: the first, largest unit (the
                # embedding) would stay in memory to the end. The writer asks for the next chunk only
                # after the previous one is on disk, so the previous unit's memory can go now.
                prev.untyped_storage().resize_(0)
            self._unit = (c.name, self.make_unit(c.name))
        return cast(torch.Tensor, self._unit[1])[c.region].reshape(c.sizes)


def _unit_maker(src: HFTensors, cfg, dtype: torch.dtype):
    """name -> the global megatron tensor, read from the HF files with at most one extra buffer."""
    maps = {m.mcore: m for m in mapping.tensor_maps(cfg)}

    def make(name: str) -> torch.Tensor:
        m = maps[name]
        shapes = mapping.hf_shapes(m, cfg)
        if m.kind == "vocab":  # padding rows zero, real rows read in place
            out = torch.zeros(mapping.mcore_shape(m, cfg), dtype=dtype)
            src.read_into(m.hf[0], out[: cfg.vocab_size])
        elif m.kind == "fc1":  # [w1; w3]
            out = torch.empty(mapping.mcore_shape(m, cfg), dtype=dtype)
            f = shapes[0][0]
            src.read_into(m.hf[0], out[:f])
            src.read_into(m.hf[1], out[f:])
        elif m.kind == "copy":
            out = src.read(m.hf[0], dtype, shapes[0])
        else:
            out = mapping.to_mcore(m, [src.read(h, dtype, s) for h, s in zip(m.hf, shapes, strict=False)], cfg)
        return out

    return make


def _single_rank_group():
    """A one-rank gloo group in memory (no port, nothing left in the environment), as MegatronLM does."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def write_checkpoint(hf: HFCheckpoint, cfg, out_iter: Path, dtype: torch.dtype, common: dict) -> None:
    """Write the megatron checkpoint directory ``out_iter`` (an ``iter_*`` dir) from the HF folder."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import FileSystemWriter

    from ..config import ParallelConfig
    from ..parallel import destroy_distributed, init_distributed

    _single_rank_group()
    try:
        init_distributed(cfg, ParallelConfig())
        chunks, objects = megatron_structure(cfg)
    finally:
        destroy_distributed()
    names = {c.name for c in chunks}
    want = {m.mcore for m in mapping.tensor_maps(cfg)}
    if names != want:  # the tables and megatron's model must describe the same tensors
        raise RuntimeError(f"megatron's model and the mapping tables disagree: only in megatron "
                           f"{sorted(names - want)[:4]}, only in the tables {sorted(want - names)[:4]}")
    out_iter.mkdir(parents=True)
    planner = StreamingSavePlanner(chunks, objects, _unit_maker(HFTensors(hf, cfg), cfg, dtype), dtype)
    writer = FileSystemWriter(str(out_iter), single_file_per_rank=True, sync_files=True, thread_count=1)
    dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    # What megatron's dist_checkpointing.save writes beside the DCP files: the backend config and the
    # common (non-sharded) state; then this project's meta file, as training/checkpoint/directory.py defines it.
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(out_iter))
    torch.save({"common": common}, out_iter / "common.pt")
    (out_iter / "scidfm_meta.json").write_text(json.dumps(common, indent=1, default=str))


def source_dtype(hf: HFCheckpoint) -> tuple[str, str]:
    """The output dtype that keeps the source's values, and why."""
    codes = {m["dtype"] for m in hf.meta.values()}
    if "BF16" in codes:
        return "bf16", "the source's"
    if "F16" in codes:
        return "fp32", "the source is fp16: widened to fp32, lossless"
    return "fp32", "the source's"


def convert_hf_to_mcore(src: str | Path, dst: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
                        dtype: Optional[str] = None, force: bool = False, progress: bool = True,
                        verify: bool = False, verify_options: Optional[dict] = None) -> Path:
    """Convert ``src`` (HF folder) to a weights-only megatron checkpoint at ``dst``. ``tp/pp/ep``: the
    layout it is meant for (checked against the model, recorded). ``dtype``: default the source's."""
    from ..config import ParallelConfig, to_dict
    from ..parallel import validate_layout

    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; remove it or pass --force")
    hf = HFCheckpoint(src)
    cfg = mapping.model_config_from_hf(hf.config, str(hf.dir / "config.json"), saved=_sidecar_model(hf.dir))
    check_hf_tensors(hf, cfg)
    par = ParallelConfig(tp=tp, pp=pp, ep=ep)
    validate_layout(cfg, par, tp * pp * ep)
    tok = tokfiles.in_folder(hf.dir)
    tok.check_fits(cfg.vocab_size, f"vocab_size in {hf.dir / 'config.json'}",
                   "is this the model's own tokenizer? (without tokenizer files the import is weights-only)")
    why = "--dtype"
    if dtype is None:
        dtype, why = source_dtype(hf)
    say = print if progress else (lambda *a, **k: None)
    say(f"[scidfm] hf->mcore {hf.dir} -> {dst}: dtype {dtype} ({why}); layout TP{tp} PP{pp} EP{ep} recorded",
        flush=True)
    say(f"[scidfm] tokenizer: {tok.describe()}", flush=True)
    final_tok = (dst.resolve() / "tokenizer" / "tokenizer.model") if any(
        f.name == "tokenizer.model" for f in tok.files) else None
    common = dict(consumed_samples=0, stage="converted", source=str(hf.dir),
                  config=dict(model=to_dict(cfg), parallel=to_dict(par),
                              data=dict(tokenizer_model=str(final_tok) if final_tok else None)),
                  tokenizer=dict(kind=tok.kind, dir="tokenizer" if tok.kind != "none" else None),
                  hf_token_ids={k: hf.config.get(f"{k}_token_id") for k in ("bos", "eos", "pad")
                                if f"{k}_token_id" in hf.config},
                  iteration=0, layout=dict(world=tp * pp * ep, tp=tp, pp=pp, ep=ep), weights_only=True)
    with staged_dir(dst) as tmp:
        write_checkpoint(hf, cfg, tmp / "iter_0000000", DTYPES[dtype], common)
        (tmp / "latest").write_text("0")
        tokfiles.write(tok, tmp / "tokenizer", model_max_length=cfg.max_seq_length, hf_files=False)
        if verify:
            from .verify import verify_conversion

            verify_conversion(tmp, hf.dir, dtype=dtype, tokenizer=tok, **(verify_options or {}))
    return dst


def _sidecar_model(d: Path) -> Optional[dict]:
    f = d / mapping.SIDECAR
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text()).get("model")
    except ValueError as exc:
        raise HFCheckpointError(f"{f}: unreadable ({exc})") from None
