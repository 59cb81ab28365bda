"""Training throughput: tokens/s and MFU of the real trainer in several parallel layouts.

    # CPU (2 cores): the tiny preset in four layouts on 2 or 4 processes
    python tools/bench_train.py
    # GPU: a 2-layer slice of scidfm-18b at full width (d 3200, 8 experts x 8640), bf16, TE if installed
    python tools/bench_train.py --gpu-slice --layouts dp,ep2,tp2,tp2ep2 --nproc 2

Each layout is one torchrun launch of scidfm_megatron.pretrain on the sample corpus (prepared by
scripts/prepare_sample_data.sh into --runs); the first --warmup steps are discarded and the rest
averaged. MFU = achieved model FLOP/s per device (PaLM convention, model/accounting.py) / the device's
dense bf16 peak (known GPUs, or --peak-tflops). On CPU no peak is known: the table gives GFLOP/s/device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {"dp": dict(tp=1, pp=1, ep=1), "ep2": dict(tp=1, pp=1, ep=2), "tp2": dict(tp=2, pp=1, ep=1),
           "pp2": dict(tp=1, pp=2, ep=1), "tp2ep2": dict(tp=2, pp=1, ep=2), "pp2ep2": dict(tp=1, pp=2, ep=2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="dp,ep2,tp2,pp2", help=f"from {sorted(LAYOUTS)}; DP fills the rest")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--gpu-slice", action="store_true", help="scidfm-18b at full width, 2 layers, bf16")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--runs", default=str(ROOT / "runs"), help="where prepare_sample_data.sh wrote tokenizer/ and data/")
    args = ap.parse_args()
    from scidfm_megatron.testing.distributed import run_torchrun

    runs = Path(args.runs)
    if not (runs / "tokenizer" / "tokenizer.model").exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "prepare_sample_data.sh")], check=True, cwd=ROOT,
                       env={**__import__("os").environ, "RUNS": str(runs), "PY": sys.executable})
    vocab = json.loads((runs / "tokenizer" / "science_tokens.json").read_text())["vocab_size"]
    model = ["model.preset=scidfm-18b", "model.num_layers=2", "train.precision=bf16"] if args.gpu_slice else []
    rows = []
    for name in args.layouts.split(","):
        lay = LAYOUTS[name]
        with tempfile.TemporaryDirectory() as tmp:
            metrics = Path(tmp) / "m.jsonl"
            over = [f"model.vocab_size={vocab}", f"model.max_seq_length={args.seq_length}",
                    f"parallel.tp={lay['tp']}", f"parallel.pp={lay['pp']}", f"parallel.ep={lay['ep']}",
                    f"train.train_iters={args.iters}", f"train.seq_length={args.seq_length}",
                    f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}",
                    "train.warmup_iters=1", "train.eval_interval=null", "checkpoint.save=null",
                    f"data.tokenizer_model={runs / 'tokenizer' / 'tokenizer.model'}", f"data.data_root={runs / 'data'}",
                    f"logging.metrics_file={metrics}", "logging.log_interval=1000", *model]
            if args.peak_tflops:
                over.append(f"logging.peak_tflops={args.peak_tflops}")
            run_torchrun("-m", args.nproc, ["scidfm_megatron.pretrain", "--config",
                                            str(ROOT / "examples" / "recipes" / "tiny_stage1.yaml"), *over], timeout=1800)
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


if __name__ == "__main__":
    main()
