"""Parameter and FLOP accounting from a ModelConfig alone (no model is built): total, active and
non-embedding counts and training FLOPs per token, with ``tensor_shapes`` checked against real models in the
tests (docs/model.md, "Parameters")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from ..config import ModelConfig


@dataclass(frozen=True)
class TensorShape:
    """One tensor of the global state dict, with the kind that decides whether it counts as active or embedding."""
    name: str
    shape: tuple[int, ...]
    kind: str  # embedding | output | attention | norm | router | expert
    expert: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def tensor_shapes(cfg: ModelConfig, padded_vocab: bool = True) -> list[TensorShape]:
    """Every tensor of the global (unsharded) state dict, in megatron-core's local-spec names."""
    v = cfg.padded_vocab_size if padded_vocab else cfg.vocab_size
    h, a = cfg.hidden_size, cfg.attention_width
    kv = cfg.num_query_groups * cfg.head_dim
    f = cfg.moe_ffn_hidden_size
    out = [TensorShape("embedding.word_embeddings.weight", (v, h), "embedding")]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        out += [
            TensorShape(p + "input_layernorm.weight", (h,), "norm"),
            TensorShape(p + "self_attention.linear_qkv.weight", (a + 2 * kv, h), "attention"),
            TensorShape(p + "self_attention.linear_proj.weight", (h, a), "attention"),
            TensorShape(p + "pre_mlp_layernorm.weight", (h,), "norm"),
            TensorShape(p + "mlp.router.weight", (cfg.num_experts, h), "router"),
        ]
        for e in range(cfg.num_experts):
            q = f"{p}mlp.experts.local_experts.{e}."
            out += [TensorShape(q + "linear_fc1.weight", (2 * f, h), "expert", True),
                    TensorShape(q + "linear_fc2.weight", (h, f), "expert", True)]
    out.append(TensorShape("decoder.final_layernorm.weight", (h,), "norm"))
    if cfg.untie_embeddings:
        out.append(TensorShape("output_layer.weight", (v, h), "output"))
    return out


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts under the paper's conventions (total, active per token, with and without embeddings)."""
    total: int
    active: int
    embedding: int  # input embedding + output layer
    non_embedding: int
    active_non_embedding: int
    per_layer: int
    per_expert: int

    def as_dict(self) -> dict:
        return dict(total=self.total, active=self.active, embedding=self.embedding,
                    non_embedding=self.non_embedding, active_non_embedding=self.active_non_embedding,
                    per_layer=self.per_layer, per_expert=self.per_expert)


def count_parameters(cfg: ModelConfig, padded_vocab: bool = True) -> ParamCount:
    shapes = tensor_shapes(cfg, padded_vocab)
    total = sum(t.numel for t in shapes)
    expert = sum(t.numel for t in shapes if t.expert)
    inactive = expert * (cfg.num_experts - cfg.moe_router_topk) // cfg.num_experts
    emb = sum(t.numel for t in shapes if t.kind in ("embedding", "output"))
    per_layer = sum(t.numel for t in shapes if t.name.startswith("decoder.layers.0."))
    per_expert = sum(t.numel for t in shapes if ".local_experts.0." in t.name
                     and t.name.startswith("decoder.layers.0."))
    return ParamCount(total=total, active=total - inactive, embedding=emb, non_embedding=total - emb,
                      active_non_embedding=total - inactive - emb, per_layer=per_layer,
                      per_expert=per_expert)


def matmul_params_per_token(cfg: ModelConfig, padded_vocab: bool = True) -> int:
    """Weights one token is multiplied by in the forward pass (the N in 6N)."""
    shapes = tensor_shapes(cfg, padded_vocab)
    dense = sum(t.numel for t in shapes if t.kind in ("attention", "router", "output"))
    experts = sum(t.numel for t in shapes if t.expert) * cfg.moe_router_topk // cfg.num_experts
    return dense + experts


def training_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, padded_vocab: bool = True) -> int:
    """Model FLOPs per trained token (forward + backward), PaLM appendix-B convention."""
    s = seq_len or cfg.max_seq_length
    return 6 * matmul_params_per_token(cfg, padded_vocab) + 12 * cfg.num_layers * s * cfg.attention_width


# ------------------------------------------------------------------------------------ memory plan
GiB = 1024 ** 3


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory of one layout, in bytes, on the most loaded pipeline stage (see :func:`memory_plan`)."""

    layout: str
    stage: int  # the pipeline stage the figures are for (the largest total)
    weights: int
    grads: int
    optimizer: int  # with the chosen optimizer (distributed or not)
    optimizer_other: int  # with the other choice, for comparison
    activations: int
    reserve: int  # CUDA context, allocator fragmentation, communication buffers: an allowance, not a count
    distributed_optimizer: bool
    gpu_memory: int | None = None
    notes: tuple[str, ...] = ()
    # An unfused attention (local, or TE's at a head_dim its fused kernels refuse): one layer's s x s scores
    # and fp32 softmax exist at a time beyond what is saved (recomputed under core_attn recompute, or their
    # gradients in the backward). 0 for a fused attention. See :func:`attention_transient_bytes`.
    attention_transient: int = 0

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer + self.activations + self.attention_transient
                + self.reserve)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory


def _pad(n: int, d: int) -> int:
    return -(-n // d) * d


def _buffer_numel(numels: list[int], dp: int, distributed_optimizer: bool) -> int:
    """Elements of one megatron DDP grad (and, with the distributed optimizer, param) buffer holding tensors
    of ``numels`` (module order, one bucket): megatron lays them out in reverse order and, with the
    distributed optimizer, starts every tensor at a multiple of 64 elements and pads the end to a multiple
    of lcm(DP, 128) (megatron-core 0.16 ``_ParamAndGradBuffer``)."""
    if not numels:
        return 0
    if not distributed_optimizer:
        return sum(numels)
    import math

    return _pad(sum(_pad(n, 64) for n in numels[1:]) + numels[0], math.lcm(dp, 128))


def stage_tensors(cfg: ModelConfig, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                  stage: int = 0) -> tuple[list[int], list[int]]:
    """Element counts of the tensors one rank of pipeline ``stage`` holds, in module order: (dense,
    experts). Attention and vocabulary are split over TP, experts over EP (whole experts) and ETP."""
    etp = tp if etp is None else etp
    h, a, f = cfg.hidden_size, cfg.attention_width, cfg.moe_ffn_hidden_size
    kv = cfg.num_query_groups * cfg.head_dim
    v = cfg.padded_vocab_size
    per_stage = cfg.num_layers // pp
    dense: list[int] = []
    experts: list[int] = []
    if stage == 0:
        dense.append(v // tp * h)
    for _ in range(per_stage):
        dense += [h, (a + 2 * kv) // tp * h, h * (a // tp), h, cfg.num_experts * h]
        for _ in range(cfg.num_experts // ep):
            experts += [2 * f // etp * h, h * (f // etp)]
    if stage == pp - 1:
        dense.append(h)
        if cfg.untie_embeddings or pp > 1:
            dense.append(v // tp * h)
    return dense, experts


def activation_bytes(cfg: ModelConfig, *, seq_len: int, micro_batch: int, tp: int = 1, pp: int = 1,
                     etp: int | None = None, backend: str = "torch", recompute: str | None = "selective",
                     precision: str = "bf16", stage: int = 0, in_flight: int | None = None) -> int:
    """Activations saved for the backward pass on one rank of ``stage``: per layer and micro-batch, times the
    layers of the stage, times the micro-batches in flight (1F1B: ``pp - stage`` on that stage).

    Term by term, as megatron-core 0.16.1 and this project's modules save them (counted on CPU with
    autograd's saved-tensor hooks: tests/test_accounting.py), after Korthikanti et al. 2022; T tokens per
    micro-batch, Tl = T / TP under sequence parallelism, Te = T x top-k x ETP / TP routed token copies:
    * attention: the input norm's input and output and the QKV input (3 Tl h), q/k/v and the output (the
      ``torch`` backend keeps the padded copies SDPA saw; ``local`` keeps the QKV output, the bmm's copies
      of q/k/v and two s x s tensors per head, the scores and the fp32 softmax), linear_proj's input;
    * MoE: the norm's input and output and the router's input (3 Tl h); the experts' input (Te h), the fc1
      output (Te 2f) and, in eager SwiGLU, silu(gate), the product and the prob-weighted output (Te 3f);
    * selective recompute (:data:`~scidfm_megatron.model.builder.SELECTIVE_RECOMPUTE`): ``core_attn`` keeps
      only its inputs (the QKV output and the rotated q, k), ``moe_act`` drops the three SwiGLU tensors,
      ``moe`` keeps only the MoE input;
      ``full`` keeps each layer's input;
    * per model: the final norm's input and output and the output layer's input (3 Tl h, last stage), the
      loss's fp32 softmax (T V / TP x 4 bytes).
    Routed copies assume no token is dropped (capacity factor 1 drops some: then it is an upper bound).
    On CPU in bf16 PyTorch's RMSNorm keeps an fp32 copy of its input; the count follows CUDA's kernel (the
    input in bf16), so the CPU check is in fp32.
    """
    from .builder import RECOMPUTE_MODULES, SELECTIVE_RECOMPUTE, attention_kind

    etp = tp if etp is None else etp
    e = 2 if precision == "bf16" else 4
    kind = attention_kind(backend, cfg.head_dim)
    h, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    kvh, k, f = cfg.num_query_groups, cfg.moe_router_topk, cfg.moe_ffn_hidden_size
    a, kv = n * d, kvh * d
    T = seq_len * micro_batch  # tokens of a micro-batch
    Tl = T // tp  # tokens of this rank under sequence parallelism
    if recompute == "full":
        per_layer = Tl * h * e
    else:
        mods = (set() if recompute is None else
                set(SELECTIVE_RECOMPUTE[backend] if recompute == "selective" else recompute.split(",")))
        assert mods <= set(RECOMPUTE_MODULES), mods
        qkv = T * (a + 2 * kv) // tp
        if "core_attn" in mods:
            core = 2 * qkv * e  # the checkpoint's inputs: the QKV output and the rotated q and k
        elif kind in ("padded-sdpa", "te-fused"):
            dp_ = -(-d // 8) * 8
            core = T * (2 * n + 2 * kvh) * dp_ // tp * e  # (padded) q, k, v and output
        else:  # QKV output, the bmm's copies of q, k, v, the scores and the softmax (fp32)
            core = 2 * qkv * e + micro_batch * (n // tp) * seq_len * seq_len * (e + 4)
        attn = (3 * Tl * h + T * a // tp) * e + core
        Te = Tl * k * etp
        if "moe" in mods:
            moe = 3 * Tl * h
        else:
            moe = 3 * Tl * h + Te * h + Te * 2 * f // etp
            if "moe_act" not in mods:
                moe += Te * 3 * f // etp
        per_layer = attn + moe * e
    layers = cfg.num_layers // pp
    in_flight = (pp - stage) if in_flight is None else in_flight
    total = per_layer * layers * in_flight
    if stage == pp - 1:
        total += 3 * Tl * h * e + T * (cfg.padded_vocab_size // tp) * 4
    return total


def attention_transient_bytes(cfg: ModelConfig, *, seq_len: int, micro_batch: int, tp: int = 1,
                              backend: str = "torch", precision: str = "bf16") -> int:
    """The s x s transient of an unfused attention (``local``; ``te`` at a head_dim that is not a multiple of
    8, where TE falls back to its unfused kernel): one layer's scores (in the compute dtype) and softmax
    (fp32) for the micro-batch's heads on this rank, micro_batch x heads/TP x s x s x (2 + 4) bytes in bf16.
    0 for a fused attention (padded SDPA, TE's fused kernels): they never hold s x s."""
    from .builder import attention_kind

    if attention_kind(backend, cfg.head_dim) not in ("unfused", "te-unfused"):
        return 0
    e = 2 if precision == "bf16" else 4
    return micro_batch * (cfg.num_attention_heads // tp) * seq_len * seq_len * (e + 4)


def memory_plan(cfg: ModelConfig, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                world_size: int = 1, seq_len: int | None = None, micro_batch: int = 1,
                recompute: str | None = "selective", backend: str = "torch", precision: str = "bf16",
                distributed_optimizer: bool = True, grad_reduce_in_fp32: bool = True,
                gpu_memory: int | None = None, reserve: int | None = None) -> MemoryPlan:
    """Per-GPU bytes of a layout before launch: weights, gradient buffers and optimizer state exactly as
    megatron-core allocates them (DDP buffers with their padding, fp32 master weights in bf16, Adam's two
    moments and step, sharded over DP / expert DP by the distributed optimizer; one gradient bucket per
    buffer, i.e. without ``overlap_grad_reduce``: with it each 40M-element bucket adds under lcm(DP, 128)
    elements of padding), activations estimated (:func:`activation_bytes`). The stage with the largest
    total is reported."""
    etp = tp if etp is None else etp
    seq_len = seq_len or cfg.max_seq_length
    dp, edp = world_size // (tp * pp), world_size // (etp * ep * pp)
    pbytes = 2 if precision == "bf16" else 4
    gbytes = 4 if (grad_reduce_in_fp32 or precision == "fp32") else pbytes
    if reserve is None:
        reserve = 0 if gpu_memory is None else max(3 * GiB, gpu_memory // 20)
    best = None
    for stage in range(pp):
        dense, experts = stage_tensors(cfg, tp, pp, ep, etp, stage)
        n_real = sum(dense) + sum(experts)
        n_tensors = len(dense) + len(experts)

        def weights_grads(dist: bool):
            # called within this iteration only (B023): the stage's tensors
            buf = _buffer_numel(dense, dp, dist) + _buffer_numel(experts, edp, dist)  # noqa: B023
            # the distributed optimizer makes the parameters views of a padded param buffer
            return (buf if dist else n_real) * pbytes, buf * gbytes  # noqa: B023

        def optimizer(dist: bool) -> int:
            # Adam: exp_avg + exp_avg_sq (fp32) and a step per tensor; bf16 adds fp32 master weights. The
            # distributed optimizer keeps the share of its DP rank (the largest share: rounded up).
            per = 8 + (4 if precision == "bf16" else 0)
            if dist:
                return (-(-sum(dense) // dp) + -(-sum(experts) // edp)) * per + n_tensors * 4  # noqa: B023
            return n_real * per + n_tensors * 4  # noqa: B023

        w, g = weights_grads(distributed_optimizer)
        act = activation_bytes(cfg, seq_len=seq_len, micro_batch=micro_batch, tp=tp, pp=pp, etp=etp,
                               backend=backend, recompute=recompute, precision=precision, stage=stage)
        plan = MemoryPlan(
            layout=f"TP{tp} x PP{pp} x EP{ep} x ETP{etp} on {world_size} GPUs (DP{dp}, expert DP{edp})",
            stage=stage, weights=w, grads=g, optimizer=optimizer(distributed_optimizer),
            optimizer_other=optimizer(not distributed_optimizer), activations=act, reserve=reserve,
            attention_transient=attention_transient_bytes(cfg, seq_len=seq_len, micro_batch=micro_batch, tp=tp,
                                                          backend=backend, precision=precision),
            distributed_optimizer=distributed_optimizer, gpu_memory=gpu_memory,
            notes=(f"seq {seq_len}, micro-batch {micro_batch}, recompute {recompute}, backend {backend}, "
                   f"{precision}, grads in {'fp32' if gbytes == 4 else 'bf16'}",))
        if best is None or plan.total > best.total:
            best = plan
    return cast(MemoryPlan, best)  # pp >= 1: set


def render_memory_plan(p: MemoryPlan) -> str:
    def g(x: int) -> str:
        return f"{x / GiB:8.2f} GiB"

    other = "without" if p.distributed_optimizer else "with"
    lines = [f"memory plan per GPU: {p.layout}; pipeline stage {p.stage} (the largest); {p.notes[0]}",
             f"  weights                {g(p.weights)}",
             f"  gradients              {g(p.grads)}",
             f"  optimizer state        {g(p.optimizer)}   "
             f"({'distributed' if p.distributed_optimizer else 'not distributed'}; "
             f"{other} the distributed optimizer: {p.optimizer_other / GiB:.2f} GiB)",
             f"  activations (estimate) {g(p.activations)}",
             *([f"  attention s x s        {g(p.attention_transient)}   (unfused attention: one layer's scores "
                f"and softmax at a time)"] if p.attention_transient else []),
             f"  reserve (allowance)    {g(p.reserve)}   (CUDA context, allocator, communication buffers)",
             f"  total                  {g(p.total)}"]
    if p.gpu_memory is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"  {verdict} in {p.gpu_memory / GiB:.0f} GiB "
                     f"({100 * p.total / p.gpu_memory:.0f}% used)")
    return "\n".join(lines)


def allocated_bytes(chunks: list, optimizer) -> dict:
    """What this rank's DDP-wrapped model chunks and megatron optimizer hold, tensor by tensor (bytes):
    weights (the DDP param buffers where the distributed optimizer made them, else the parameters), the
    DDP grad buffers, and the optimizer's state (fp32 master copies and every tensor of Adam's state, once
    it has stepped). The counterpart of :func:`memory_plan`, measured."""
    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    weights = grads = 0
    for c in chunks:
        bufs = list(c.buffers) + list(c.expert_parallel_buffers)
        grads += sum(nbytes(b.grad_data) for b in bufs)
        in_buffers = {id(p) for b in bufs if b.param_data is not None for p in b.params}
        weights += sum(nbytes(b.param_data) for b in bufs if b.param_data is not None)
        weights += sum(nbytes(p) for p in c.module.parameters() if id(p) not in in_buffers)
    opt_bytes = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            opt_bytes += sum(nbytes(p) for group in getattr(opt, attr, None) or [] for p in group)
        for state in opt.optimizer.state.values():
            opt_bytes += sum(nbytes(t) for t in state.values() if hasattr(t, "numel"))
    return dict(weights=weights, grads=grads, optimizer=opt_bytes)


def startup_memory_line(cfg, layout, engine) -> str:
    """The trainer's start-up log line: this run's memory plan per GPU beside what rank 0 holds already
    (weights and grad buffers; Adam's state appears at the first step). The step log's ``memory_gb`` is the
    measured peak to compare the plan's total with."""
    try:
        return _startup_memory_line(cfg, layout, engine)
    except Exception as exc:  # noqa: BLE001  a log line never stops a run
        return f"memory plan unavailable ({type(exc).__name__}: {exc})"


def _startup_memory_line(cfg, layout, engine) -> str:
    from .builder import resolve_backend

    t = cfg.train
    p = memory_plan(cfg.model, tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp,
                    world_size=layout.world_size, seq_len=t.seq_length, micro_batch=t.micro_batch_size,
                    recompute=t.recompute, backend=resolve_backend(cfg.model.backend),
                    precision="bf16" if engine.config.bf16 else "fp32",
                    distributed_optimizer=t.use_distributed_optimizer,
                    grad_reduce_in_fp32=engine.switches.get("grad_reduce_in_fp32", True))
    got = allocated_bytes(engine.chunks, engine.optimizer)
    return (f"memory plan per GPU (stage {p.stage}): weights {p.weights / GiB:.3f} GiB, grads {p.grads / GiB:.3f}, "
            f"optimizer {p.optimizer / GiB:.3f}, activations ~{p.activations / GiB:.3f} (estimate), "
            + (f"unfused attention s x s {p.attention_transient / GiB:.3f}, " if p.attention_transient else "")
            + f"total "
            f"{(p.total - p.reserve) / GiB:.3f} GiB + reserve; rank 0 holds weights {got['weights'] / GiB:.3f}, "
            f"grads {got['grads'] / GiB:.3f} GiB")
