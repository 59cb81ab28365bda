"""Hugging Face Mixtral folder -> megatron-core checkpoint at a chosen TP/PP/EP layout.

The output is what a training run at that layout writes (``iter_0000000/`` in megatron's torch_dist
format, ``latest``, ``scidfm_meta.json`` with the model config), marked weights-only, plus the
tokenizer under ``tokenizer/``. Train or fine-tune from it with ``checkpoint.init_from=DST`` (or put it
in ``checkpoint.save``: a weights-only checkpoint there starts the run from its weights). Like any
checkpoint of this project it also loads at other layouts.

How: ``tp*pp*ep`` processes (gloo on CPU) each build their shard of the model, fill it from the HF
tensors through :mod:`.mapping` -- each global tensor is assembled from its HF tensors one at a time
and only this rank's slice is kept -- and save collectively. So a rank holds its shard plus one global
tensor; the whole model is in memory once, spread over the ranks. Written to ``DST.tmp-<pid>`` and
renamed when complete.

Accepted input: our own conversions, the SciDFM release and any Mixtral checkpoint on disk with
per-expert ``block_sparse_moe.experts.N.w1/w2/w3`` tensors (what transformers writes), or with fused
``mlp.experts.gate_up_proj / down_proj`` tensors.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from . import mapping
from ..utils import staged_dir
from .hf_io import HFCheckpoint, HFCheckpointError


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
    want = {n: s for m in maps for n, s in zip(m.hf, mapping.hf_shapes(m, cfg))}
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


class LazyGlobalState:
    """The global megatron state dict, computed tensor by tensor from HF files on access."""

    def __init__(self, src: HFTensors, cfg):
        self.src, self.cfg = src, cfg
        self.maps = {m.mcore: m for m in mapping.tensor_maps(cfg)}
        self._last: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    def __contains__(self, name) -> bool:
        return name in self.maps

    def __iter__(self):
        return iter(self.maps)

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._last[0] != name:  # SwiGLU fc1 under TP asks twice (w and v halves)
            m = self.maps[name]
            self._last = (None, None)
            self._last = (name, mapping.to_mcore(m, [self.src.get(h) for h in m.hf], self.cfg))
        return self._last[1]


def _worker(argv=None) -> int:
    """One rank of the conversion (run under torchrun by :func:`convert_hf_to_mcore`)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-model", required=True, help="where the tokenizer will be (recorded in the run config)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--dtype", default="fp32")
    a = ap.parse_args(argv)
    from ..config import ParallelConfig, to_dict
    from ..model.builder import build_model_chunks
    from ..model.state_dict import load_global_state_dict
    from ..parallel import destroy_distributed, init_distributed
    from ..training import checkpoint as ckpt

    hf = HFCheckpoint(a.src)
    cfg = mapping.model_config_from_hf(hf.config, str(hf.dir / "config.json"))
    par = ParallelConfig(tp=a.tp, pp=a.pp, ep=a.ep)
    init_distributed(cfg, par)
    chunks = build_model_chunks(cfg, par, precision=a.dtype)
    load_global_state_dict(chunks, LazyGlobalState(HFTensors(hf, cfg), cfg))
    out = Path(a.out)
    common = dict(consumed_samples=0, stage="converted", source=str(hf.dir),
                  config=dict(model=to_dict(cfg), parallel=to_dict(par),
                              data=dict(tokenizer_model=a.tokenizer_model)))
    ckpt.save(out, 0, chunks, None, None, common, keep_last=0, with_optimizer=False)
    destroy_distributed()
    return 0


def convert_hf_to_mcore(src: str | Path, dst: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
                        dtype: Optional[str] = None, force: bool = False, progress: bool = True) -> Path:
    """Convert ``src`` (HF folder) to a megatron checkpoint at ``dst`` for layout TP x PP x EP."""
    from ..config import ParallelConfig
    from ..parallel import validate_layout
    from ..testing.distributed import run_torchrun

    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; remove it or pass --force")
    hf = HFCheckpoint(src)
    cfg = mapping.model_config_from_hf(hf.config, str(hf.dir / "config.json"))
    check_hf_tensors(hf, cfg)
    validate_layout(cfg, ParallelConfig(tp=tp, pp=pp, ep=ep), tp * pp * ep)
    if dtype is None:
        dtype = "bf16" if any(m["dtype"] == "BF16" for m in hf.meta.values()) else "fp32"
    with staged_dir(dst) as tmp:
        if progress:
            print(f"[scidfm] hf->mcore {hf.dir} -> {dst}: {tp * pp * ep} processes (TP{tp} PP{pp} EP{ep}), {dtype}",
                  flush=True)
        run_torchrun("-m", tp * pp * ep, ["scidfm_megatron.convert.hf_to_mcore", "--src", hf.dir, "--out", tmp,
                                          "--tokenizer-model", dst / "tokenizer" / "tokenizer.model",
                                          "--tp", tp, "--pp", pp, "--ep", ep, "--dtype", dtype])
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        for fn in ("tokenizer.model", "science_tokens.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenization_scidfm.py"):
            if (hf.dir / fn).exists():
                shutil.copyfile(hf.dir / fn, tok_dir / fn)
    return dst


if __name__ == "__main__":
    sys.exit(_worker())
