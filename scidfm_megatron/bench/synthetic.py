"""Burn-in: train a SciDFM preset on a learnable synthetic task in any parallel layout.

Checks that a machine's parallel runtime (torchrun, gloo/NCCL, megatron-core, the patches) trains end to
end before real data is involved. Sequences are arithmetic progressions modulo the vocabulary, so the
loss must fall well below ln(vocab) once the model learns to add the stride.

    torchrun --nproc-per-node 2 tools/train_synthetic.py --preset scidfm-tiny --ep 2 --steps 40
"""

import argparse
import math
import sys
import time

import torch

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--preset", default="scidfm-tiny")
ap.add_argument("--tp", type=int, default=1)
ap.add_argument("--pp", type=int, default=1)
ap.add_argument("--ep", type=int, default=1)
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--seq-len", type=int, default=64)
ap.add_argument("--micro-batch-size", type=int, default=4)
ap.add_argument("--global-batch-size", type=int, default=16)
ap.add_argument("--vocab", type=int, default=None, help="use the first N token ids only (default: all)")
ap.add_argument("--seed", type=int, default=1234)


def main(argv=None) -> int:
    args = ap.parse_args(argv)
    from megatron.core import parallel_state as ps

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.accounting import count_parameters, training_flops_per_token
    from scidfm_megatron.model.builder import build_model_chunks
    from scidfm_megatron.model.presets import get_preset
    from scidfm_megatron.parallel import destroy_distributed, init_distributed
    from scidfm_megatron.training.engine import build_optimizer, wrap_ddp
    from scidfm_megatron.training.step import train_step

    cfg = get_preset(args.preset)
    par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep)
    layout = init_distributed(cfg, par, seed=args.seed)
    rank0 = torch.distributed.get_rank() == 0
    chunks = build_model_chunks(cfg, par)
    config = chunks[0].config
    chunks = wrap_ddp(chunks, config)
    optimizer = build_optimizer(chunks, config, lr=args.lr, weight_decay=0.1, clip_grad=1.0)
    per_rank = args.global_batch_size // layout.dp
    if per_rank * layout.dp != args.global_batch_size or per_rank % args.micro_batch_size:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"DP ({layout.dp}) x --micro-batch-size ({args.micro_batch_size})")
    vocab = args.vocab or cfg.vocab_size
    g = torch.Generator().manual_seed(args.seed + ps.get_data_parallel_rank())
    seq, mbs = args.seq_len, args.micro_batch_size

    from scidfm_megatron.device import to_device

    def micro_batch():
        start = torch.randint(0, vocab, (mbs, 1), generator=g)
        stride = torch.randint(1, 8, (mbs, 1), generator=g)
        t = (start + stride * torch.arange(seq + 1)) % vocab
        return to_device(dict(tokens=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous(),
                              loss_mask=torch.ones(mbs, seq), position_ids=torch.arange(seq).expand(mbs, seq)))

    if rank0:
        pc = count_parameters(cfg)
        print(f"[train_synthetic] {cfg.name}: {pc.total / 1e6:.2f}M parameters ({pc.active / 1e6:.2f}M active), "
              f"layout {layout}; random-guess loss ln({vocab}) = {math.log(vocab):.3f}", flush=True)
    flops = training_flops_per_token(cfg, seq)
    losses: list = []  # float on every rank (train_step's loss)
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        r = train_step(chunks, optimizer, [micro_batch() for _ in range(per_rank // mbs)], seq_length=seq,
                       micro_batch_size=mbs)
        dt = time.perf_counter() - t0
        losses.append(r.loss)
        if rank0 and (step % 5 == 0 or step == 1):
            print(f"[train_synthetic] step {step:4d} | loss {r.loss:.4f} | grad norm {r.grad_norm:.3f} | "
                  f"{r.tokens / dt:,.0f} tokens/s | {r.tokens * flops / dt / 1e9:.2f} GFLOP/s", flush=True)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    if rank0:
        print(f"[train_synthetic] loss fell from {first:.3f} (first 3 steps) to {last:.3f} (last 3 steps)",
              flush=True)
    destroy_distributed()
    if not last < first:
        raise SystemExit("loss did not fall: the runtime or the model is broken")
    return 0


if __name__ == "__main__":
    sys.exit(main())
