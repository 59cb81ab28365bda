"""Worker launched by tests/test_resume.py under torchrun: the resume matrix in one launch.

Every layout is built in the same processes (megatron's groups re-initialised per layout), from one set
of global weights (the first layout's initialisation), and trained on the same global batches (each DP
rank takes its contiguous share), fp32 and dropless, with the run's real pieces: DDP, megatron's
optimizer (plain or distributed, --optimizer) through ``training.engine``, ``training.step.train_step``
and ``training.checkpoint.save/load``.

  1. reference: the first layout trains K + N steps without interruption (losses of steps K+1..K+N);
  2. every layout that is a source of a pair trains K steps and saves a full checkpoint (model, optimizer);
  3. every pair "A>B" loads A's checkpoint at layout B and trains N steps.
Rank 0 writes {optimizer: {"ref": [...], "pairs": {"A>B": [...]}, "adam_steps": {"A>B": [...]}}} to --out,
adam_steps being the set of Adam step counts over every parameter after the resumed steps (all K + N).
Layout names: dp, ep2, tp2, pp2, pp2vpp2, tp2pp2ep2etp1, ... (degrees not named are 1, ETP defaults to
TP; DP fills the world). A source named with "+dp" (e.g. "ep2+dp>ep2") is saved in the fast dp_reshardable
format of the distributed optimizer, the others in --format.
"""

import argparse
import json
import os
import re
import shutil

import torch

p = argparse.ArgumentParser()
p.add_argument("--pairs", required=True, help="comma-separated A>B")
p.add_argument("--optimizers", default="plain,dist", help="megatron's plain and/or distributed optimizer")
p.add_argument("--plain-pairs", help="pairs for the plain optimizer (default: --pairs)")
p.add_argument("--save-after", dest="k", type=int, default=3)
p.add_argument("--resumed-steps", dest="n", type=int, default=3)
p.add_argument("--workdir", required=True)
p.add_argument("--out", required=True)
p.add_argument("--format", default="fully_reshardable", help="the distributed optimizer's checkpoint format")
p.add_argument("--keep", help="copy the plain optimizer's first saved checkpoint directory here")

SEQ, GLOBAL_BATCH, MICRO = 32, 8, 1


def parallel_config(name):
    from scidfm_megatron.config import ParallelConfig

    deg = {k: int(v) for k, v in re.findall(r"(etp|tp|pp|ep|vpp)(\d+)", name)}
    return ParallelConfig(tp=deg.get("tp", 1), pp=deg.get("pp", 1), ep=deg.get("ep", 1), vpp=deg.get("vpp"),
                          etp=deg.get("etp"))


def batches(step, dp, dp_rank, vocab):
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 5, (GLOBAL_BATCH, 1), generator=g)
    tokens = (start + stride * torch.arange(SEQ + 1)) % vocab
    per = GLOBAL_BATCH // dp
    mine = tokens[dp_rank * per:(dp_rank + 1) * per]
    return [dict(tokens=mine[i:i + MICRO, :-1].contiguous(), labels=mine[i:i + MICRO, 1:].contiguous(),
                 loss_mask=torch.ones(MICRO, SEQ), position_ids=torch.arange(SEQ).expand(MICRO, SEQ).contiguous())
            for i in range(0, per, MICRO)]


def main():
    args = p.parse_args()
    from scidfm_megatron.model.presets import get_preset

    model_cfg = get_preset("scidfm-debug", moe_capacity_factor=None)
    os.makedirs(args.workdir, exist_ok=True)
    weights = os.path.join(args.workdir, "weights.pt")
    report = {}
    for optimizer in args.optimizers.split(","):
        spec = args.plain_pairs if optimizer == "plain" and args.plain_pairs else args.pairs
        pairs = [tuple(x.split(">")) for x in spec.split(",")]
        sources = list(dict.fromkeys(a for a, _ in pairs))
        report[optimizer] = matrix(args, optimizer, model_cfg, pairs, sources, sources[0], weights)
    from scidfm_megatron.testing.distributed import write_report

    write_report(args.out, report)


def adam_steps(opt) -> list:
    """Adam's step of every parameter this rank's optimizer(s) hold."""
    out = set()
    for o in getattr(opt, "chained_optimizers", [opt]):
        for st in o.optimizer.state.values():
            if "step" in st:
                out.add(float(st["step"]))
    return sorted(out)


def legacy_refusal(work, pairs, build, done, ckpt):
    """A checkpoint written before optimizer state was keyed by parameter (its scidfm_meta.json has no
    optimizer_keys) cannot cross EP=1 <-> EP>1: the load must refuse with the reason, before loading."""
    import torch.distributed as dist

    src = next((a for a, b in pairs if parallel_config(a).ep > 1 and parallel_config(b).ep == 1), None)
    dst = next(b for a, b in pairs if a == src)
    path = ckpt.find_resume(os.path.join(work, src), cleanup=False)
    old = os.path.join(work, "legacy", path.name)
    if dist.get_rank() == 0:
        shutil.copytree(path, old)
        meta = json.load(open(os.path.join(old, "scidfm_meta.json")))
        meta.pop("optimizer_keys")
        json.dump(meta, open(os.path.join(old, "scidfm_meta.json"), "w"))
    dist.barrier()
    layout, chunks, opt = build(dst)
    try:
        ckpt.load(old, chunks, opt)
        message = None
    except ckpt.CheckpointMismatch as exc:
        message = str(exc)
    done(chunks)
    return message


def matrix(args, optimizer, model_cfg, pairs, sources, first, weights):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from scidfm_megatron.model.builder import build_model_chunks
    from scidfm_megatron.model.state_dict import gather_global_state_dict, load_global_state_dict
    from scidfm_megatron.parallel import init_distributed
    from scidfm_megatron.training import checkpoint as ckpt
    from scidfm_megatron.training.engine import build_optimizer, wrap_ddp
    from scidfm_megatron.training.step import train_step

    work = os.path.join(args.workdir, optimizer)
    dist_opt = optimizer == "dist"

    def build(name):
        par = parallel_config(name)
        layout = init_distributed(model_cfg, par, seed=1234)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        chunks = build_model_chunks(model_cfg, par, precision="fp32")
        config = chunks[0].config
        if os.path.exists(weights):
            load_global_state_dict(chunks, torch.load(weights))
        else:
            sd = gather_global_state_dict(chunks)
            if dist.get_rank() == 0:
                torch.save(sd, weights)
            dist.barrier()
        chunks = wrap_ddp(chunks, config, use_distributed_optimizer=dist_opt)
        opt = build_optimizer(chunks, config, lr=1e-3, weight_decay=0.1, clip_grad=1.0,
                              use_distributed_optimizer=dist_opt)
        return layout, chunks, opt

    def steps(layout, chunks, opt, first_step, count):
        out = []
        for s in range(first_step, first_step + count):
            r = train_step(chunks, opt, batches(s, layout.dp, ps.get_data_parallel_rank(), model_cfg.vocab_size),
                           seq_length=SEQ, micro_batch_size=MICRO)
            out.append(r.loss)
        return out

    def done(chunks):
        del chunks
        ps.destroy_model_parallel()

    result = {"pairs": {}, "adam_steps": {}}
    layout, chunks, opt = build(first)
    result["ref"] = steps(layout, chunks, opt, 1, args.k + args.n)[args.k:]
    done(chunks)
    for name in sources:
        layout, chunks, opt = build(name)
        steps(layout, chunks, opt, 1, args.k)
        ckpt.save(os.path.join(work, name), args.k, chunks, opt, None, {"consumed_samples": args.k * GLOBAL_BATCH},
                  optimizer_format="dp_reshardable" if name.endswith("+dp") else args.format)
        done(chunks)
    for a, b in pairs:
        layout, chunks, opt = build(b)
        ckpt.load(ckpt.find_resume(os.path.join(work, a), cleanup=False), chunks, opt)
        result["pairs"][f"{a}>{b}"] = steps(layout, chunks, opt, args.k + 1, args.n)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, adam_steps(opt))
        result["adam_steps"][f"{a}>{b}"] = sorted({x for r in every for x in r})
        done(chunks)
    if optimizer == "plain":
        result["legacy_cross_ep"] = legacy_refusal(work, pairs, build, done, ckpt)
    fast = next((a for a, _ in pairs if a.endswith("+dp")), None)
    if fast:  # the fast format at another layout: refused before loading
        other = next(n for n in sources if parallel_config(n) != parallel_config(fast))
        layout, chunks, opt = build(other)
        try:
            ckpt.load(ckpt.find_resume(os.path.join(work, fast), cleanup=False), chunks, opt)
            result["fast_format_other_layout"] = None
        except ckpt.CheckpointMismatch as exc:
            result["fast_format_other_layout"] = str(exc)
        done(chunks)
    dist.barrier()
    if dist.get_rank() == 0:
        if args.keep and optimizer == "plain":
            shutil.copytree(os.path.join(work, sources[0]), args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
