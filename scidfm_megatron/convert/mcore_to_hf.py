"""megatron-core checkpoint (any TP/PP/EP/DP) -> Hugging Face Mixtral folder, streamed.

One process, no model, no process group. For each output file the plan (made from the config before
any tensor is read) lists its conversion units; each unit's megatron tensor is read (one slice of the
checkpoint), mapped by :mod:`.mapping`, appended to the file and dropped. Everything is written into
``DST.tmp-<pid>`` and renamed to ``DST`` only after the last file is complete, so a failed or interrupted
conversion leaves nothing at ``DST``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import mapping
from .hf_io import ShardWriter, plan_shards, write_index
from ..utils import staged_dir
from .mcore_io import McoreCheckpoint, McoreCheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def _tokenizer_model(ckpt: McoreCheckpoint, tokenizer: Optional[str]) -> Path:
    if tokenizer:
        p = Path(tokenizer)
        p = p / "tokenizer.model" if p.is_dir() else p
    else:
        saved = ((ckpt.meta.get("config") or {}).get("data") or {}).get("tokenizer_model")
        if not saved:
            raise McoreCheckpointError(f"{ckpt.dir}: the run recorded no data.tokenizer_model; pass --tokenizer")
        p = Path(saved)
    if not p.exists():
        raise McoreCheckpointError(f"tokenizer {p} not found (pass --tokenizer DIR_OR_tokenizer.model)")
    return p


def write_tokenizer(dst: Path, model_file: Path, vocab_limit: int, max_length: int):
    """tokenizer.model (+ science_tokens.json) and the HF tokenizer files; returns the tokenizer."""
    from ..tokenizer.core import ScienceTokenizer
    from ..tokenizer.hf import write_hf_tokenizer_files

    tok = ScienceTokenizer(str(model_file))
    if tok.vocab_size > vocab_limit:
        raise McoreCheckpointError(f"tokenizer {model_file} has {tok.vocab_size} tokens but the model's vocabulary "
                                   f"is {vocab_limit}: wrong tokenizer for this checkpoint")
    shutil.copyfile(model_file, dst / "tokenizer.model")
    inv = model_file.parent / "science_tokens.json"
    if inv.exists():
        shutil.copyfile(inv, dst / "science_tokens.json")
    write_hf_tokenizer_files(dst, tok, model_max_length=max_length)
    return tok


def convert_mcore_to_hf(src: str | Path, dst: str | Path, *, dtype: str = "bf16", tokenizer: Optional[str] = None,
                        max_shard_size: str | int = "5GB", progress: bool = True, force: bool = False) -> Path:
    """Convert; returns ``dst``. ``dtype``: bf16 (the release's) or fp32."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; remove it or pass --force")
    ckpt = McoreCheckpoint(src)
    cfg = ckpt.model_config
    tdtype = DTYPES[dtype]
    maps = mapping.tensor_maps(cfg)
    # Every tensor the config implies must be in the checkpoint with the implied shape, and vice versa:
    # checked up front, by name, before anything is written.
    expected = {m.mcore: m for m in maps}
    missing = sorted(set(expected) - set(ckpt.slices))
    extra = sorted(set(ckpt.slices) - set(expected))
    if missing or extra:
        raise McoreCheckpointError(f"{ckpt.dir}: tensors do not match the model config "
                                   f"(missing: {missing[:4]}, unexpected: {extra[:4]})")
    for m in maps:
        if ckpt.shape(m.mcore) != mapping.mcore_shape(m, cfg):
            raise McoreCheckpointError(f"{ckpt.dir}: {m.mcore} has shape {ckpt.shape(m.mcore)}, the config "
                                       f"({cfg.name}) implies {mapping.mcore_shape(m, cfg)}")
    units = [list(zip(m.hf, mapping.hf_shapes(m, cfg))) for m in maps]
    shards = plan_shards(units, tdtype, parse_size(max_shard_size))
    unit_of = {m.hf[0]: m for m in maps}

    with staged_dir(dst) as tmp:
        tok = write_tokenizer(tmp, _tokenizer_model(ckpt, tokenizer), cfg.vocab_size, cfg.max_seq_length)
        total = sum(s.nbytes for s in shards)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"mcore->hf {dst.name}", disable=not progress)
        for shard in shards:
            w = ShardWriter(tmp / shard.filename, shard, metadata={"source": "scidfm-megatron"})
            heads = [n for n, _, _ in shard.entries if n in unit_of]
            for name in heads:
                m = unit_of[name]
                t = ckpt.read([m.mcore])[m.mcore]
                for hf_name, hf_t in zip(m.hf, mapping.to_hf(m, t, cfg)):
                    w.write(hf_name, hf_t.to(tdtype))
                    bar.update(hf_t.numel() * tdtype.itemsize)
                del t
            w.close()
        bar.close()
        write_index(tmp, shards)
        config = mapping.hf_config_dict(
            cfg, dtype=dtype, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
            extra=dict(source=str(ckpt.dir), iteration=ckpt.meta.get("iteration"), stage=ckpt.meta.get("stage")))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                         do_sample=False, max_new_tokens=256).save_pretrained(tmp)
    return dst
