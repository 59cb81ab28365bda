"""Checkpoint save time and training stall per format, in one run.

    python tools/bench_checkpoint.py                       # CPU: scidfm-tiny, EP2 x DP2 on 2 processes
    python tools/bench_checkpoint.py --preset scidfm-tiny --nproc 8 --layout tp2,ep4   # a GPU node

One torchrun launch builds the model, DDP and megatron's distributed optimizer (the 18B recipes' choice)
through ``training.engine`` and trains on synthetic batches. For each way of saving it measures, over
--rounds rounds:
  * save time: from the save call until the checkpoint is published (renamed into place, ``latest``
    moved): for the asynchronous save, until the queue finalizes it, polled after every training step;
  * training stall: how long the training loop is held up: for a synchronous save its whole save time;
    for the asynchronous save, the time inside the save call (staging, fork) plus the extra time of the
    steps that ran while the write was in flight, against the steps' mean without any save.
Ways of saving (training/checkpoint/save_load.py): fully_reshardable (the layout-free format: each DP group's
optimizer shards gathered into per-parameter tensors), dp_reshardable (each rank's buffers as they are,
no gather; fully-parallel writes), dp_reshardable written asynchronously. Rank 0 prints one table, the
first row being the baseline the ratios are against. The same command runs on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

WAYS = [("fully_reshardable", "fully_reshardable", False), ("dp_reshardable", "dp_reshardable", False),
        ("dp_reshardable async", "dp_reshardable", True)]


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.builder import build_model_chunks
    from scidfm_megatron.model.presets import get_preset
    from scidfm_megatron.parallel import init_distributed
    from scidfm_megatron.training import checkpoint as ckpt
    from scidfm_megatron.training.engine import build_optimizer, wrap_ddp
    from scidfm_megatron.training.step import train_step

    deg = dict(x.split("=") if "=" in x else (x.rstrip("0123456789"), x[len(x.rstrip("0123456789")):])
               for x in args.layout.split(",") if x)
    par = ParallelConfig(tp=int(deg.get("tp", 1)), pp=int(deg.get("pp", 1)), ep=int(deg.get("ep", 1)))
    model_cfg = get_preset(args.preset)
    layout = init_distributed(model_cfg, par, seed=1234)
    chunks = build_model_chunks(model_cfg, par)
    config = chunks[0].config
    chunks = wrap_ddp(chunks, config, use_distributed_optimizer=True)
    opt = build_optimizer(chunks, config, lr=1e-4, use_distributed_optimizer=True)
    seq, mbs = args.seq_length, 1
    per_rank = args.global_batch // layout.dp
    dev = next(chunks[0].parameters()).device

    def batch():
        t = torch.randint(0, model_cfg.vocab_size, (mbs, seq + 1), device=dev)
        return dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(mbs, seq, device=dev),
                    position_ids=torch.arange(seq, device=dev).expand(mbs, seq))

    def step():
        t0 = time.perf_counter()
        train_step(chunks, opt, [batch() for _ in range(per_rank // mbs)], seq_length=seq, micro_batch_size=mbs)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    base = statistics.median(step() for _ in range(args.steps))
    root = Path(args.dir)
    rows = []
    for name, fmt, use_async in WAYS:
        saves, stalls = [], []
        for r in range(args.rounds):
            dist.barrier()
            queue = AsyncCallsQueue() if use_async else None
            where = root / name.replace(" ", "_")
            t0 = time.perf_counter()
            ckpt.save(where, r + 1, chunks, opt, None, {"bench": True}, keep_last=1, optimizer_format=fmt,
                      async_queue=queue)
            call = time.perf_counter() - t0
            if not use_async:
                saves.append(call)
                stalls.append(call)
                continue
            extra, n = 0.0, 0
            assert queue is not None
            while queue.get_num_unfinalized_calls():
                dt = step()
                n += 1
                t1 = time.perf_counter()
                queue.maybe_finalize_async_calls(blocking=False)
                fin = time.perf_counter() - t1
                extra += dt - base + fin
                if n > 200:
                    queue.maybe_finalize_async_calls(blocking=True)
            saves.append(time.perf_counter() - t0)
            stalls.append(call + max(extra, 0.0))
        rows.append((name, statistics.median(saves), statistics.median(stalls)))
        if dist.get_rank() == 0:
            shutil.rmtree(root / name.replace(" ", "_"), ignore_errors=True)
    size = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    if dist.get_rank() == 0:
        out = dict(layout=str(layout), preset=args.preset, step_s=base, param_bytes_rank0=size,
                   rows=[dict(way=n, save_s=s, stall_s=st) for n, s, st in rows])
        Path(args.out).write_text(json.dumps(out, indent=1))
    ps.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="scidfm-tiny")
    ap.add_argument("--layout", default="ep2", help="e.g. ep2, tp2,ep2 (DP fills the processes)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="steps timed without a save (the baseline step)")
    ap.add_argument("--rounds", type=int, default=3, help="saves per way; the median is reported")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from scidfm_megatron.testing.distributed import run_torchrun

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "bench.json")
        fwd = [a for a in (argv if argv is not None else sys.argv[1:])]
        run_torchrun("-m", args.nproc, ["scidfm_megatron.bench.checkpoint", *fwd, "--worker", "--out", out,
                                        "--dir", args.dir or tmp], timeout=3600)
        r = json.loads(Path(out).read_text())
    base = r["rows"][0]
    print(f"checkpoint save, {r['preset']} {r['layout']}, distributed optimizer; training step {r['step_s']:.3f} s; "
          f"parameters {r['param_bytes_rank0'] / 2**20:.1f} MiB on rank 0")
    print(f"{'way':24s} {'save s':>8s} {'stall s':>8s} {'save vs first':>14s} {'stall vs first':>15s}")
    for row in r["rows"]:
        print(f"{row['way']:24s} {row['save_s']:8.3f} {row['stall_s']:8.3f} {row['save_s'] / base['save_s']:14.2f} "
              f"{row['stall_s'] / base['stall_s']:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
