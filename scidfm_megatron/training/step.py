"""One training step on megatron-core, and nothing else: the forward-step callback, the loss, and
forward/backward over the micro-batches through megatron's pipeline schedule, then the optimizer step.
Shared by the trainer, the parity tests and the benchmarks, so they all exercise the path training takes.
(The model, DDP and optimizer are built in :mod:`.engine`.)

Batches are dicts of ``tokens``, ``labels``, ``loss_mask`` (float) and ``position_ids``, shaped
[micro_batch, seq], already on the training device (:func:`scidfm_megatron.device.to_device`); packed SFT
batches add ``document_ids`` (-1 on padding), from which every model chunk builds its block-diagonal
attention mask and MoE padding mask (:mod:`scidfm_megatron.model.packing`). The loss is
the mean over loss-masked tokens: ``loss_func`` returns the masked sum and the token count, and megatron's
schedule divides (per micro-batch, or over the whole global batch with ``calculate_per_token_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token loss: (sum, token count, reporting dict), megatron-core's 3-tuple convention."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach().clone(), mask.sum().detach()])}


def forward_step(data_iterator, model):
    """Megatron schedule callback: run one micro-batch through this model chunk. Every chunk reads the
    batch (each has its own iterator over the same micro-batches); a chunk without the embedding ignores
    the tokens, one without the output layer ignores the labels."""
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:  # a pipeline stage given no data: activations come from the previous stage
        output = model(None, None, None)
        return output, partial(loss_func, None)  # type: ignore[arg-type]  # no loss on a stage without data
    doc = batch.get("document_ids")
    if doc is None:
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    else:
        from ..model.packing import document_attention_mask

        output = model(batch["tokens"], batch["position_ids"], document_attention_mask(doc),
                       labels=batch["labels"], padding_mask=doc < 0)
    return output, partial(loss_func, batch["loss_mask"])


@dataclass
class StepResult:
    """One optimizer step's global loss, token count and grad norm, as every rank sees them."""
    loss: Optional[float]  # mean masked-token loss over the global batch (None when no token counted)
    tokens: int
    grad_norm: Optional[float]
    update_successful: bool


def reduce_loss(loss_dicts: list[dict]) -> tuple[Optional[float], int]:
    """Global mean loss from the last stage's per-micro-batch [sum, count], summed over DP ranks and
    broadcast to every rank of the pipeline so all ranks can log it. The sums stay on the device until
    the one copy to the host at the end."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ..device import comm_device

    dev = comm_device()
    stat = torch.zeros(2, dtype=torch.float64, device=dev)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for d in loss_dicts:
            stat += d["lm loss"].detach().to(dev, torch.float64)
        if dist.is_initialized():
            dist.all_reduce(stat, group=ps.get_data_parallel_group(with_context_parallel=True))
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(stat, src=last, group=ps.get_pipeline_model_parallel_group())
    total, count = stat.tolist()
    return (total / count if count else None), int(count)


def _loss_per_real_token(batches: list[dict]) -> Optional[torch.Tensor]:
    """N_loss / N_real over the global batch, for padded (packed SFT) batches: the factor that makes the
    MoE aux loss 0.02 per routed real token under the per-token loss (model/packing.py). None otherwise."""
    if not batches or "document_ids" not in batches[0]:
        return None
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    stat = torch.stack([torch.stack([b["loss_mask"].sum().double(), (b["document_ids"] >= 0).sum().double()])
                        for b in batches]).sum(0)
    if dist.is_initialized():
        from ..device import comm_device

        stat = stat.to(comm_device())
        dist.all_reduce(stat, group=ps.get_data_parallel_group(with_context_parallel=True))
    return (stat[0] / stat[1].clamp(min=1)).float().to(batches[0]["loss_mask"].device)


def train_step(chunks: list, optimizer, batches: Sequence[dict], *, seq_length: int, micro_batch_size: int,
               forward_only: bool = False, step_optimizer: bool = True) -> StepResult:
    """Forward/backward over ``batches`` (this rank's micro-batches of the global batch; gradient
    accumulation and the pipeline schedule are megatron's), then one optimizer step.

    With the interleaved pipeline (several chunks) every chunk gets its own iterator over the same
    micro-batches: the schedule runs micro-batch k through chunk 0, later through chunk 1, ... and each
    chunk must see k then, not the next unread batch of a shared iterator."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
    from ..model.packing import aux_token_scale

    batches = list(batches)
    iterators = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    # (no aux loss without a backward pass: a forward-only step needs no scale and no all-reduce for it)
    with aux_token_scale(None if forward_only else _loss_per_real_token(batches)):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=chunks,
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=forward_only)
    loss, tokens = reduce_loss(losses)
    grad_norm, ok = None, True
    if not forward_only and step_optimizer:
        ok, grad_norm, _ = optimizer.step()
    return StepResult(loss=loss, tokens=tokens, grad_norm=None if grad_norm is None else float(grad_norm),
                      update_successful=bool(ok))
