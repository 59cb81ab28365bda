"""megatron-core checkpoint (any TP/PP/EP/DP) -> Hugging Face Mixtral folder, streamed.

One process, no model, no process group. For each output file the plan (made from the config before
any tensor is read) lists its conversion units; each unit's megatron tensor is read (one slice of the
checkpoint), mapped by :mod:`.mapping`, appended to the file and dropped. Everything is written into
``DST.tmp-<pid>`` and renamed to ``DST`` only after the last file is complete (and, with ``verify``, once
the parity check passed), so a failed or interrupted conversion leaves nothing at ``DST``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..utils import staged_dir
from . import mapping
from . import tokenizer_files as tokfiles
from .hf_io import ShardWriter, plan_shards, write_index
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


def resolve_tokenizer(ckpt: McoreCheckpoint, tokenizer: Optional[str]) -> tokfiles.Tokenizer:
    """``--tokenizer`` (a folder, a .model file or ``none``), else what the checkpoint records: the
    ``tokenizer.model`` copy a training run keeps in each checkpoint, the ``tokenizer/`` folder of a
    conversion, or the run's ``data.tokenizer_model`` (absolute since recipes' paths are); else none."""
    if tokenizer:
        return tokfiles.inspect(tokenizer)
    rec = ckpt.meta.get("tokenizer")
    if isinstance(rec, dict) and rec.get("file"):  # written by the trainer: a copy inside the checkpoint
        kept = ckpt.dir / rec["file"]
        if kept.is_file():
            return tokfiles.inspect(str(kept))
    elif isinstance(rec, dict):  # written by hf-to-mcore: a folder next to iter_*, or none
        if not rec.get("dir"):
            return tokfiles.NONE
        d = ckpt.dir.parent / rec["dir"]
        if not d.exists():
            raise tokfiles.TokenizerError(f"{d}: the tokenizer folder this checkpoint records is missing; pass "
                                          f"--tokenizer DIR_OR_tokenizer.model (or --tokenizer none)")
        return tokfiles.inspect(d)
    saved = ((ckpt.meta.get("config") or {}).get("data") or {}).get("tokenizer_model")
    if saved:
        if not Path(saved).exists():
            raise tokfiles.TokenizerError(f"{saved}: the run's data.tokenizer_model does not exist (any more); pass "
                                          f"--tokenizer DIR_OR_tokenizer.model (or --tokenizer none for weights only)")
        return tokfiles.inspect(saved)
    return tokfiles.NONE


def token_ids(ckpt: McoreCheckpoint, tok: tokfiles.Tokenizer) -> dict:
    """bos/eos/pad for config.json: those of the imported HF config when this is an import, else the
    tokenizer's; missing ones keep transformers' defaults."""
    if isinstance(ckpt.meta.get("hf_token_ids"), dict):
        return dict(ckpt.meta["hf_token_ids"])
    return {k: v for k, v in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)) if v is not None}


def source_dtype(ckpt: McoreCheckpoint) -> str:
    return "bf16" if any(d == torch.bfloat16 for d in ckpt.dtypes.values()) else "fp32"


def convert_mcore_to_hf(src: str | Path, dst: str | Path, *, dtype: Optional[str] = None,
                        tokenizer: Optional[str] = None, max_shard_size: str | int = "5GB", progress: bool = True,
                        force: bool = False, verify: bool = False, verify_options: Optional[dict] = None) -> Path:
    """Convert; returns ``dst``. ``dtype``: bf16 or fp32, default the checkpoint's (its model weights')."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    from ..config import to_dict

    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; remove it or pass --force")
    ckpt = McoreCheckpoint(src)
    cfg = ckpt.model_config
    mapping.check_mixtral_routing(cfg, str(ckpt.dir / "scidfm_meta.json"))
    why = "--dtype"
    if dtype is None:
        dtype, why = source_dtype(ckpt), "the source's"
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
    tok = resolve_tokenizer(ckpt, tokenizer)
    tok.check_fits(cfg.vocab_size, f"{ckpt.dir / 'scidfm_meta.json'}",
                   "pass the tokenizer this model was trained with (--tokenizer), or --tokenizer none")
    ids = token_ids(ckpt, tok)
    units = [list(zip(m.hf, mapping.hf_shapes(m, cfg), strict=False)) for m in maps]
    shards = plan_shards(units, tdtype, parse_size(max_shard_size))
    unit_of = {m.hf[0]: m for m in maps}
    if progress:
        print(f"[scidfm] mcore->hf {ckpt.dir} -> {dst}: dtype {dtype} ({why})", flush=True)
        print(f"[scidfm] tokenizer: {tok.describe()}", flush=True)

    with staged_dir(dst) as tmp:
        tokfiles.write(tok, tmp, model_max_length=cfg.max_seq_length)
        total = sum(s.nbytes for s in shards)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"mcore->hf {dst.name}", disable=not progress)
        for shard in shards:
            w = ShardWriter(tmp / shard.filename, shard, metadata={"source": "scidfm-megatron"})
            heads = [n for n, _, _ in shard.entries if n in unit_of]
            for name in heads:
                m = unit_of[name]
                t = ckpt.read([m.mcore])[m.mcore]
                for hf_name, hf_t in zip(m.hf, mapping.to_hf(m, t, cfg), strict=False):
                    w.write(hf_name, hf_t.to(tdtype))
                    bar.update(hf_t.numel() * tdtype.itemsize)
                del t
            w.close()
        bar.close()
        write_index(tmp, shards)
        # config.json exactly as transformers writes this model's MixtralConfig; what HF has no name for
        # (capacity factor, vocabulary padding...) goes to a file of its own for the way back.
        mapping.hf_config(cfg, dtype=dtype, token_ids=ids).save_pretrained(tmp)
        (tmp / mapping.SIDECAR).write_text(json.dumps(
            dict(model=to_dict(cfg), source=str(ckpt.dir), iteration=ckpt.meta.get("iteration"),
                 stage=ckpt.meta.get("stage")), indent=2, default=str) + "\n")
        gen = {f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad") if ids.get(k) is not None}
        if tok.eod_id is not None and isinstance(gen.get("eos_token_id"), int) and tok.eod_id != gen["eos_token_id"]:
            # pretraining ends every document with <|eod|>: a base model stops there too
            gen["eos_token_id"] = [gen["eos_token_id"], tok.eod_id]
        GenerationConfig(do_sample=False, max_new_tokens=256, **gen).save_pretrained(tmp)
        if verify:
            from .verify import verify_conversion

            verify_conversion(ckpt.dir, tmp, dtype=dtype, tokenizer=tok, **(verify_options or {}))
    return dst
