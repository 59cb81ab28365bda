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

Layouts: each is one torchrun launch of scidfm_megatron.train (--stage pretrain) on the sample corpus (prepared by
scripts/prepare_sample_data.sh into --runs); the first --warmup steps are discarded and the rest
averaged. MFU = achieved model FLOP/s per device (PaLM convention, model/accounting.py) / the device's
dense bf16 peak (known GPUs, or --peak-tflops). On CPU no peak is known: the table gives GFLOP/s/device.

The --overhead mode (the trainer against a bare megatron-core loop): scidfm_megatron/bench/overhead.py;
--gpu-slice and --kernels-only: scidfm_megatron/bench/gpu_slice.py. ``tools/bench_train.py`` launches this
module (as does ``python -m scidfm_megatron.bench.train``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: examples/, scripts/

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
            "checkpoint.save=null", "logging.tensorboard_dir=null",
            f"data.tokenizer_model={runs / 'tokenizer' / 'tokenizer.model'}", f"data.data_root={runs / 'data'}"]
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
            entry = ["scidfm_megatron.train", "--stage", "pretrain", "--config", args.recipe]
            run_torchrun("-m", args.nproc, [*entry, *over], timeout=1800)
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


def run(argv=None):
    """The benchmark the arguments select; returns its results (the --gpu-slice dict, the overhead rows...),
    or 2 after refusing --gpu-slice without CUDA."""
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.overhead_worker:
        from .overhead import overhead_worker

        return overhead_worker(args)
    if args.kernels_only:
        from scidfm_megatron.config import ParallelConfig
        from scidfm_megatron.model.presets import get_preset
        from scidfm_megatron.parallel import init_distributed

        from .gpu_slice import DRY, SLICE, bench_kernels

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
            from .gpu_slice import bench_gpu_slice

            return bench_gpu_slice(args)
    runs = Path(args.runs).resolve()
    vocab = ensure_sample_data(runs)
    if args.overhead:
        from .overhead import bench_overhead

        return bench_overhead(args, runs)
    return bench_layouts(args, runs, vocab)


def main(argv=None) -> int:
    r = run(argv)
    return r if isinstance(r, int) else 0


if __name__ == "__main__":
    sys.exit(main())
