"""A megatron checkpoint as a plain language model in one process: logits, greedy generation, router logits.

For evaluation and conversion checks on models that fit one device (the tiny presets on CPU; on a GPU
the 18B model in bf16 fits an 80 GB card for scoring). The checkpoint may have been saved at any
TP/PP/EP/DP layout: megatron's dist_checkpointing reshards it into this single-rank model. Routing is
dropless by default (``capacity_factor=None``): inference must not drop tokens, and it is what
Hugging Face's Mixtral does, so scores compare across the two.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch


class MegatronLM:
    """A megatron checkpoint of any layout as a single-process language model (dropless by default), so
    evaluation and conversion checks need neither torchrun nor a Hugging Face export."""

    def __init__(self, checkpoint: str | Path, *, capacity_factor: Optional[float] = None,
                 precision: str = "fp32", device=None):
        from .config import ModelConfig, ParallelConfig, from_dict
        from .convert.mcore_io import resolve_checkpoint_dir
        from .model.builder import build_model
        from .parallel import init_distributed
        from .training import checkpoint as ckpt

        self.path = resolve_checkpoint_dir(checkpoint)
        self.meta = ckpt.read_meta(self.path)
        cfg = from_dict(ModelConfig, self.meta["config"]["model"], "model")
        self.config = dataclasses.replace(cfg, moe_capacity_factor=capacity_factor)
        par = ParallelConfig()
        import torch.distributed as dist

        if not dist.is_initialized():
            # One rank with an in-memory store: no TCP port, and no MASTER_PORT/RANK/... left in this
            # process's environment for child processes (e.g. a torchrun launched later) to inherit.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        init_distributed(self.config, par)
        # build_model places the model on the training device (cuda when present); ``device`` moves it.
        self.model = build_model(self.config, par, precision=precision)
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        ckpt.load(self.path, [self.model], weights_only=True)
        self.model.eval()
        kept = ckpt.tokenizer_file(self.path, self.meta)  # the copy a training run keeps in its checkpoints
        tok = str(kept) if kept else (self.meta.get("config", {}).get("data") or {}).get("tokenizer_model")
        self.tokenizer_model = tok

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [batch, seq, vocab] fp32 logits (padding rows of the vocabulary dropped).
        Causal: right padding does not change the logits of the real positions."""
        ids = ids.long().to(self.device)
        pos = torch.arange(ids.shape[1], device=self.device).unsqueeze(0).expand_as(ids)
        out = self.model(ids, pos, None)
        return out[..., : self.config.vocab_size].float().cpu()

    @torch.no_grad()
    def generate_greedy(self, ids: list[int], max_new_tokens: int, eos_id: Optional[int] = None) -> list[int]:
        """Greedy continuation (no KV cache: recomputes the prefix; fine for evaluation-size models)."""
        seq = list(ids)
        for _ in range(max_new_tokens):
            nxt = int(self.logits(torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
        return seq[len(ids):]

    def close(self) -> None:
        from .parallel import destroy_distributed

        destroy_distributed()
