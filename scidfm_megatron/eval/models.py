"""The two model back-ends of the evaluation harness, behind one small interface.

``LanguageModel`` is what tasks use: ``loglikelihood`` of continuations (multiple choice, yes/no) and
greedy ``generate`` (math, molecules, proteins). Both back-ends tokenize with the project's science
tokenizer (the converted Hugging Face tokenizer gives the same ids, tested), so a megatron checkpoint
and its conversion see identical token sequences and their scores are comparable.

* :class:`HFModel`: a Hugging Face folder through transformers (``MixtralForCausalLM``).
* :class:`MegatronModel`: a megatron checkpoint (any layout it was saved at) in one process, through
  :class:`scidfm_megatron.inference.MegatronLM` (dropless routing).

:func:`load_model` tells them apart (``config.json`` = Hugging Face).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch


class LanguageModel:
    """Subclasses implement ``_logits(ids [b, s]) -> [b, s, vocab]``; the rest is shared."""

    tokenizer: Any = None  # ScienceTokenizer, or PlainSentencePieceTokenizer (tokenizer/plain.py)
    max_length: int = 2048

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self.tokenizer.encode(text, allow_special=True, bos=bos)

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
        """Sum of log p(continuation | context) per (context ids, continuation ids), batched with right
        padding (causal: padding does not change real positions). Long contexts keep their tail."""
        out: list[float] = [0.0] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = []
            for i in idx:
                ctx, cont = requests[i]
                if not cont:
                    raise ValueError("empty continuation")
                full = (list(ctx) + list(cont))[-(self.max_length + 1):]
                seqs.append((full, len(cont)))
            width = max(len(s) - 1 for s, _ in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            for r, (s, _) in enumerate(seqs):
                ids[r, : len(s) - 1] = torch.tensor(s[:-1])
            logp = torch.log_softmax(self._logits(ids).float(), dim=-1)
            for r, (i, (s, n)) in enumerate(zip(idx, seqs, strict=False)):
                tgt = torch.tensor(s[-n:])
                pos = torch.arange(len(s) - 1 - n, len(s) - 1)
                out[i] = float(logp[r, pos, tgt].sum())
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
                 batch_size: int = 8) -> list[list[int]]:
        """Greedy continuation of each prompt until a stop id (kept out of the result) or the budget."""
        stop = set(stop_ids)
        results = []
        keep = max(1, self.max_length - max_new_tokens)
        for p in prompts:
            seq = list(p)[-keep:]
            new: list[int] = []
            for _ in range(max_new_tokens):
                nxt = int(self._logits(torch.tensor([seq]))[0, -1].argmax())
                if nxt in stop:
                    break
                new.append(nxt)
                seq = (seq + [nxt])[-self.max_length:]
            results.append(new)
        return results

    def close(self) -> None:
        pass


def _science_tokenizer(path: Path):
    """The model's tokenizer: the science tokenizer, or a plain SentencePiece model (raw prompts only)."""
    from ..tokenizer.plain import load_tokenizer

    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} not found")
    return load_tokenizer(str(path))


class HFModel(LanguageModel):
    """A Hugging Face folder scored through transformers, tokenized by the project's own tokenizer code (science
    or plain SentencePiece), so it sees the same ids as the megatron checkpoint it came from."""

    def __init__(self, directory: str | Path, dtype: str = "float32", device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.dir = Path(directory)
        model = AutoModelForCausalLM.from_pretrained(self.dir, dtype=getattr(torch, dtype))
        # transformers types PreTrainedModel.to through functools.wraps, as if unbound (wants the model first)
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        self.device = device
        self.tokenizer = _science_tokenizer(self.dir / "tokenizer.model")
        self.vocab_size = self.model.config.vocab_size
        self.max_length = int(self.model.config.max_position_embeddings)

    def _logits(self, ids):
        return self.model(ids.to(self.device)).logits[..., : self.vocab_size].cpu()

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, stop_ids=(), batch_size=8):
        """transformers' own greedy decoding (KV cache), left-padded batches."""
        results = []
        stop = list(stop_ids)
        pad = self.tokenizer.pad_id
        for start in range(0, len(prompts), batch_size):
            keep = max(1, self.max_length - max_new_tokens)  # prompt tail that leaves room for the answer
            chunk = [list(p)[-keep:] for p in prompts[start:start + batch_size]]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=stop or None, pad_token_id=pad)
            for r in range(len(chunk)):
                new = out[r, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
                results.append(new[:cut])
        return results


class MegatronModel(LanguageModel):
    """A megatron checkpoint scored in one process (:class:`~scidfm_megatron.inference.MegatronLM`), so a
    checkpoint and its conversion are evaluated the same way."""

    def __init__(self, checkpoint: str | Path, tokenizer: Optional[str] = None):
        from ..inference import MegatronLM

        self.lm = MegatronLM(checkpoint)
        tok = Path(tokenizer) if tokenizer else Path(self.lm.tokenizer_model or "")
        self.tokenizer = _science_tokenizer(tok / "tokenizer.model" if tok.is_dir() else tok)
        self.max_length = self.lm.config.max_seq_length
        self.model = self.lm.model

    def _logits(self, ids):
        return self.lm.logits(ids)

    def close(self):
        self.lm.close()


def load_model(path: str | Path, tokenizer: Optional[str] = None, device: str = "cpu") -> LanguageModel:
    p = Path(path)
    if (p / "config.json").exists():
        return HFModel(p, device=device)
    return MegatronModel(p, tokenizer=tokenizer)
