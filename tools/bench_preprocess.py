"""Benchmark: scidfm-preprocess vs Megatron-LM's tools/preprocess_data.py vs raw SentencePiece.

    python tools/bench_preprocess.py --megatron-lm /path/to/Megatron-LM --size-mb 200 --workers 2

Same input, tokenizer (the extended science tokenizer.model) and worker count for both tools. Prints,
per tool, wall time, MB/s, docs/s, tokens/s and the peak RSS summed over the tool's process tree
(sampled every 20 ms), the ratio to Megatron-LM, and raw SentencePiece's in-memory encode speed with as
many threads as workers (the ceiling: no JSON, no I/O). Also prints our peak RSS at 1/10 of the size,
to show memory does not grow with the input.

Input: ``--input FILE`` (jsonl with a "text" key), or generated: paragraphs of the sample corpus's
PMC papers recombined into abstract-sized documents until ``--size-mb``.
Megatron-LM: a checkout at tag core_v0.16.1 (matches megatron-core 0.16.1). Its tool imports
megatron.training, which needs ``six`` and ``triton`` importable (pip install six triton); its own
``megatron/core`` is not used (the installed megatron-core is), see run_megatron_lm().
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample_corpus"


def make_input(path: Path, size_mb: float, seed: int = 0) -> None:
    paras = []
    for line in open(SAMPLE / "papers.jsonl", encoding="utf-8"):
        d = json.loads(line)
        if d["source"].startswith("PMC"):
            paras += [p for p in d["text"].split("\n\n") if len(p) > 200]
    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            f.write(json.dumps({"text": " ".join(rng.sample(paras, rng.randint(2, 5)))}, ensure_ascii=False) + "\n")


def run_measured(cmd, env=None) -> tuple[float, int, str]:
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, peak, out


def run_megatron_lm(mlm: Path, inp: Path, out: Path, model: Path, workers: int):
    # Use only Megatron-LM's tools/ and megatron/{training,legacy}: its megatron/core would need triton
    # kernels for CPU-irrelevant code; the installed megatron-core 0.16.1 is the same version.
    shadow = out.parent / "mlm"
    if not shadow.exists():
        shutil.copytree(mlm / "tools", shadow / "tools")
        for sub in ("training", "legacy", "post_training", "rl"):
            if (mlm / "megatron" / sub).exists():
                shutil.copytree(mlm / "megatron" / sub, shadow / "megatron" / sub)
    env = dict(os.environ, PYTHONPATH=str(shadow), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(shadow / "tools" / "preprocess_data.py"), "--input", str(inp), "--output-prefix",
           str(out), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
           "--workers", str(workers), "--append-eod", "--log-interval", "100000"]
    return run_measured(cmd, env)


def run_ours(inp: Path, out: Path, model: Path, workers: int):
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(inp), "--output-prefix", str(out),
           "--tokenizer-model", str(model), "--workers", str(workers), "--append-eod", "--no-progress"]
    return run_measured(cmd)


def raw_sentencepiece(inp: Path, model: Path, threads: int) -> tuple[float, float]:
    import sentencepiece as spm

    texts = [json.loads(line)["text"] for line in open(inp, encoding="utf-8")]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    sp = spm.SentencePieceProcessor(model_file=str(model))
    t0 = time.perf_counter()
    for k in range(0, len(texts), 1000):  # batches, as a tool would: one giant call mostly builds lists
        sp.encode(texts[k:k + 1000], num_threads=threads)
    return mb / (time.perf_counter() - t0), mb


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron-lm", type=Path, help="Megatron-LM checkout (tag core_v0.16.1); omit to skip it")
    ap.add_argument("--input", type=Path, default=None)
    ap.add_argument("--size-mb", type=float, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer-dir", type=Path, default=None, help="built science tokenizer (default: build one)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scidfm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = args.tokenizer_dir
    if tok_dir is None:
        from scidfm_megatron.tokenizer.build import build_tokenizer

        tok_dir = work / "tokenizer"
        build_tokenizer(ROOT / "examples" / "tokenizer" / "base_tokenizer.model", tok_dir)
    model = tok_dir / "tokenizer.model"
    inp = args.input
    if inp is None:
        inp = work / f"abstracts_{int(args.size_mb)}mb.jsonl"
        if not inp.exists():
            make_input(inp, args.size_mb)
    small = work / f"abstracts_{int(args.size_mb / 10)}mb.jsonl"
    if args.input is None and not small.exists():
        make_input(small, args.size_mb / 10)
    size_mb = inp.stat().st_size / 1e6
    docs = sum(1 for _ in open(inp, "rb"))
    print(f"input: {inp} ({size_mb:.1f} MB, {docs:,} documents); workers {args.workers}; cores {os.cpu_count()}")

    rows = []
    wall, peak, _ = run_ours(inp, work / "ours", model, args.workers)
    summary = json.loads((work / "ours_summary.json").read_text())
    tokens = summary["tokens"]["text"]
    rows.append(("scidfm-preprocess", wall, peak))
    if args.input is None:
        _, peak_small, _ = run_ours(small, work / "ours_small", model, args.workers)
    if args.megatron_lm:
        wall_m, peak_m, _ = run_megatron_lm(args.megatron_lm, inp, work / "mlm", model, args.workers)
        rows.append(("Megatron-LM preprocess_data.py", wall_m, peak_m))
    sp_mbs, text_mb = raw_sentencepiece(inp, model, args.workers)

    print(f"\n{'tool':<34}{'wall s':>8}{'MB/s':>8}{'docs/s':>10}{'tokens/s':>12}{'peak RSS MB':>13}")
    for name, wall, peak in rows:
        print(f"{name:<34}{wall:>8.1f}{size_mb / wall:>8.2f}{docs / wall:>10,.0f}{tokens / wall:>12,.0f}{peak / 1e6:>13.0f}")
    print(f"{'raw SentencePiece, ' + str(args.workers) + ' threads':<34}{text_mb / sp_mbs:>8.1f}{sp_mbs:>8.2f}"
          f"{'':>10}{'':>12}{'':>13}   (text bytes only, in memory)")
    ours = size_mb / rows[0][1]
    ours_text = text_mb / rows[0][1]
    print(f"\nours / raw SentencePiece, both over text bytes: {ours_text:.2f} / {sp_mbs:.2f} MB/s = "
          f"{ours_text / sp_mbs:.2f}x  (target >= 0.85)")
    if args.megatron_lm:
        print(f"ours / Megatron-LM: {ours / (size_mb / rows[1][1]):.2f}x MB/s (target >= 1.3); "
              f"peak memory {rows[0][2] / rows[1][2]:.2f}x of Megatron-LM's (target <= 1.0)")
    if args.input is None:
        print(f"our peak RSS at {size_mb / 10:.0f} MB input: {peak_small / 1e6:.0f} MB; at {size_mb:.0f} MB: "
              f"{rows[0][2] / 1e6:.0f} MB ({rows[0][2] / peak_small:.2f}x; target <= 1.2)")


if __name__ == "__main__":
    main()
