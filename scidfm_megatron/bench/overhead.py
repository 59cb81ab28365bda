"""The trainer's step time beside a bare megatron-core loop (``tools/bench_train.py --overhead``).

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

import json
import tempfile
import time
from pathlib import Path

from .train import LAYOUTS, base_overrides


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

    class TimedRecorder(routing.RouterRecorder):
        def _hook(self, *a):
            return tm.wrap("RouterRecorder._hook (inside train_step)", super()._hook)(*a)

        def __enter__(self):
            return tm.wrap("RouterRecorder.__enter__/__exit__", super().__enter__)()

        def __exit__(self, *exc):
            return tm.wrap("RouterRecorder.__enter__/__exit__", super().__exit__)(*exc)

    setattr(routing, "RouterRecorder", TimedRecorder)  # noqa: B010  (mypy: a class is not assignable)
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
        setattr(routing, "RouterRecorder", rec_cls)  # noqa: B010
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

        cpu: list[float] = []  # CPU seconds per step of the last timed() call, summed over ranks

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
        per: dict[str, list[float]] = {"trainer": [], "bare": []}
        per_cpu: dict[str, list[float]] = {"trainer": [], "bare": []}
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
            # the workers run this benchmark's entry module (its --overhead-worker branch) under torchrun
            log = run_torchrun("-m", args.nproc, ["scidfm_megatron.bench.train", *argv, "--runs", str(runs),
                                                  "--overhead-worker", str(out)], timeout=3600)
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
