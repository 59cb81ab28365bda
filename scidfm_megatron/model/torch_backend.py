"""The ``torch`` backend (``model.backend: torch``): megatron-core modules on PyTorch's own fused kernels,
with the ``local`` spec's checkpoint keys and shapes: padded SDPA attention, grouped-GEMM experts, RMSNorm
(docs/kernels.md, "model.backend: torch")."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F


def padded_head_dim(d: int, multiple: int = 8) -> int:
    """The head dimension the fused kernels accept: the next multiple of ``multiple``."""
    return -(-d // multiple) * multiple


def sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA on [b, heads, s, d] tensors whose head_dim ``d`` is zero-padded to a multiple of 8 for the kernel
    and sliced back after. ``scale`` defaults to 1/sqrt(d), the *real* head_dim. ``attn_mask`` is SDPA's
    (boolean: True = attend). Key/value heads must already match the query heads."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pad = padded_head_dim(d) - d
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale)
    return out[..., :d] if pad else out


# aten ops that SDPA dispatches to, by kernel (scaled_dot_product_attention itself is a composite: a dispatch
# mode sees the op of the kernel it chose; the math path decomposes into plain ops).
_SDPA_OPS = (("_scaled_dot_product_flash_attention_for_cpu", "cpu-flash"),
             ("_scaled_dot_product_flash_attention", "flash"),
             ("_flash_attention_forward", "flash"), ("_scaled_dot_product_cudnn_attention", "cudnn"),
             ("_scaled_dot_product_efficient_attention", "efficient"), ("_efficient_attention_forward", "efficient"))


def sdpa_kernel_of(fn) -> str:
    """Run ``fn()`` and name the SDPA kernel it took: "flash", "cudnn", "efficient" (CUDA), "cpu-flash"
    (PyTorch's fused CPU kernel) or "math" (the unfused path: s x s scores materialised)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kernels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
            for op, kernel in _SDPA_OPS:
                if name == op:
                    self.kernels.append(kernel)
                    break
            return func(*args, **(kwargs or {}))

    with _Spy() as spy:
        fn()
    return spy.kernels[0] if spy.kernels else "math"


def sdpa_kernel_taken(heads: int, head_dim: int, *, device=None, dtype=None, masked: bool = False,
                      seq: int = 256) -> str:
    """The kernel :func:`sdpa_padded` takes here for [1, heads, seq, head_dim] (causal, or with a boolean
    document mask): one small forward + backward on ``device`` (default: CUDA if present) in ``dtype``
    (default bf16 on CUDA, fp32 on CPU). What the first log line of a run names."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)  # the run's own random streams stay untouched
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=dev, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    mask = torch.ones(seq, seq, dtype=torch.bool, device=dev).tril() if masked else None

    def run():
        sdpa_padded(q, k, v, attn_mask=mask, is_causal=not masked).sum().backward()

    return sdpa_kernel_of(run)


def _attention_class():
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.utils import divide

    class PaddedSDPAttention(MegatronModule):
        """Core attention for megatron-core's ``SelfAttention`` (the ``core_attention`` submodule): the
        constructor and forward signature of megatron's ``DotProductAttention``; q/k/v [s, b, heads, d] ->
        context [s, b, heads * d]. See the module docstring."""

        def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                     attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                     cp_comm_type: Optional[str] = None, pg_collection=None):
            super().__init__(config=config)
            if config.context_parallel_size != 1:
                raise ValueError("model.backend torch: context parallelism is not supported by its attention")
            if config.softmax_type != "vanilla" or config.window_size is not None:
                raise ValueError("model.backend torch: only plain softmax attention without a window")
            if config.apply_query_key_layer_scaling:
                raise ValueError("model.backend torch: apply_query_key_layer_scaling (fp16 only) is not supported")
            if pg_collection is None:
                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
            tp = pg_collection.tp.size()
            self.layer_number = max(1, layer_number)
            self.attn_mask_type = attn_mask_type
            self.attention_type = attention_type
            self.head_dim = config.kv_channels
            self.heads = divide(config.num_attention_heads, tp)
            self.groups = divide(config.num_query_groups, tp)
            self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
            self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is not None or attention_bias is not None:
                raise NotImplementedError("PaddedSDPAttention: packed_seq_params / attention_bias (use the "
                                          "document attention_mask for packed sequences)")
            s, b = query.shape[0], query.shape[1]
            # [s, b, n, d] -> [b, n, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            if self.heads != self.groups:  # GQA: each key/value head serves heads/groups query heads
                k = k.repeat_interleave(self.heads // self.groups, dim=1)
                v = v.repeat_interleave(self.heads // self.groups, dim=1)
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            if attention_mask is None:
                mask, causal = None, mask_type == AttnMaskType.causal
            else:
                # megatron: True = masked out; SDPA: True = attend. [b or 1, 1, s, s] broadcasts over heads.
                mask, causal = ~attention_mask, False
            p = self.dropout_p if self.training else 0.0
            if p > 0.0 and not self.config.sequence_parallel:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    out = sdpa_padded(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                                      dropout_p=p)
            else:
                out = sdpa_padded(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale, dropout_p=p)
            # [b, n, s, d] -> [s, b, n * d]
            return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)

    return PaddedSDPAttention


GROUPED_MM_MIN_CAPABILITY = (8, 0)  # bf16 tensor cores: A100/A800 (the paper's) and newer


def _grouped_mm_probe(device: torch.device, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm`` runs forward and backward here and equals the per-expert loop (bf16 rounding,
    2e-2 of each tensor's scale) on a small case with an empty and an unaligned group. A torch without a
    kernel for this device (or without the backward, as on the CPU) answers False: the loop is used."""
    g = torch.Generator(device=device).manual_seed(0)
    counts = [5, 0, 19, 16]
    x = torch.randn(sum(counts), 64, device=device, dtype=dtype, generator=g)
    ws = [torch.randn(32, 64, device=device, dtype=dtype, generator=g) / 8 for _ in counts]
    try:
        res = []
        for grouped in (True, False):
            xx = x.clone().requires_grad_()
            ww = [w.clone().requires_grad_() for w in ws]
            out = grouped_linear(xx, ww, counts, grouped=grouped)
            out.float().square().mean().backward()
            res.append([out.float(), xx.grad.float(), *(w.grad.float() for w in ww)])  # type: ignore[union-attr]
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    for a, b in zip(*res, strict=False):
        scale = float(b.abs().max())
        if scale > 0 and float((a - b).abs().max()) > 2e-2 * scale:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm`` for the experts: CUDA, bf16, compute capability 8.0+ (A100/A800 as well as
    H100: this torch's kernel, not only sm90's), and only where a one-time probe shows that it runs forward
    and backward and equals the loop (:func:`_grouped_mm_probe`). Cached per device and dtype."""
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if tuple(torch.cuda.get_device_capability(device)) < GROUPED_MM_MIN_CAPABILITY:
        return False
    return _grouped_mm_probe(device, dtype)


def grouped_mm_decision(device=None, dtype=None) -> str:
    """What the ``torch`` backend's experts use here, for the log: "torch._grouped_mm" or "per-expert loop"
    (the run's device; bf16 on CUDA)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return "torch._grouped_mm" if _grouped_mm_supported(dev, dtype) else "per-expert loop"


GROUP_ALIGN = 16  # rows per expert group in the grouped GEMM are padded to a multiple of this


def _aligned_rows(counts: tuple, padded: tuple, device) -> torch.Tensor:
    """Row of each token in the padded layout where expert i's group starts at sum(padded[:i])."""
    parts, p = [], 0
    for c, pc in zip(counts, padded, strict=False):
        parts.append(torch.arange(p, p + c))
        p += pc
    return torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.long, device=device)


def grouped_linear(x: torch.Tensor, weights: list, counts: list, offsets: Optional[torch.Tensor] = None,
                   grouped: Optional[bool] = None) -> torch.Tensor:
    """Rows of ``x`` grouped by expert (``counts[i]`` rows for expert i, in order) times each expert's
    weight transposed (``weights[i]`` is [out, in], a linear layer's weight): [sum(counts), out].

    ``grouped`` (default: where supported) takes one ``torch._grouped_mm`` over all experts; otherwise one
    matmul per expert (the exact reference: what megatron's per-expert linear layers compute).
    ``offsets``: the cumulative row counts as an int32 tensor on x's device (built once per forward)."""
    if grouped is None:
        grouped = _grouped_mm_supported(x.device, x.dtype)
    if grouped:
        w = torch.stack(weights).transpose(1, 2)  # [E, in, out], column-major as the kernel wants
        padded = [-(-c // GROUP_ALIGN) * GROUP_ALIGN for c in counts]
        if padded == list(counts):
            if offsets is None:
                offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
            return torch._grouped_mm(x, w, offs=offsets)
        # Every group starts at a multiple of GROUP_ALIGN rows (the weight-gradient GEMM runs over the token
        # dimension, which the kernel wants aligned; torchtitan pads the same way): zero rows, exact.
        rows = _aligned_rows(tuple(counts), tuple(padded), x.device)
        xp = x.new_zeros(sum(padded), x.shape[1]).index_copy(0, rows, x)
        offs = torch.tensor(padded, device=x.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(xp, w, offs=offs).index_select(0, rows)
    parts = torch.split(x, counts)
    return torch.cat([torch.matmul(p, w.t()) for p, w in zip(parts, weights, strict=False)], dim=0)


def _experts_class():
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe.experts import SequentialMLP

    class GroupedExperts(SequentialMLP):
        """megatron's ``SequentialMLP`` (same parameters, state dict and sharded state dict) computing all
        local experts with one grouped GEMM per linear layer. SwiGLU experts without bias (SciDFM's)."""

        def __init__(self, num_local_experts, config, submodules, pg_collection=None):
            super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
            cfg = self.config
            if cfg.add_bias_linear or not cfg.gated_linear_unit or cfg.activation_func is not F.silu:
                raise ValueError("model.backend torch: experts must be SwiGLU without bias (SciDFM's MLP)")
            if cfg.fp8 or cfg.fp4 or cfg.moe_apply_probs_on_input:
                raise ValueError("model.backend torch: fp8/fp4 and moe_apply_probs_on_input are not supported")
            self.recompute_act = (cfg.recompute_granularity == "selective"
                                  and "moe_act" in (cfg.recompute_modules or []))
            self.grouped: Optional[bool] = None  # None = torch._grouped_mm where supported (tests force it)

        @staticmethod
        def _act(fc1: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
            """megatron's MLP activation for experts, in its order: silu(gate) * up, times the routing prob,
            back to the input's dtype."""
            gate, up = torch.chunk(fc1, 2, dim=-1)
            h = F.silu(gate) * up
            return (h * probs.unsqueeze(-1)).to(h.dtype)

        def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
            x = permuted_local_hidden_states
            if self.num_local_experts == 1:
                counts = [x.shape[0]]
            else:
                counts = tokens_per_expert.tolist()  # megatron's SequentialMLP reads them on the host too
            grouped = self.grouped if self.grouped is not None else _grouped_mm_supported(x.device, x.dtype)
            offsets = (torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32) if grouped else None)
            w1 = [e.linear_fc1.weight for e in self.local_experts]
            w2 = [e.linear_fc2.weight for e in self.local_experts]
            fc1 = grouped_linear(x, w1, counts, offsets, grouped)
            if self.recompute_act:
                # fp8 None: megatron tests "is not None"
                ckpt = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)
                h = ckpt.checkpoint(self._act, fc1, permuted_probs)
                out = grouped_linear(h, w2, counts, offsets, grouped)
                ckpt.discard_output_and_register_recompute(out)
            else:
                out = grouped_linear(self._act(fc1, permuted_probs), w2, counts, offsets, grouped)
            return out, None

    return GroupedExperts


_CLASSES: dict = {}


def attention_class():
    return _CLASSES.get("attn") or _CLASSES.setdefault("attn", _attention_class())


def experts_class():
    return _CLASSES.get("experts") or _CLASSES.setdefault("experts", _experts_class())


def torch_layer_spec(num_experts: int):
    """megatron's local layer spec with this backend's core attention, experts and RMSNorm."""
    import dataclasses

    from megatron.core.models.gpt import gpt_layer_specs

    from .norm import RMSNorm

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    attn = spec.submodules.self_attention.submodules
    spec.submodules.self_attention.submodules = dataclasses.replace(attn, core_attention=attention_class())
    mlp = spec.submodules.mlp.submodules
    spec.submodules.mlp.submodules = dataclasses.replace(
        mlp, experts=dataclasses.replace(mlp.experts, module=experts_class()))
    return spec
