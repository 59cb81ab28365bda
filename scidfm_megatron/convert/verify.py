"""``scidfm-convert --verify``: the converted model computes what its source computes, checked on real text.

Both sides run the same token batch: the megatron checkpoint through megatron-core (loaded with its own
``dist_checkpointing`` into a one-process model, :class:`scidfm_megatron.inference.MegatronLM`, dropless
routing) and the Hugging Face folder through ``transformers``' ``MixtralForCausalLM``. Forward hooks record
each decoder layer's output and each router's top-k expert choice. Compared per layer: max / mean
|difference| of the hidden states (relative to the layer's largest activation) and the share of tokens
whose top-k expert set is the same; then the logits. The first layer beyond the tolerance of the dtype is
named; a pass prints the table.

Cost is bounded: one batch of ``batch x tokens`` tokens (default 2 x 64), and the two models are loaded
one after the other (megatron first, its activations kept, then freed), so the peak is one model plus
the recorded activations (layers x tokens x hidden), not two models.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import VerifyError  # re-export: defined in scidfm_megatron/errors.py
from . import tokenizer_files as tokfiles

# A fixed paragraph of real scientific prose (written for this check) with a molecule span: what the
# batch is made of when the conversion carries a tokenizer.
SCIENCE_TEXT = (
    "Photosynthesis converts light energy into chemical energy. In the thylakoid membranes of the "
    "chloroplast, photosystem II absorbs photons and uses their energy to split water into oxygen, protons "
    "and electrons. The electrons pass along a transport chain to photosystem I, and the proton gradient "
    "built across the membrane drives ATP synthase. In the Calvin cycle, the enzyme RuBisCO fixes carbon "
    "dioxide onto ribulose-1,5-bisphosphate; the products are reduced with NADPH to glyceraldehyde "
    "3-phosphate, from which the cell builds glucose and starch. Caffeine, "
    "[START_I_SMILES]CN1C=NC2=C1C(=O)N(C(=O)N2C)C[END_I_SMILES], is a purine alkaloid that blocks adenosine "
    "receptors; its molar mass is 194.19 g/mol and it dissolves well in hot water. Enzymes lower the "
    "activation energy of a reaction without changing its equilibrium constant, and the Michaelis-Menten "
    "equation relates the initial rate to the substrate concentration through Vmax and Km."
)

# Tolerances by dtype. Hidden states and logits: max |diff| <= rtol x the layer's max |value| (over tokens
# routed alike, see compare); router: share of tokens with the same top-k expert set >= topk_min. Measured
# on the trained scidfm-tiny (docs/conversion.md): fp32 <= 3.5e-7 relative, 100% agreement; bf16 <= 8e-3
# relative (logits 6e-3), 98.4-100% agreement.
TOLERANCES = {
    "fp32": dict(rtol=1e-4, topk_min=0.99),
    "bf16": dict(rtol=3e-2, topk_min=0.90),
}


@dataclass
class Trace:
    """What one model computed on the sample ids, compared layer by layer between the two sides of a conversion."""
    hidden: list[torch.Tensor]  # per layer, [batch, seq, hidden] fp32
    topk: list[torch.Tensor]  # per layer, [batch * seq, k] expert ids, sorted per token
    logits: torch.Tensor  # [batch, seq, vocab] fp32
    model_class: str = ""  # what ran: the model's class and its parameters' device
    device: str = ""


def sample_ids(tok: tokfiles.Tokenizer, vocab: int, batch: int, tokens: int) -> tuple[torch.Tensor, str]:
    """[batch, tokens] ids of the built-in paragraph (repeated if needed) and a description; pseudo-random
    ids when there is no tokenizer."""
    ids = tokfiles.encode(tok, SCIENCE_TEXT)
    if not ids:
        g = torch.Generator().manual_seed(0)
        why = "no tokenizer" if ids is None else "the tokenizer encodes the paragraph to nothing"
        return torch.randint(0, vocab, (batch, tokens), generator=g), f"pseudo-random token ids ({why})"
    flat = list(ids)
    while len(flat) < batch * tokens:
        flat += ids
    out = torch.tensor(flat[: batch * tokens]).view(batch, tokens)
    if int(out.max()) >= vocab:
        raise VerifyError(f"the tokenizer emits id {int(out.max())} but the model's vocabulary is {vocab}")
    return out, "the built-in science paragraph"


def megatron_trace(mcore_dir: Path, ids: torch.Tensor, precision: str, device=None) -> Trace:
    from ..inference import MegatronLM

    lm = MegatronLM(mcore_dir, precision=precision, device=device)
    hidden, topk, hooks = [], [], []
    b, s = ids.shape
    try:
        k = lm.config.moe_router_topk
        for layer in lm.model.decoder.layers:
            # TransformerLayer -> (hidden [s, b, h], context); router -> (probs, routing_map [s*b, experts])
            hooks.append(layer.register_forward_hook(
                lambda _m, _i, out: hidden.append(out[0].detach().float().transpose(0, 1).cpu())))
            hooks.append(layer.mlp.router.register_forward_hook(
                lambda _m, _i, out: topk.append(_choices(out[1], k).view(s, b, k).transpose(0, 1).reshape(b * s, k))))
        logits = lm.logits(ids)
        ran = (type(lm.model).__name__, str(next(lm.model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        lm.close()
        del lm
        gc.collect()
    return Trace(hidden, topk, logits, *ran)


def _choices(routing_map: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [tokens, experts] routing map -> [tokens, k] chosen expert ids, ascending."""
    if not bool((routing_map.sum(-1) == k).all()):
        raise VerifyError(f"megatron's router did not choose exactly {k} experts per token (tokens dropped?)")
    return routing_map.float().topk(k, dim=-1).indices.sort(dim=-1).values.cpu()


def hf_trace(hf_dir: Path, ids: torch.Tensor, dtype: torch.dtype, device=None) -> Trace:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    if device is not None:
        model.to(device)
    hidden, topk, hooks = [], [], []
    try:
        for layer in model.model.layers:
            hooks.append(layer.register_forward_hook(lambda _m, _i, out: hidden.append(
                (out[0] if isinstance(out, tuple) else out).detach().float().cpu())))
            # MixtralTopKRouter -> (router_logits, scores, top-k indices [tokens, k])
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda _m, _i, out: topk.append(out[2].sort(dim=-1).values.cpu())))
        with torch.no_grad():
            logits = model(ids.to(next(model.parameters()).device)).logits.float().cpu()
        ran = (type(model).__name__, str(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        del model
        gc.collect()
    return Trace(hidden, topk, logits, *ran)


def compare(ref: Trace, got: Trace, dtype: str) -> tuple[list[dict], Optional[str]]:
    """Rows per layer (+ logits) and the first disagreement (None when all within tolerance).

    A token whose router picks a different expert set (a near-tie flipped by rounding, which bf16 does
    now and then) gets a different expert's output from then on: its router disagreement is what the
    top-k agreement counts, and the hidden-state and logit maxima are taken over the tokens routed alike
    in every layer so far (means over all tokens)."""
    tol = TOLERANCES[dtype]
    rows: list[dict[str, Any]] = []
    first: Optional[str] = None
    if len(ref.hidden) != len(got.hidden) or len(ref.topk) != len(got.topk):
        return rows, f"layer count differs: {len(ref.hidden)} vs {len(got.hidden)}"
    alike = torch.ones(ref.logits.shape[:2], dtype=torch.bool)
    for i, (a, b, ta, tb) in enumerate(zip(ref.hidden, got.hidden, ref.topk, got.topk, strict=False)):
        same = (ta == tb).all(-1).view(alike.shape)
        alike &= same
        d = (a - b).abs()
        scale = a.abs().max().item()
        row: dict[str, Any] = dict(layer=str(i), max=d[alike].max().item() if alike.any() else float("inf"),
                                   mean=d.mean().item(), scale=scale, agree=same.float().mean().item())
        rows.append(row)
        if first is None:
            if row["max"] > tol["rtol"] * scale:
                first = (f"layer {i} disagrees: hidden-state max |diff| {row['max']:.3g} > {tol['rtol']:g} x "
                         f"max |h| {scale:.3g}, router top-k agreement {row['agree']:.1%}")
            elif row["agree"] < tol["topk_min"]:
                first = f"layer {i} disagrees: router top-k agreement {row['agree']:.1%} < {tol['topk_min']:.0%}"
    d = (ref.logits - got.logits).abs()
    scale = ref.logits.abs().max().item()
    row = dict(layer="logits", max=d[alike].max().item() if alike.any() else float("inf"), mean=d.mean().item(),
               scale=scale, agree=None)
    rows.append(row)
    if first is None and row["max"] > tol["rtol"] * scale:
        first = (f"final norm / output layer disagree: logits max |diff| {row['max']:.3g} > {tol['rtol']:g} x "
                 f"max |logit| {scale:.3g}")
    return rows, first


def verify_conversion(mcore_dir: str | Path, hf_dir: str | Path, *, dtype: str, tokenizer: tokfiles.Tokenizer,
                      tokens: int = 64, batch: int = 2, device=None, say: Callable = print) -> list[dict]:
    """Compare the megatron checkpoint ``mcore_dir`` with the HF folder ``hf_dir``; raise
    :class:`VerifyError` naming the first layer beyond the tolerance of ``dtype``."""
    import json

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    vocab = int(config["vocab_size"])
    ids, what = sample_ids(tokenizer, vocab, batch, tokens)
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tol = TOLERANCES[dtype]
    say(f"[scidfm] verify: {batch} x {tokens} tokens of {what}, {dtype}; tolerance: hidden and logits max |diff| "
        f"<= {tol['rtol']:g} x max |value|, router top-k agreement >= {tol['topk_min']:.0%}", flush=True)
    ref = megatron_trace(Path(mcore_dir), ids, dtype, device)
    got = hf_trace(Path(hf_dir), ids, tdtype, device)
    rows, first = compare(ref, got, dtype)
    say(f"  {'layer':>7}  {'max|diff|':>10}  {'mean|diff|':>10}  {'max|value|':>10}  {'top-k agree':>11}"
        "   (max over tokens routed alike so far, mean over all)")
    for r in rows:
        agree = f"{r['agree']:.1%}" if r["agree"] is not None else ""
        say(f"  {r['layer']:>7}  {r['max']:10.3g}  {r['mean']:10.3g}  {r['scale']:10.3g}  {agree:>11}")
    if first:
        raise VerifyError(f"verify failed, {first}")
    say("[scidfm] verify: PASS (megatron and Hugging Face agree within the tolerance)", flush=True)
    return rows
