"""One training step on megatron-core: DDP, optimizer, pipeline schedule, loss. Shared by the trainer
and the parity tests, so the tests exercise the path training takes.

Batches are dicts of ``tokens``, ``labels``, ``loss_mask`` (float) and ``position_ids``, shaped
[micro_batch, seq]. The loss is the mean over loss-masked tokens: ``loss_func`` returns the masked sum
and the token count, and megatron's schedule divides (per micro-batch, or over the whole global batch
with ``calculate_per_token_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch


def wrap_ddp(chunks: list, config, *, use_distributed_optimizer: bool = False, overlap: bool = False):
    """Wrap each model chunk in megatron-core's DDP (contiguous fp32 grad buffers, bucketed reduce)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap and use_distributed_optimizer,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c,
                                       disable_bucketing=(i > 0)) for i, c in enumerate(chunks)]
    for w in wrapped:
        w.broadcast_params()
    return wrapped


def build_optimizer(chunks: list, config, *, lr: float, min_lr: float = 0.0, weight_decay: float = 0.1,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.95, adam_eps: float = 1e-8,
                    clip_grad: float = 1.0, use_distributed_optimizer: bool = False):
    """megatron-core's optimizer (AdamW: decoupled weight decay) over DDP-wrapped chunks; wires
    ``finalize_model_grads`` (DP/TP/PP/EP grad reductions) into the TransformerConfig."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, adam_eps=adam_eps, clip_grad=clip_grad, bf16=config.bf16, fp16=False,
        params_dtype=config.params_dtype, use_distributed_optimizer=use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, chunks)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.grad_sync_func = None
    config.param_sync_func = None
    return optimizer


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token loss: (sum, token count, reporting dict), megatron-core's 3-tuple convention."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach().clone(), mask.sum().detach()])}


def forward_step(data_iterator: Iterator[dict], model):
    """Megatron schedule callback: run one micro-batch through this stage."""
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:  # middle pipeline stages get activations, not tokens
        output = model(None, None, None)
        return output, partial(loss_func, None)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


@dataclass
class StepResult:
    loss: Optional[float]  # mean masked-token loss over the global batch (None off the last stage)
    tokens: int
    grad_norm: Optional[float]
    update_successful: bool


def reduce_loss(loss_dicts: list[dict]) -> tuple[Optional[float], int]:
    """Global mean loss from the last stage's per-micro-batch [sum, count], summed over DP ranks and
    broadcast to every rank of the pipeline so all ranks can log it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    stat = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for d in loss_dicts:
            stat += d["lm loss"].detach().double().cpu()
        if dist.is_initialized():
            dist.all_reduce(stat, group=ps.get_data_parallel_group(with_context_parallel=True))
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(stat, src=last, group=ps.get_pipeline_model_parallel_group())
    count = int(stat[1].item())
    return (float(stat[0] / stat[1]) if count else None), count


def train_step(chunks: list, optimizer, data_iterator, *, num_microbatches: int, seq_length: int,
               micro_batch_size: int, forward_only: bool = False, step_optimizer: bool = True) -> StepResult:
    """Forward/backward over ``num_microbatches`` (gradient accumulation and the pipeline schedule
    are megatron's), then one optimizer step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
    iterators = data_iterator if len(chunks) == 1 else [data_iterator] * len(chunks)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=chunks,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)
    loss, tokens = reduce_loss(losses)
    grad_norm, ok = None, True
    if not forward_only and step_optimizer:
        ok, grad_norm, _ = optimizer.step()
    return StepResult(loss=loss, tokens=tokens, grad_norm=None if grad_norm is None else float(grad_norm),
                      update_successful=bool(ok))
