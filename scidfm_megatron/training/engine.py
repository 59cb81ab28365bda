"""The engine: this rank's model chunks, wrapped for data parallelism (megatron-core's DDP), and their
optimizer, built by ``build_engine(run_config)``: the one place that decides how a model is parallelised
(:func:`parallel_choices`: sequence parallelism, p2p communication; recompute) and which ``engine:``
switches are on; the builder applies what it receives (docs/training.md, "Engine switches" and "What
the trainer does")."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class Engine:
    """What the trainer drives: this rank's DDP-wrapped chunks, their optimizer, the TransformerConfig they
    were built with and the switches resolved for this run (logged by :meth:`describe`)."""

    chunks: list  # DDP-wrapped model chunks of this rank (several with the interleaved pipeline)
    optimizer: object  # megatron-core MegatronOptimizer (or ChainedOptimizer)
    config: Any  # the TransformerConfig the chunks were built with
    switches: dict  # the resolved performance switches, for the log

    @contextlib.contextmanager
    def synced_params(self):
        """Parameters up to date for the block (checkpoint save, evaluation). With ``overlap_param_gather``
        the distributed optimizer's updated shards are all-gathered lazily, by forward pre-hooks during
        the next forward pass: until then a rank's parameters are partly last step's. This gathers them
        now and turns the hooks off for the block (Megatron-LM does the same around saves)."""
        if not self.switches.get("overlap_param_gather"):
            yield
            return
        for c in self.chunks:
            c.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for c in self.chunks:
                c.enable_forward_pre_hook()

    def describe(self) -> str:
        from ..model.builder import describe_implementations

        impl = describe_implementations(self.chunks)
        on = ", ".join(f"{k}={v}" for k, v in self.switches.items())
        return (f"attention {impl['attention']}; experts {impl['experts']}; norms {impl['norm']}; "
                f"linear {impl['linear']}; {on}")


def parallel_choices(par) -> dict:
    """The TransformerConfig fields that say how the layers run in parallel (``par``: ParallelConfig), handed
    to the builder: sequence parallelism (auto: with TP > 1) and the pipeline's point-to-point messages."""
    return dict(
        sequence_parallel=par.use_sequence_parallel,
        # Interleaved pipeline: Megatron-LM's settings (overlapped, unbatched p2p). megatron-core's defaults
        # (batched p2p) post a stage's send-to-next and send-to-prev in one batch; with PP=2 both peers
        # are the same rank, and the receiver matches the two same-shaped messages in the other order:
        # activations and gradients swap (measured on gloo: the loss of micro-batches 3+ is off by 1e-3).
        # The unbatched path puts the two directions on different communicators for PP=2.
        overlap_p2p_comm=bool(par.vpp),
        batch_p2p_comm=not par.vpp,
    )


def resolve_switches(engine_cfg, *, use_distributed_optimizer: bool, dp: int) -> dict:
    """``engine:`` switches with ``null`` resolved for this machine and DP size (the module docstring's rules)."""
    cuda = torch.cuda.is_available()
    overlap = engine_cfg.overlap_grad_reduce
    if overlap is None:
        overlap = cuda and dp > 1
    gather = engine_cfg.overlap_param_gather  # explicit true without the distributed optimizer: validate_run
    if gather is None:
        gather = overlap and use_distributed_optimizer
    return dict(overlap_grad_reduce=bool(overlap), overlap_param_gather=bool(gather),
                grad_reduce_in_fp32=engine_cfg.grad_reduce_in_fp32, bucket_size=engine_cfg.bucket_size,
                check_for_nan_in_grad=engine_cfg.check_for_nan_in_grad,
                use_distributed_optimizer=use_distributed_optimizer)


def wrap_ddp(chunks: list, config, *, use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
             overlap_param_gather: bool = False, grad_reduce_in_fp32: bool = True, bucket_size: Optional[int] = None,
             check_for_nan_in_grad: bool = False, align_param_gather: bool = False):
    """Wrap each model chunk in megatron-core's DDP (contiguous grad buffers, bucketed reduce).
    ``align_param_gather`` (megatron's, default off as in Megatron-LM): the schedule launches every chunk's
    param all-gather at once through ``param_sync_func``; off, each chunk's forward pre-hooks gather their
    own buckets as they are needed."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=check_for_nan_in_grad,
        bucket_size=bucket_size,
        align_param_gather=align_param_gather,
    )
    # Only the first chunk gets buckets when interleaving: megatron-LM's choice (the others reduce at the
    # end), which keeps the reduce of the last-finished chunk from waiting on bucket boundaries.
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c,
                                       disable_bucketing=(i > 0)) for i, c in enumerate(chunks)]
    for w in wrapped:
        w.broadcast_params()
    return wrapped


def _per_chunk(chunks: list, method: str):
    """A DDP method for megatron's schedule: one callable, or one per chunk with the interleaved pipeline."""
    return [getattr(c, method) for c in chunks] if len(chunks) > 1 else getattr(chunks[0], method)


def build_optimizer(chunks: list, config, *, lr: float, min_lr: float = 0.0, weight_decay: float = 0.1,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.95, adam_eps: float = 1e-8,
                    clip_grad: float = 1.0, use_distributed_optimizer: bool = False):
    """megatron-core's optimizer (AdamW: decoupled weight decay) over DDP-wrapped chunks; wires
    ``finalize_model_grads`` (DP/TP/PP/EP grad reductions) and, as the chunks' DDP config says, the
    overlap hooks into the TransformerConfig."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, adam_eps=adam_eps, clip_grad=clip_grad, bf16=config.bf16, fp16=False,
        params_dtype=config.params_dtype, use_distributed_optimizer=use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, chunks)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = _per_chunk(chunks, "no_sync")
    ddp = chunks[0].ddp_config
    # With overlap, the schedule starts each chunk's grad reduce when its backward is done, and its param
    # gather before its forward (Megatron-LM).
    config.grad_sync_func = _per_chunk(chunks, "start_grad_sync") if ddp.overlap_grad_reduce else None
    # Megatron-LM's rule: the schedule drives the param gather only with align_param_gather; otherwise the DDP
    # forward pre-hooks do it bucket by bucket, and a param_sync_func would start every gather up front.
    config.param_sync_func = (_per_chunk(chunks, "start_param_sync")
                              if ddp.overlap_param_gather and ddp.align_param_gather else None)
    return optimizer


def build_engine(cfg, layout) -> Engine:
    """Model chunks -> DDP -> optimizer, as the run config says. ``layout`` from ``init_distributed``."""
    from ..model.builder import build_model_chunks

    m, t = cfg.model, cfg.train
    switches = resolve_switches(cfg.engine, use_distributed_optimizer=t.use_distributed_optimizer, dp=layout.dp)
    precision = None if t.precision == "auto" else t.precision
    chunks = build_model_chunks(m, cfg.parallel, precision=precision, recompute=t.recompute,
                                parallel=parallel_choices(cfg.parallel), calculate_per_token_loss=t.stage == "sft",
                                deterministic_mode=t.deterministic)
    config = chunks[0].config
    chunks = wrap_ddp(chunks, config, **switches)
    optimizer = build_optimizer(
        chunks, config, lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
        use_distributed_optimizer=t.use_distributed_optimizer)
    return Engine(chunks=chunks, optimizer=optimizer, config=config, switches=switches)
