"""Worker launched by tests/test_parallel_parity.py under torchrun, once per parallel layout.

parity mode: load one set of global weights, run one global batch (fp32, dropless routing), and save
on rank 0: the global-mean loss, the gradients gathered to global names (before clipping), the grad
norm, and the weights after one AdamW step, for comparison with the single-process run.

capacity mode: train with capacity factor 1.0 for a few steps on a learnable synthetic task, recording
every router call (tokens per expert after dropping, capacity), then one forward pass with dropless
routing on the same model, to show the bound is what the dropping enforces.
"""

import argparse
import os

import torch

p = argparse.ArgumentParser()
p.add_argument("--mode", choices=["parity", "capacity"], default="parity")
p.add_argument("--tp", type=int, default=1)
p.add_argument("--pp", type=int, default=1)
p.add_argument("--ep", type=int, default=1)
p.add_argument("--etp", type=int, default=None)
p.add_argument("--vpp", type=int, default=None)
p.add_argument("--dist-opt", action="store_true")
p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
p.add_argument("--overlap", action="store_true", help="engine switches: overlap grad reduce (+ param gather)")
p.add_argument("--weights", help="global state dict (.pt); saved there first if missing (1 process)")
p.add_argument("--batch", help="global batch (.pt) with tokens [B, S+1]")
p.add_argument("--micro-batch-size", type=int, default=2)
p.add_argument("--steps", type=int, default=12)
p.add_argument("--out", required=True)
p.add_argument("--backend", default=None, help="model.backend (default: the preset's, auto)")
p.add_argument("--recompute", default=None, help="train.recompute (null, selective, full or a module list)")


def main():
    args = p.parse_args()
    from megatron.core import parallel_state as ps

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.builder import build_model_chunks
    from scidfm_megatron.model.presets import get_preset
    from scidfm_megatron.model.routing import RouterRecorder, expert_capacity
    from scidfm_megatron.model.state_dict import gather_global_state_dict, load_global_state_dict
    from scidfm_megatron.parallel import init_distributed
    from scidfm_megatron.training.engine import build_optimizer, wrap_ddp
    from scidfm_megatron.training.step import train_step

    capacity = 1.0 if args.mode == "capacity" else None
    model_cfg = get_preset("scidfm-debug", moe_capacity_factor=capacity)
    par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp)
    layout = init_distributed(model_cfg, par, seed=1234)
    rank = torch.distributed.get_rank()
    chunks = build_model_chunks(model_cfg, par, precision=args.precision, backend=args.backend,
                                recompute=args.recompute)
    config = chunks[0].config

    if args.mode == "parity":
        if os.path.exists(args.weights):
            load_global_state_dict(chunks, torch.load(args.weights))
        else:
            assert layout.world_size == 1 and args.precision == "fp32", \
                "reference weights are written by the single-process fp32 run"
            torch.save(gather_global_state_dict(chunks), args.weights)
    gather = args.overlap and args.dist_opt
    chunks = wrap_ddp(chunks, config, use_distributed_optimizer=args.dist_opt, overlap_grad_reduce=args.overlap,
                      overlap_param_gather=gather, bucket_size=2000 if args.overlap else None)
    optimizer = build_optimizer(chunks, config, lr=1e-3, weight_decay=0.1, clip_grad=1.0,
                                use_distributed_optimizer=args.dist_opt)

    mbs, dp, dp_rank = args.micro_batch_size, layout.dp, ps.get_data_parallel_rank()

    def microbatches(tokens):
        """This DP rank's contiguous share of the global batch, as micro-batches."""
        per_rank = tokens.shape[0] // dp
        mine = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        seq = tokens.shape[1] - 1
        out = []
        for i in range(0, per_rank, mbs):
            t = mine[i:i + mbs]
            out.append(dict(tokens=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous(),
                            loss_mask=torch.ones(t.shape[0], seq),
                            position_ids=torch.arange(seq).expand(t.shape[0], seq).contiguous()))
        return out

    result = {"layout": str(layout)}
    if args.mode == "parity":
        tokens = torch.load(args.batch)
        mb = microbatches(tokens)
        step = train_step(chunks, optimizer, mb, seq_length=mb[0]["tokens"].shape[1],
                          micro_batch_size=mbs, step_optimizer=False)
        if not args.dist_opt:  # the distributed optimizer keeps only its own shard of reduced grads
            result["grads"] = gather_global_state_dict(chunks, tensor_of=lambda prm: prm.main_grad)
        ok, grad_norm, _ = optimizer.step()
        if gather:  # overlapped param gather happens in the next forward: finish it before reading weights
            for c in chunks:
                c.start_param_sync(force_sync=True)
        result.update(loss=step.loss, tokens=step.tokens, grad_norm=float(grad_norm), ok=bool(ok),
                      weights=gather_global_state_dict(chunks))
        from scidfm_megatron.model.accounting import allocated_bytes

        memory = [None] * torch.distributed.get_world_size()  # per rank: weights, grads, optimizer bytes
        torch.distributed.all_gather_object(memory, allocated_bytes(chunks, optimizer))
        result["memory"] = memory
    else:
        g = torch.Generator().manual_seed(7)
        vocab, seq, batch = model_cfg.vocab_size, 32, 4 * dp

        def synthetic():
            start = torch.randint(0, vocab, (batch, 1), generator=g)
            stride = torch.randint(1, 5, (batch, 1), generator=g)
            return (start + stride * torch.arange(seq + 1)) % vocab

        losses, calls = [], []
        with RouterRecorder(chunks) as rec:
            for _ in range(args.steps):
                mb = microbatches(synthetic())
                s = train_step(chunks, optimizer, mb, seq_length=seq,
                               micro_batch_size=mbs)
                losses.append(s.loss)
            calls = [(c.layer, c.num_tokens, c.tokens_per_expert.tolist(),
                      expert_capacity(c.num_tokens, model_cfg.moe_router_topk, model_cfg.num_experts, capacity))
                     for c in rec.calls]
            rec.clear()
            config.moe_expert_capacity_factor = None  # the same model, dropless
            mb = microbatches(synthetic())
            train_step(chunks, optimizer, mb, seq_length=seq,
                       micro_batch_size=mbs, forward_only=True)
            dropless = [(c.layer, c.num_tokens, c.tokens_per_expert.tolist(),
                         expert_capacity(c.num_tokens, model_cfg.moe_router_topk, model_cfg.num_experts, capacity))
                        for c in rec.calls]
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, (calls, dropless))
        result.update(losses=losses, calls=[c for r in everyone for c in r[0]],
                      dropless_calls=[c for r in everyone for c in r[1]])

    if rank == 0:
        torch.save(result, args.out + ".tmp")
        os.replace(args.out + ".tmp", args.out)
        print(f"[worker] {layout}: done, loss={result.get('loss', result.get('losses'))}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
