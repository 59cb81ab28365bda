"""Training throughput: tokens/s and MFU of the real trainer in several parallel layouts, and the trainer's
overhead over a bare megatron-core loop.

    # CPU (2 cores): the tiny preset in four layouts on 2 or 4 processes
    python tools/bench_train.py
    # the trainer's step time beside a bare megatron-core loop on the same model, optimizer and data
    python tools/bench_train.py --overhead
    # GPU, one device: the 2-layer scidfm-18b slice at full width (d 3200, 32 x 100 heads, 8 experts x 8640,
    # seq 8192, bf16) per backend present (local, torch, te), attention fused vs unfused, kernels
    python tools/bench_train.py --gpu-slice [--json FILE]     # --dry-run: the same code on CPU, toy width
    python tools/bench_train.py --kernels-only --seq-length 2048  # RMSNorm / SwiGLU / cross-entropy, any device
    # GPU: the same slice through the trainer in parallel layouts (torchrun, sample data)
    python tools/bench_train.py --gpu-slice --layouts dp,ep2,tp2,tp2ep2 --nproc 2

Layouts: each is one torchrun launch of scidfm_megatron.pretrain on the sample corpus (prepared by
scripts/prepare_sample_data.sh into --runs); the first --warmup steps are discarded and the rest
averaged. MFU = achieved model FLOP/s per device (PaLM convention, model/accounting.py) / the device's
dense bf16 peak (known GPUs, or --peak-tflops). On CPU no peak is known: the table gives GFLOP/s/device.

Overhead (--overhead): one torchrun launch per layout (default: the recipe's, EP2 on 2 processes) builds
one real Trainer (load_run_config + Trainer.setup(); no checkpoints, evaluation, TensorBoard or metrics
file; expert-load statistics and console lines as the recipe says) and times, alternately over --rounds
rounds of --steps steps each (after --warmup-steps of each), on the same model chunks, optimizer, LR
schedule and dataset, continuing one training run:
  trainer: Trainer.train() for --steps more iterations (its whole loop: batches from the dataset,
           train_step, LR schedule, MoE aux loss, NaN check, expert load, reporter, stop flag);
  bare:    megatron-core alone: per step the same micro_batches() from the same dataset, zero the grad
           buffers, get_forward_backward_func() with a minimal forward step (masked-mean loss),
           optimizer.step(), scheduler.step(1).
Each round is timed barrier to barrier and divided by --steps: wall time on rank 0, and CPU time
(process_time, summed over the ranks; unlike wall time it does not count the time other load on a shared
machine keeps the job off the cores). The order alternates by round. Verdict per measure: the median
over rounds of each round's trainer/bare ratio (paired in time, so slow drifts of the load cancel), at
most 1 + --max-overhead, with a distribution-free 95% interval of that median. --breakdown times the
parts of the trainer's loop in one more round; --profile writes cProfile stats of rank 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {"dp": dict(tp=1, pp=1, ep=1), "ep2": dict(tp=1, pp=1, ep=2), "tp2": dict(tp=2, pp=1, ep=1),
           "pp2": dict(tp=1, pp=2, ep=1), "tp2ep2": dict(tp=2, pp=1, ep=2), "pp2ep2": dict(tp=1, pp=2, ep=2)}
RECIPE = ROOT / "examples" / "recipes" / "tiny_stage1.yaml"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=None,
                    help=f"from {sorted(LAYOUTS)}; DP fills the rest (default: dp,ep2,tp2,pp2; with --overhead "
                         f"the recipe's own layout)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--gpu-slice", action="store_true",
                    help="scidfm-18b at full width, 2 layers, bf16, one GPU: tokens/s, MFU, peak memory and the "
                         "memory plan for each backend present (local, torch, te), then attention alone, padded "
                         "fused vs unfused (needs CUDA; with --layouts: the trainer in those layouts instead)")
    ap.add_argument("--recompute", default="selective", help="--gpu-slice: train.recompute (default selective)")
    ap.add_argument("--dry-run", action="store_true", help="--gpu-slice on CPU at a toy width: the code path only")
    ap.add_argument("--kernels-only", action="store_true",
                    help="only the kernel measurements (RMSNorm, SwiGLU, cross-entropy) at the slice's width, on "
                         "this device (CPU or GPU)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--runs", default=str(ROOT / "runs"),
                    help="where prepare_sample_data.sh wrote tokenizer/ and data/")
    g = ap.add_argument_group("overhead: the trainer against a bare megatron-core loop")
    g.add_argument("--overhead", action="store_true", help="time the trainer's steps beside a bare megatron-core loop")
    g.add_argument("--recipe", default=str(RECIPE))
    g.add_argument("--rounds", type=int, default=20)
    g.add_argument("--steps", type=int, default=2, help="steps per round and side")
    g.add_argument("--warmup-steps", type=int, default=2, help="untimed steps of each side first")
    g.add_argument("--max-overhead", type=float, default=0.05, help="PASS threshold on trainer/bare - 1")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override, e.g. --set logging.expert_load=false (repeatable)")
    g.add_argument("--breakdown", action="store_true",
                   help="one more trainer round with the loop's parts timed (not counted in the ratio)")
    g.add_argument("--profile", default=None, metavar="FILE",
                   help="cProfile rank 0 over one more trainer round and one more bare round; "
                        "stats to FILE.{trainer,bare}")
    g.add_argument("--json", default=None, metavar="FILE",
                   help="also write the overhead (or --gpu-slice) results as JSON")
    g.add_argument("--verbose", action="store_true", help="print the workers' output")
    ap.add_argument("--overhead-worker", default=None, help=argparse.SUPPRESS)  # internal: the torchrun side
    return ap.parse_args(argv)


def ensure_sample_data(runs: Path) -> int:
    """Prepare the sample corpus into ``runs`` if needed; returns the tokenizer's vocabulary size."""
    import os

    if not (runs / "tokenizer" / "tokenizer.model").exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "prepare_sample_data.sh")], check=True, cwd=ROOT,
                       env={**os.environ, "RUNS": str(runs), "PY": sys.executable})
    return json.loads((runs / "tokenizer" / "science_tokens.json").read_text())["vocab_size"]


def base_overrides(args, runs: Path, vocab: int, lay: dict | None) -> list[str]:
    over = [f"model.vocab_size={vocab}", f"model.max_seq_length={args.seq_length}",
            f"train.seq_length={args.seq_length}", f"train.global_batch_size={args.global_batch}",
            f"train.micro_batch_size={args.micro_batch}", "train.warmup_iters=1", "train.eval_interval=null",
            "checkpoint.save=null", f"data.tokenizer_model={runs / 'tokenizer' / 'tokenizer.model'}",
            f"data.data_root={runs / 'data'}"]
    if lay is not None:
        over += [f"parallel.tp={lay['tp']}", f"parallel.pp={lay['pp']}", f"parallel.ep={lay['ep']}"]
    if args.gpu_slice:
        over += ["model.preset=scidfm-18b", "model.num_layers=2", "train.precision=bf16"]
    if args.peak_tflops:
        over.append(f"logging.peak_tflops={args.peak_tflops}")
    return over


# ---------------------------------------------------------------------------------------------- layouts
def bench_layouts(args, runs: Path, vocab: int):
    from scidfm_megatron.testing.distributed import run_torchrun

    rows = []
    for name in (args.layouts or "dp,ep2,tp2,pp2").split(","):
        lay = LAYOUTS[name]
        with tempfile.TemporaryDirectory() as tmp:
            metrics = Path(tmp) / "m.jsonl"
            over = base_overrides(args, runs, vocab, lay) + [
                f"train.train_iters={args.iters}", f"logging.metrics_file={metrics}", "logging.log_interval=1000"]
            run_torchrun("-m", args.nproc, ["scidfm_megatron.pretrain", "--config", args.recipe, *over], timeout=1800)
            steps = [json.loads(line) for line in open(metrics)][args.warmup:]
        tps = sum(s["tokens_per_s"] for s in steps) / len(steps)
        tfl = sum(s["tflops_per_device"] for s in steps) / len(steps)
        mfu = steps[0]["mfu"] and sum(s["mfu"] for s in steps) / len(steps)
        rows.append((name, lay, tps, tfl, mfu, max(s["memory_gb"] for s in steps)))
    what = "scidfm-18b 2-layer slice (bf16)" if args.gpu_slice else "scidfm-tiny (fp32)"
    print(f"\n{what}, {args.nproc} processes, global batch {args.global_batch} x {args.seq_length} tokens, "
          f"mean of steps {args.warmup + 1}..{args.iters}")
    print(f"{'layout':<10}{'TP/PP/EP/DP':>12}{'tokens/s':>12}{'GFLOP/s/dev':>14}{'MFU':>8}{'mem GB':>9}")
    base = rows[0][2]
    for name, lay, tps, tfl, mfu, mem in rows:
        dp = args.nproc // (lay["tp"] * lay["pp"])
        shape = f"{lay['tp']}/{lay['pp']}/{lay['ep']}/{dp}"
        print(f"{name:<10}{shape:>12}{tps:>12,.0f}"
              f"{tfl * 1e3:>14.1f}{(f'{mfu:.1%}' if mfu else 'n/a'):>8}{mem:>9.2f}   ({tps / base:.2f}x {rows[0][0]})")


# --------------------------------------------------------------------------------------------- overhead
def _bare_loss(loss_mask, output_tensor):
    """Masked-mean token loss of one micro-batch (Megatron-LM's legacy 2-tuple convention)."""
    import torch

    mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.float().view(-1) * mask) / mask.sum().clamp(min=1)
    # a copy: megatron's schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def _bare_forward_step(data_iterator, model):
    from functools import partial

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_bare_loss, batch["loss_mask"])


class BareLoop:
    """megatron-core alone on the trainer's chunks, optimizer, LR schedule and training data. Steps continue
    the trainer's run (its iteration and consumed-samples counters advance), so both sides train one model."""

    def __init__(self, trainer):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.tr, self.fb = trainer, get_forward_backward_func()
        self.last = None  # the last step's per-micro-batch loss dicts (last pipeline stage)

    def step(self):
        from scidfm_megatron.training.data import micro_batches

        tr, t = self.tr, self.tr.cfg.train
        mbs = micro_batches(tr.train_ds, tr.consumed, t.global_batch_size, t.micro_batch_size, tr.dp_rank, tr.dp)
        for c in tr.chunks:
            c.zero_grad_buffer()
        tr.optimizer.zero_grad()
        iters = [iter(mbs) for _ in tr.chunks] if len(tr.chunks) > 1 else iter(mbs)
        self.last = self.fb(forward_step_func=_bare_forward_step, data_iterator=iters, model=tr.chunks,
                            num_microbatches=len(mbs), seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                            forward_only=False)
        tr.optimizer.step()
        tr.scheduler.step(1)
        tr.iteration += 1
        tr.consumed += t.global_batch_size

    def run(self, k: int):
        for _ in range(k):
            self.step()

    def last_loss(self):
        """The last step's loss, averaged over micro-batches and DP ranks (untimed), on every rank."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        stat = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and self.last:
            stat += torch.tensor([sum(float(d["lm loss"]) for d in self.last), len(self.last)], dtype=torch.float64)
            dist.all_reduce(stat, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(stat, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return float(stat[0] / stat[1]) if stat[1] else None


def _trainer_run(trainer, k: int):
    trainer.train_iters = trainer.iteration + k
    trainer.train()


class _Timed:
    """Monkeypatched wrappers that add each call's wall time to a named total (--breakdown)."""

    def __init__(self):
        self.total: dict[str, float] = {}

    def wrap(self, name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t0
        return timed


def _breakdown(trainer, k: int) -> dict:
    """One more trainer round with its loop's parts timed: module functions it imports at call time are
    patched in their modules, the trainer's parts on the instances; undone afterwards."""
    import torch.distributed as dist

    from scidfm_megatron.model import routing
    from scidfm_megatron.training import data, step

    tm = _Timed()
    patches = [(data, "micro_batches"), (step, "train_step")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in patches]
    for mod, name in patches:
        setattr(mod, name, tm.wrap(name, getattr(mod, name)))
    inst = [(trainer, "_moe_aux"), (trainer, "_stop_everywhere"), (trainer.scheduler, "step"),
            (trainer.reporter, "step"), (trainer.reporter, "start_step"),
            (trainer.guard, "optimizer_step"), (trainer.guard, "check")]  # the optimizer step is the guard's
    if trainer.expert_load is not None:
        inst.append((trainer.expert_load, "reduce"))
    for obj, name in inst:
        setattr(obj, name, tm.wrap(f"{type(obj).__name__}.{name}", getattr(obj, name)))
    rec_cls = routing.RouterRecorder

    class TimedRecorder(rec_cls):
        def _hook(self, *a):
            return tm.wrap("RouterRecorder._hook (inside train_step)", super()._hook)(*a)

        def __enter__(self):
            return tm.wrap("RouterRecorder.__enter__/__exit__", super().__enter__)()

        def __exit__(self, *exc):
            return tm.wrap("RouterRecorder.__enter__/__exit__", super().__exit__)(*exc)

    routing.RouterRecorder = TimedRecorder
    try:
        dist.barrier()
        t0 = time.perf_counter()
        _trainer_run(trainer, k)
        dist.barrier()
        total = time.perf_counter() - t0
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        for obj, name in inst:
            delattr(obj, name)
        routing.RouterRecorder = rec_cls
    parts = {name: v / k for name, v in tm.total.items()}
    parts["rest of the loop (train() call, barrier, ...)"] = total / k - sum(
        v for n, v in parts.items() if "inside train_step" not in n)
    return dict(step_s=total / k, parts=parts)


def overhead_worker(args):
    import statistics

    import torch
    import torch.distributed as dist

    from scidfm_megatron.parallel import destroy_distributed
    from scidfm_megatron.training.config import load_run_config
    from scidfm_megatron.training.trainer import Trainer

    runs = Path(args.runs)
    vocab = json.loads((runs / "tokenizer" / "science_tokens.json").read_text())["vocab_size"]
    lay = LAYOUTS[args.layouts] if args.layouts else None
    extra_rounds = int(args.breakdown) + int(bool(args.profile))
    iters = 2 * args.warmup_steps + 2 * args.rounds * args.steps + extra_rounds * 2 * args.steps
    over = base_overrides(args, runs, vocab, lay) + [
        f"train.train_iters={iters}", "logging.tensorboard_dir=null", "logging.metrics_file=null", *args.set]
    cfg = load_run_config(args.recipe, over)
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        rank0 = dist.get_rank() == 0
        bare = BareLoop(trainer)

        cpu = []  # CPU seconds per step of the last timed() call, summed over ranks

        def timed(fn, k):
            """Wall seconds per step, barrier to barrier, on rank 0; CPU seconds per step (this process's
            threads, every rank, summed) into cpu[0]: CPU time does not count the time a shared machine's
            other load keeps this job off the cores."""
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(k)
            c1 = time.process_time()
            dist.barrier()
            wall = (time.perf_counter() - t0) / k
            c = torch.tensor([(c1 - c0) / k], dtype=torch.float64)
            dist.all_reduce(c)
            cpu[:] = [float(c)]
            return wall

        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        sides = {"trainer": lambda k: _trainer_run(trainer, k), "bare": bare.run}
        timed(sides["trainer"], args.warmup_steps)
        timed(sides["bare"], args.warmup_steps)
        clear_aux_losses_tracker()  # the bare loop never reads megatron's aux-loss tracker: keep it clean
        per, per_cpu = {"trainer": [], "bare": []}, {"trainer": [], "bare": []}
        for r in range(args.rounds):
            for side in (("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")):
                per[side].append(timed(sides[side], args.steps))
                per_cpu[side].append(cpu[0])
                clear_aux_losses_tracker()
        trainer_loss = trainer.history[-1]["loss"]
        bare_loss = bare.last_loss()
        res = dict(layout=str(trainer.layout), world_size=dist.get_world_size(), steps=args.steps,
                   rounds=args.rounds, per_step_s=per,
                   ratios=[a / b for a, b in zip(per["trainer"], per["bare"], strict=False)],
                   cpu_per_step_s=per_cpu,
                   cpu_ratios=[a / b for a, b in zip(per_cpu["trainer"], per_cpu["bare"], strict=False)],
                   trainer_loss=trainer_loss, bare_loss=bare_loss, iteration=trainer.iteration,
                   expert_load=cfg.logging.expert_load, log_interval=cfg.logging.log_interval,
                   trainer_reporter_step_s=statistics.median(h["step_s"] for h in trainer.history[-args.steps:]))
        if args.breakdown:
            res["breakdown"] = _breakdown(trainer, args.steps)
            clear_aux_losses_tracker()
            res["breakdown"]["bare_step_s"] = timed(sides["bare"], args.steps)
            clear_aux_losses_tracker()
        if args.profile:
            import cProfile

            for side in ("trainer", "bare"):
                prof = cProfile.Profile()
                if rank0:
                    prof.enable()
                timed(sides[side], args.steps)
                prof.disable()
                clear_aux_losses_tracker()
                if rank0:
                    prof.dump_stats(f"{args.profile}.{side}")
            res["profile"] = [f"{args.profile}.trainer", f"{args.profile}.bare"]
        if rank0:
            Path(args.overhead_worker).write_text(json.dumps(res))
    finally:
        destroy_distributed()


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: order statistics k and n+1-k, with k the
    largest such that P(Binomial(n, 1/2) < k) <= (1 - level) / 2. (min, max) when n is too small."""
    from math import comb

    xs, n = sorted(xs), len(xs)
    k, tail = 0, 0.0
    while k < n // 2 and tail + comb(n, k) / 2 ** n <= (1 - level) / 2:
        tail += comb(n, k) / 2 ** n
        k += 1
    k = max(k, 1)
    return xs[k - 1], xs[n - k]


def bench_overhead(args, runs: Path) -> list[dict]:
    import statistics

    from scidfm_megatron.testing.distributed import run_torchrun

    results = []
    for name in (args.layouts.split(",") if args.layouts else [None]):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "overhead.json"
            argv = list(args.argv)
            if args.layouts:  # one layout per launch
                i = argv.index("--layouts") if "--layouts" in argv else None
                argv = [a for j, a in enumerate(argv) if i is None or j not in (i, i + 1)]
                argv = [a for a in argv if not a.startswith("--layouts=")] + ["--layouts", name]
            log = run_torchrun(Path(__file__), args.nproc, [*argv, "--runs", str(runs), "--overhead-worker", str(out)],
                               timeout=3600)
            if args.verbose:
                print(log)
            res = json.loads(out.read_text())
        res["name"] = name or "recipe"
        results.append(res)
        print(f"\ntrainer vs bare megatron-core loop: {Path(args.recipe).name} on {res['layout']}\n"
              f"global batch {args.global_batch} x {args.seq_length} tokens, micro-batch {args.micro_batch}; "
              f"{res['rounds']} rounds x {res['steps']} steps per side, alternating, after {args.warmup_steps} warmup "
              f"steps each\ntrainer: expert load {'on' if res['expert_load'] else 'off'}, console line every "
              f"{res['log_interval']} steps, no checkpoint/eval/TensorBoard/metrics file")
        print(f"{'ms per step':<22}{'median':>9}{'mean':>9}{'min':>9}{'max':>9}   last loss")
        for what, key in (("wall", "per_step_s"), ("CPU, all ranks", "cpu_per_step_s")):
            for side in ("trainer", "bare"):
                v = res[key][side]
                print(f"{side + ' (' + what + ')':<22}"
                      f"{statistics.median(v) * 1e3:>9.1f}{statistics.mean(v) * 1e3:>9.1f}"
                      f"{min(v) * 1e3:>9.1f}{max(v) * 1e3:>9.1f}   {res[side + '_loss']:.4f}")
        for what, key, rkey in (("wall", "per_step_s", "ratios"), ("cpu", "cpu_per_step_s", "cpu_ratios")):
            tr, ba = res[key]["trainer"], res[key]["bare"]
            ratio, (lo, hi) = statistics.median(res[rkey]), median_ci(res[rkey])
            ok = ratio <= 1 + args.max_overhead
            res[what] = dict(ratio=ratio, ci95=[lo, hi], ratio_of_medians=statistics.median(tr) / statistics.median(ba),
                             passed=ok)
            note = "" if hi <= 1 + args.max_overhead or lo > 1 + args.max_overhead else \
                "; noisy: the interval spans the limit (more --rounds)"
            print(f"{'PASS' if ok else 'FAIL'} ({what}): trainer/bare {ratio:.3f}, overhead {ratio - 1:+.1%} "
                  f"(median of {len(res[rkey])} per-round ratios, 95% CI {lo:.3f}..{hi:.3f}; ratio of medians "
                  f"{res[what]['ratio_of_medians']:.3f}; limit {args.max_overhead:.0%}{note})")
        if args.verbose:
            for what, rkey in (("wall", "ratios"), ("cpu", "cpu_ratios")):
                print(f"  per-round {what} ratios: " + " ".join(f"{x:.3f}" for x in res[rkey]))
        if "breakdown" in res:
            b = res["breakdown"]
            print(f"\nbreakdown of one more trainer round (rank 0, ms per step; {b['step_s'] * 1e3:.1f} ms/step "
                  f"with the timers; bare loop right after: {b['bare_step_s'] * 1e3:.1f} ms/step)")
            for part, v in sorted(b["parts"].items(), key=lambda kv: -kv[1]):
                print(f"  {part:<52}{v * 1e3:>9.2f}")
        if res.get("profile"):
            print(f"\ncProfile of rank 0 (one round each): {', '.join(res['profile'])} "
                  f"(python -m pstats FILE; sort tottime; stats 30)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


# ------------------------------------------------------------------------------------------- GPU slice
SLICE = dict(num_layers=2)  # scidfm-18b at full width: d 3200, 32 x 100 heads, 8 experts x 8640, vocab 32196
DRY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4, head_dim=20,
           moe_ffn_hidden_size=96, vocab_size=500)  # --dry-run: the same code on CPU, at a toy width


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak():
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def slice_backends() -> list[str]:
    """Backends present here: local and torch always; te and te-sdpa (auto's choice with TE) when
    TransformerEngine imports and CUDA is there."""
    from scidfm_megatron.config import ConfigError
    from scidfm_megatron.model.builder import resolve_backend

    out = ["local", "torch"]
    try:
        resolve_backend("te")
        out += ["te", "te-sdpa"]
    except ConfigError:
        pass
    return out


def bench_slice_backend(cfg, backend: str, args) -> dict:
    """One backend: the slice's model + DDP + optimizer on this device, --iters real training steps
    (train_step: megatron's schedule and optimizer) on random tokens, after --warmup untimed ones."""
    import dataclasses
    import gc

    import torch

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.accounting import memory_plan, training_flops_per_token
    from scidfm_megatron.model.builder import build_model_chunks, describe_implementations
    from scidfm_megatron.training.engine import build_optimizer, wrap_ddp
    from scidfm_megatron.training.metrics import detect_peak_tflops
    from scidfm_megatron.training.step import train_step

    m = dataclasses.replace(cfg, backend=backend)
    seq, mb = args.seq_length, args.micro_batch
    recompute = None if args.recompute in ("null", "none") else args.recompute
    row = dict(backend=backend, seq=seq, micro_batch=mb, recompute=recompute)
    base = _peak_reset()
    chunks = optimizer = None
    try:
        chunks = build_model_chunks(m, ParallelConfig(), precision="bf16", recompute=recompute)
        row["implementations"] = describe_implementations(chunks)
        config = chunks[0].config
        chunks = wrap_ddp(chunks, config)
        optimizer = build_optimizer(chunks, config, lr=1e-5)
        dev = next(chunks[0].parameters()).device
        g = torch.Generator().manual_seed(0)

        def batch():
            t = torch.randint(0, m.vocab_size, (mb, seq + 1), generator=g)
            return [dict(tokens=t[:, :-1].contiguous().to(dev), labels=t[:, 1:].contiguous().to(dev),
                         loss_mask=torch.ones(mb, seq, device=dev),
                         position_ids=torch.arange(seq, device=dev).expand(mb, seq).contiguous())]

        for _ in range(args.warmup):
            train_step(chunks, optimizer, batch(), seq_length=seq, micro_batch_size=mb)
        _sync()
        times = []
        for _ in range(args.iters):
            b = batch()
            _sync()
            t0 = time.perf_counter()
            loss = train_step(chunks, optimizer, b, seq_length=seq, micro_batch_size=mb).loss
            _sync()
            times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        tps = mb * seq / step
        peak_tflops = args.peak_tflops or detect_peak_tflops()
        flops = training_flops_per_token(m, seq)
        plan = memory_plan(m, world_size=1, seq_len=seq, micro_batch=mb, recompute=recompute, backend=backend,
                           precision="bf16", distributed_optimizer=False)
        row.update(step_s=step, tokens_per_s=tps, tflops=flops * tps / 1e12, loss=loss,
                   mfu=(flops * tps / (peak_tflops * 1e12)) if peak_tflops else None,
                   peak_gib=(_peak() - base) / 2**30 if torch.cuda.is_available() else None,
                   plan_gib=(plan.total - plan.reserve) / 2**30)
    except Exception as exc:  # noqa: BLE001  one backend failing (out of memory, a kernel refused) must not hide the others
        row.update(error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
    finally:
        del chunks, optimizer
        from megatron.core import parallel_state as ps

        # the unfused attention's [b * heads, s, s] scratch buffer lives in megatron's global buffer: free it
        ps.destroy_global_memory_buffer()
        ps._set_global_memory_buffer()
        gc.collect()
        _peak_reset()
    return row


def bench_attention(args, heads: int, head_dim: int, seq: int) -> list[dict]:
    """Causal attention, forward + backward, bf16, [1, heads, seq, head_dim]: the torch backend's padded
    SDPA as SDPA picks (the kernel it took named), then on GPU restricted to each fused kernel (flash, cuDNN,
    memory-efficient: a refusal is a row's error, not a fallback), against the unfused path (SDPA's math
    kernel: the scores of every head materialised, as megatron's local DotProductAttention does). Median
    time of --iters runs and the peak memory above the inputs."""
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scidfm_megatron.model.torch_backend import sdpa_kernel_of, sdpa_padded

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    variants = [("padded, SDPA's choice", None)]
    if dev == "cuda":
        variants += [("padded flash", [SDPBackend.FLASH_ATTENTION]), ("padded cuDNN", [SDPBackend.CUDNN_ATTENTION]),
                     ("padded efficient", [SDPBackend.EFFICIENT_ATTENTION])]
    variants.append(("unfused (math)", [SDPBackend.MATH]))
    rows = []
    for name, kernels in variants:
        times, peak, taken = [], 0, None
        try:
            for i in range(args.warmup + args.iters):
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
                base = _peak_reset()
                _sync()
                t0 = time.perf_counter()

                def fwd_bwd():
                    # called only within this iteration, before the del below frees the inputs
                    out = sdpa_padded(qq, kk, vv, is_causal=True)  # noqa: B023, F821
                    out.backward(torch.ones_like(out))

                with sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
                    if i == 0:
                        taken = sdpa_kernel_of(fwd_bwd)
                    else:
                        fwd_bwd()
                _sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
                    peak = max(peak, _peak() - base)
                del qq, kk, vv
            rows.append(dict(kernel=name, taken=taken, ms=1e3 * sorted(times)[len(times) // 2],
                             peak_gib=peak / 2**30 if dev == "cuda" else None))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            rows.append(dict(kernel=name, error=str(exc).splitlines()[0][:160]))
    return rows


def _time_fwd_bwd(fn, make_inputs, args) -> dict:
    """Median forward + backward time (ms) of ``fn`` over --iters runs after --warmup, and the peak memory
    above its inputs (GPU)."""
    import torch

    times, peak = [], 0
    for i in range(args.warmup + args.iters):
        inputs = make_inputs()
        base = _peak_reset()
        _sync()
        t0 = time.perf_counter()
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        _sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            peak = max(peak, _peak() - base)
        del inputs, out
    return dict(ms=1e3 * sorted(times)[len(times) // 2], peak_gib=peak / 2**30 if torch.cuda.is_available() else None)


def bench_kernels(args, cfg) -> list[dict]:
    """The elementwise kernels the issue asks to fuse where PyTorch or megatron-core offer it without TE,
    at the slice's shapes (bf16, tokens = seq x micro-batch): RMSNorm (torch.nn.functional.rms_norm, which
    every backend's RMSNorm calls, vs the composed formula), the experts' weighted SwiGLU (the torch
    backend's eager form vs megatron's weighted_bias_swiglu_impl, torch.compile'd) and the loss
    (megatron's vocab-parallel cross-entropy, its fused variant, torch.compile'd, and F.cross_entropy).
    Each row is the measurement that decides whether the fused variant is switched on (docs/kernels.md)."""
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from scidfm_megatron.model.torch_backend import experts_class

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bf = torch.bfloat16
    T, h, f, k, V = (args.seq_length * args.micro_batch, cfg.hidden_size, cfg.moe_ffn_hidden_size,
                     cfg.moe_router_topk, cfg.padded_vocab_size)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=bf, grad=True):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g).requires_grad_(grad)

    eps = cfg.rms_norm_eps
    w = torch.ones(h, device=dev, dtype=bf, requires_grad=True)
    act = experts_class()._act
    tp = ps.get_tensor_model_parallel_group()
    labels = torch.randint(0, V, (args.seq_length, args.micro_batch), device=dev, generator=g)
    cases = [
        ("rmsnorm", f"[{T}, {h}]", [
            ("F.rms_norm (every backend)", lambda x: F.rms_norm(x, (h,), w, eps)),
            ("composed", lambda x: x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(bf) * w)],
         lambda: (rnd(T, h),)),
        ("swiglu x probs", f"[{T * k}, {2 * f}]", [
            ("eager (torch backend)", lambda y, p: act(y, p)),
            ("megatron weighted_bias_swiglu_impl", lambda y, p: weighted_bias_swiglu_impl(y, None, p.unsqueeze(-1)))],
         lambda: (rnd(T * k, 2 * f), rnd(T * k, dtype=torch.float32))),
        ("cross-entropy", f"[{T}, {V}]", [
            ("megatron vocab_parallel (every backend)", lambda z: vocab_parallel_cross_entropy(z.float(), labels)),
            ("megatron fused_vocab_parallel", lambda z: fused_vocab_parallel_cross_entropy(z, labels, tp)),
            ("F.cross_entropy", lambda z: F.cross_entropy(z.float().flatten(0, 1), labels.flatten(),
                                                           reduction="none").view_as(labels))],
         lambda: (rnd(args.seq_length, args.micro_batch, V),)),
    ]
    rows = []
    for kernel, shape, variants, make in cases:
        for name, fn in variants:
            row = dict(kernel=kernel, shape=shape, variant=name)
            try:
                row.update(_time_fwd_bwd(fn, make, args))
            except Exception as exc:  # noqa: BLE001  e.g. torch.compile without a working Triton: reported, not fatal
                row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
            rows.append(row)
    print(f"\nkernels, forward + backward, bf16, {dev}")
    base = {}
    for r in rows:
        if "error" in r:
            print(f"  {r['kernel']:<15}{r['variant']:<42}{r['error']}")
            continue
        ref = base.setdefault(r["kernel"], r["ms"])
        mem = f"{r['peak_gib']:.3f} GiB" if r["peak_gib"] is not None else "n/a"
        print(f"  {r['kernel']:<15}{r['variant']:<42}{r['ms']:>9.3f} ms  ({r['ms'] / ref:.2f}x)  peak {mem}   "
              f"{r['shape']}")
    return rows


def bench_gpu_slice(args) -> dict:
    import torch

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.presets import get_preset
    from scidfm_megatron.parallel import init_distributed

    if args.dry_run:
        cfg = get_preset("scidfm-18b", max_seq_length=args.seq_length, **DRY)
    else:
        cfg = get_preset("scidfm-18b", max_seq_length=args.seq_length, **SLICE)
    init_distributed(cfg, ParallelConfig())
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run: figures mean nothing)"
    print(f"\nscidfm-18b {cfg.num_layers}-layer slice (d {cfg.hidden_size}, {cfg.num_attention_heads} x "
          f"{cfg.head_dim} heads, {cfg.num_experts} experts x {cfg.moe_ffn_hidden_size}), seq {args.seq_length}, "
          f"micro-batch {args.micro_batch}, bf16, recompute {args.recompute}, one device: {dev}; "
          f"median of {args.iters} steps after {args.warmup}", flush=True)
    rows = [bench_slice_backend(cfg, b, args) for b in slice_backends()]
    print(f"{'backend':<9}{'tokens/s':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'plan GiB':>10}"
          f"{'plan/peak':>11}   implementations")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<9}  {r['error']}")
            continue
        ratio = f"{r['plan_gib'] / r['peak_gib']:.2f}" if r.get("peak_gib") else "n/a"
        print(f"{r['backend']:<9}{r['tokens_per_s']:>11,.0f}{r['tflops']:>10.2f}"
              f"{(format(r['mfu'], '.1%') if r['mfu'] else 'n/a'):>8}"
              f"{(format(r['peak_gib'], '.2f') if r['peak_gib'] is not None else 'n/a'):>10}"
              f"{r['plan_gib']:>10.2f}{ratio:>11}   attention {r['implementations']['attention']}, "
              f"experts {r['implementations']['experts']}")
    ok = {r["backend"]: r for r in rows if "error" not in r}
    if "torch" in ok and "local" in ok:
        print(f"torch / local: {ok['torch']['tokens_per_s'] / ok['local']['tokens_per_s']:.2f}x tokens/s")
    att = bench_attention(args, cfg.num_attention_heads, cfg.head_dim, args.seq_length)
    print(f"\nattention alone, causal, forward + backward, 1 x {cfg.num_attention_heads} heads x {args.seq_length} "
          f"x {cfg.head_dim}, bf16")
    for r in att:
        if "error" in r:
            print(f"  {r['kernel']:<28}{r['error']}")
        else:
            mem = f"{r['peak_gib']:.3f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
            print(f"  {r['kernel']:<28}{r['ms']:>10.2f} ms   peak {mem}   (kernel taken: {r['taken']})")
    if "error" not in att[0] and "error" not in att[-1] and att[0].get("peak_gib") and att[-1].get("peak_gib"):
        print(f"  fused ({att[0]['taken']}) / unfused memory: {att[0]['peak_gib'] / att[-1]['peak_gib']:.3f} "
              f"(issue 13 target <= 0.25); time: {att[0]['ms'] / att[-1]['ms']:.3f}")
    kernels = bench_kernels(args, cfg)
    result = dict(device=dev, seq=args.seq_length, micro_batch=args.micro_batch, backends=rows, attention=att,
                  kernels=kernels)
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(args.json)
    return result


def main(argv=None):
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.overhead_worker:
        return overhead_worker(args)
    if args.kernels_only:
        from scidfm_megatron.config import ParallelConfig
        from scidfm_megatron.model.presets import get_preset
        from scidfm_megatron.parallel import init_distributed

        cfg = get_preset("scidfm-18b", **(DRY if args.dry_run else SLICE))
        init_distributed(cfg, ParallelConfig())
        args.micro_batch = 1 if args.micro_batch == 4 else args.micro_batch
        return bench_kernels(args, cfg)
    if args.gpu_slice:
        import torch

        if not torch.cuda.is_available() and not args.dry_run:
            print("bench_train --gpu-slice: no CUDA device here; it measures the scidfm-18b slice on one GPU "
                  "(--dry-run runs its code on CPU at a toy width)", file=sys.stderr)
            return 2
        if not args.layouts:
            if args.seq_length == 128 and not args.dry_run:
                args.seq_length = 8192  # the slice's default: the model's context (--seq-length to change)
            args.micro_batch = 1 if args.micro_batch == 4 else args.micro_batch
            return bench_gpu_slice(args)
    runs = Path(args.runs).resolve()
    vocab = ensure_sample_data(runs)
    if args.overhead:
        return bench_overhead(args, runs)
    return bench_layouts(args, runs, vocab)


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
