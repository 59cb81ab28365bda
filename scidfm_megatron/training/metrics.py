"""What the trainer reports each step: console line + tensorboard scalars.

loss, LR, grad norm, MoE aux (load-balancing) loss, tokens/s, MFU (from the FLOP accounting and the
device's peak), memory; and per layer the tokens each expert received and the fraction of token-expert
assignments dropped by the capacity limit, so imbalance shows as curves.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

# Dense bf16 peak TFLOP/s per device, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def detect_peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class ExpertLoad:
    """Per-layer tokens per expert over a step, summed over all ranks (routers see disjoint tokens).

    The router calls' counts stay on the device; :meth:`reduce` sums them there, all-reduces one
    [layers, experts + 1] tensor and copies it to the host once: one synchronisation per step, not one
    per router call."""

    def __init__(self, num_layers: int, num_experts: int, topk: int):
        self.shape = (num_layers, num_experts)
        self.topk = topk

    def reduce(self, calls) -> tuple[torch.Tensor, torch.Tensor]:
        from ..device import comm_device

        dev = comm_device()
        stats = torch.zeros(self.shape[0], self.shape[1] + 1, dtype=torch.int64, device=dev)
        for c in calls:
            if 1 <= c.layer <= self.shape[0]:
                stats[c.layer - 1, :-1] += c.tokens_per_expert.to(dev)
                stats[c.layer - 1, -1] += (c.num_tokens * self.topk if isinstance(c.num_tokens, int)
                                           else c.num_tokens.to(dev) * self.topk)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        stats = stats.cpu().double()
        return stats[:, :-1], stats[:, -1]


def truncate_metrics(path: str, iteration: int, note: dict) -> int:
    """A run resumed at ``iteration``: drop the rows a killed run wrote past it (they are replaced by the
    resumed run's), then mark the resume. Atomic (temporary file + rename). Returns the rows dropped."""
    import json

    from ..utils import atomic_write

    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by the kill
                dropped += 1
                continue
            if isinstance(row, dict) and int(row.get("iteration", 0)) > iteration:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    kept.append(json.dumps(dict(note, iteration=iteration, phase="resume", dropped_rows=dropped)) + "\n")
    atomic_write(path, "".join(kept))
    return dropped


class Reporter:
    """Rank 0's per-step output (console line, metrics JSONL, TensorBoard) with throughput and MFU; on resume it
    drops the rows and events the killed run wrote past the checkpoint."""

    def __init__(self, rank0: bool, tensorboard_dir: Optional[str], metrics_file: Optional[str], flops_per_token: float,
                 peak_tflops: Optional[float], world_size: int, resumed_at: Optional[int] = None,
                 resumed_from: Optional[str] = None):
        self.rank0 = rank0
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops
        self.world = world_size
        self.writer = None
        if rank0 and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tensorboard_dir, exist_ok=True)
            # On resume, TensorBoard drops the killed run's events from the resumed iteration on.
            self.writer = SummaryWriter(tensorboard_dir, purge_step=None if resumed_at is None else resumed_at + 1)
        self.metrics = None
        if rank0 and metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            if resumed_at is not None:
                truncate_metrics(metrics_file, resumed_at, {"checkpoint": resumed_from})
            self.metrics = open(metrics_file, "a", buffering=1)
        self._t = time.perf_counter()

    def start_step(self):
        self._t = time.perf_counter()

    def step(self, it: int, loss: float, lr: float, grad_norm: Optional[float], aux: Optional[float], tokens: int,
             load: Optional[torch.Tensor] = None, offered: Optional[torch.Tensor] = None, prefix: str = "train",
             print_line: bool = True, extra: Optional[dict] = None) -> dict:
        dt = time.perf_counter() - self._t
        tps = tokens / dt if dt > 0 else 0.0
        achieved = tps * self.flops_per_token / self.world  # per device
        mfu = achieved / (self.peak * 1e12) if self.peak else None
        mem = memory_gb()
        row = dict(loss=loss, lr=lr, grad_norm=grad_norm, aux_loss=aux, tokens_per_s=tps, mfu=mfu,
                   tflops_per_device=achieved / 1e12, memory_gb=mem, step_s=dt)
        dropped = None
        if load is not None and offered is not None and float(offered.sum()) > 0:
            dropped = 1.0 - float(load.sum() / offered.sum())
            row["dropped_fraction"] = dropped
        row.update(extra or {})  # fault handling: skipped steps, loss spikes, per-rank step times
        if self.metrics is not None:
            import json

            self.metrics.write(json.dumps(dict(iteration=it, phase=prefix, **row)) + "\n")
        if self.rank0:
            if print_line:
                parts = [f"iter {it:6d}", f"{prefix} loss {loss:.4f}", f"lr {lr:.3e}"]
                if grad_norm is not None:
                    parts.append(f"grad norm {grad_norm:.3f}")
                if aux is not None:
                    parts.append(f"aux {aux:.4f}")
                parts.append(f"{tps:,.0f} tok/s")
                parts.append(f"MFU {mfu:.1%}" if mfu is not None else f"{achieved / 1e9:.1f} GFLOP/s/dev")
                parts.append(f"mem {mem:.2f} GB")
                if dropped is not None:
                    parts.append(f"dropped {dropped:.1%}")
                print(" | ".join(parts), flush=True)
            if self.writer is not None:
                for k, v in row.items():
                    if v is not None and isinstance(v, (int, float)):
                        self.writer.add_scalar(f"{prefix}/{k}", v, it)
                if load is not None:
                    for layer in range(load.shape[0]):
                        total = float(load[layer].sum()) or 1.0
                        for e in range(load.shape[1]):
                            self.writer.add_scalar(f"experts/layer{layer + 1}_expert{e}_share",
                                                   float(load[layer, e]) / total, it)
                        if offered is not None and float(offered[layer]) > 0:
                            self.writer.add_scalar(f"experts/layer{layer + 1}_dropped",
                                                   1.0 - float(load[layer].sum() / offered[layer]), it)
                self.writer.flush()
        return row

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()
