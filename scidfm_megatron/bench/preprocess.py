"""Benchmark in one run: scidfm-preprocess, Megatron-LM's tools/preprocess_data.py, the GigaToken path of
Megatron-LM's tools/preprocess_data_fast.py, and raw SentencePiece.

    python tools/bench_preprocess.py --megatron-lm /path/to/Megatron-LM --megatron-lm-deps DIR --size-mb 40 --workers 2

Same input, tokenizer (the extended science tokenizer.model) and cores for every tool: ``--workers``
worker processes for ours and Megatron-LM's, as many GigaToken (rayon) threads for the GigaToken path,
as many SentencePiece threads for raw SentencePiece. Prints, per tool, wall time, MB/s, docs/s,
tokens/s and the peak RSS summed over the tool's process tree (sampled every 20 ms), the ratio of each
tool's MB/s to the GigaToken path's, whether our .bin equals the GigaToken path's byte for byte, and
our and the GigaToken path's peak RSS at 1/10 of the size (memory flat in input size, or not).

GigaToken path: Megatron-LM's preprocess_data_fast.py tokenizes whole jsonl files with
``gigatoken.Tokenizer.encode_files(JsonlFileSource(files, field), parallel=True)`` and writes them with
``IndexedDatasetBuilder.add_documents``. At its HEAD that path exists only for Hugging Face tokenizers
(``tokenize_files``: "Only supported for huggingface and megatron libraries") and needs a newer
megatron-core than 0.16.1, so it is reproduced here (gigatoken_path()): GigaToken loads the
SentencePiece .model directly, encode_files with all threads, then what add_documents does (flatten,
insert the EOD, one write) through megatron-core 0.16.1's IndexedDatasetBuilder.

Input: ``--input FILE`` (jsonl with a "text" key), or generated: paragraphs of the sample corpus's
PMC papers recombined into abstract-sized documents until ``--size-mb``.
Megatron-LM: a checkout at tag core_v0.16.1 (matches megatron-core 0.16.1). Its tool imports
megatron.training, which needs ``six`` and ``triton`` importable: install them apart from the project's
environment (``pip install --no-deps --target DIR six triton``) and pass ``--megatron-lm-deps DIR``; its
own ``megatron/core`` is not used (the installed megatron-core is), see run_megatron_lm().
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

from ..testing.runs import console_script

ROOT = Path(__file__).resolve().parents[2]  # the repository: examples/
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # children run -m from any cwd
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
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, peak, out


def run_megatron_lm(mlm: Path, inp: Path, out: Path, model: Path, workers: int, deps: Path | None = None):
    # Use only Megatron-LM's tools/ and megatron/{training,legacy}: its megatron/core would need triton
    # kernels for CPU-irrelevant code; the installed megatron-core 0.16.1 is the same version.
    shadow = out.parent / "mlm"
    if not shadow.exists():
        shutil.copytree(mlm / "tools", shadow / "tools")
        for sub in ("training", "legacy", "post_training", "rl"):
            if (mlm / "megatron" / sub).exists():
                shutil.copytree(mlm / "megatron" / sub, shadow / "megatron" / sub)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow)] + ([str(deps)] if deps else [])),
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(shadow / "tools" / "preprocess_data.py"), "--input", str(inp), "--output-prefix",
           str(out), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
           "--workers", str(workers), "--append-eod", "--log-interval", "100000"]
    return run_measured(cmd, env)


def run_ours(inp: Path, out: Path, model: Path, workers: int):
    cmd = [*console_script("scidfm-preprocess"), "--input", str(inp), "--output-prefix", str(out),
           "--tokenizer-model", str(model), "--workers", str(workers), "--append-eod", "--no-progress"]
    return run_measured(cmd)


def run_gigatoken_path(inp: Path, out: Path, model: Path, threads: int):
    cmd = [sys.executable, "-m", "scidfm_megatron.bench.preprocess", "--gigatoken-path", str(inp), str(out),
           str(model)]
    return run_measured(cmd, dict(os.environ, RAYON_NUM_THREADS=str(threads), PYTHONPATH=PYTHONPATH))


def gigatoken_path(inp: str, out: str, model: str, key: str = "text") -> None:
    """preprocess_data_fast.py's GigaToken path (see the module docstring), for a SentencePiece .model."""
    import awkward as ak
    import gigatoken
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=model)
    eod = sp.piece_to_id("<|eod|>")  # the EOD our tools append (Megatron-LM's SentencePiece EOD is </s>)
    eod = eod if eod != sp.unk_id() else sp.eos_id()
    tok = gigatoken.Tokenizer.from_sentencepiece(model)
    docs = tok.encode_files(gigatoken.JsonlFileSource([inp], field=key), parallel=True)
    dtype = DType.optimal_dtype(sp.get_piece_size())
    builder = IndexedDatasetBuilder(f"{out}_{key}_document.bin", dtype=dtype)
    for start in range(0, len(docs), 1_000_000):  # IndexedDatasetBuilder.add_documents (megatron-core > 0.16.1)
        chunk = docs[start:start + 1_000_000]
        flat = np.asarray(ak.flatten(chunk), dtype=dtype)
        lengths = np.asarray(ak.num(chunk, axis=1))
        flat = np.insert(flat, np.cumsum(lengths), eod).astype(dtype, copy=False)
        lengths = lengths + 1
        builder.data_file.write(flat.tobytes(order="C"))
        offset = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(lengths.tolist())
        builder.document_indices.extend((offset + np.arange(1, len(lengths) + 1)).tolist())
    builder.finalize(f"{out}_{key}_document.idx")


def raw_sentencepiece(inp: Path, model: Path, threads: int) -> tuple[float, float]:
    import sentencepiece as spm

    texts = [json.loads(line)["text"] for line in open(inp, encoding="utf-8")]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    sp = spm.SentencePieceProcessor(model_file=str(model))
    t0 = time.perf_counter()
    for k in range(0, len(texts), 1000):  # batches, as a tool would: one giant call mostly builds lists
        sp.encode(texts[k:k + 1000], num_threads=threads)
    return mb / (time.perf_counter() - t0), mb


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 4 and argv[0] == "--gigatoken-path":
        gigatoken_path(*argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron-lm", type=Path, help="Megatron-LM checkout (tag core_v0.16.1); omit to skip it")
    ap.add_argument("--megatron-lm-deps", type=Path, default=None,
                    help="folder holding six and triton for Megatron-LM's tool (pip install --target)")
    ap.add_argument("--input", type=Path, default=None)
    ap.add_argument("--size-mb", type=float, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer-dir", type=Path, default=None, help="built science tokenizer (default: build one)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
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
    print(f"input: {inp} ({size_mb:.1f} MB, {docs:,} documents); workers/threads {args.workers}; "
          f"cores {os.cpu_count()}; load average before {os.getloadavg()[0]:.1f}")

    rows = []
    wall, peak, _ = run_ours(inp, work / "ours", model, args.workers)
    summary = json.loads((work / "ours_summary.json").read_text())
    tokens = summary["tokens"]["text"]
    rows.append(("scidfm-preprocess", wall, peak))
    wall_g, peak_g, _ = run_gigatoken_path(inp, work / "gigatoken", model, args.workers)
    rows.append(("GigaToken path (preprocess_data_fast)", wall_g, peak_g))
    if args.megatron_lm:
        wall_m, peak_m, _ = run_megatron_lm(args.megatron_lm, inp, work / "mlm", model, args.workers,
                                            args.megatron_lm_deps)
        rows.append(("Megatron-LM preprocess_data.py", wall_m, peak_m))
    sp_mbs, text_mb = raw_sentencepiece(inp, model, args.workers)
    if args.input is None:
        _, peak_small, _ = run_ours(small, work / "ours_small", model, args.workers)
        _, peak_small_g, _ = run_gigatoken_path(small, work / "gigatoken_small", model, args.workers)

    giga = size_mb / wall_g
    print(f"\n{'tool':<40}{'wall s':>8}{'MB/s':>8}{'x GigaToken':>12}{'docs/s':>10}{'tokens/s':>12}{'peak RSS MB':>13}")
    for name, wall, peak in rows:
        print(f"{name:<40}{wall:>8.1f}{size_mb / wall:>8.2f}{size_mb / wall / giga:>12.2f}{docs / wall:>10,.0f}"
              f"{tokens / wall:>12,.0f}{peak / 1e6:>13.0f}")
    print(f"{'raw SentencePiece, ' + str(args.workers) + ' threads':<40}{text_mb / sp_mbs:>8.1f}{sp_mbs:>8.2f}"
          f"{sp_mbs * size_mb / text_mb / giga:>12.2f}{'':>10}{'':>12}{'':>13}   (text bytes only, in memory)")
    same = all((work / f"ours_text_document{e}").read_bytes() == (work / f"gigatoken_text_document{e}").read_bytes()
               for e in (".bin", ".idx"))
    print(f"\nours / GigaToken path: {size_mb / rows[0][1] / giga:.2f}x MB/s (target >= 1.0); "
          f"our .bin/.idx {'identical to' if same else 'DIFFERENT from'} the GigaToken path's")
    if args.megatron_lm:
        print(f"ours / Megatron-LM preprocess_data.py: {size_mb / rows[0][1] / (size_mb / rows[2][1]):.2f}x MB/s")
    if args.input is None:
        print(f"peak RSS at {size_mb / 10:.0f} MB -> {size_mb:.0f} MB input: ours {peak_small / 1e6:.0f} -> "
              f"{rows[0][2] / 1e6:.0f} MB ({rows[0][2] / peak_small:.2f}x), GigaToken path {peak_small_g / 1e6:.0f} -> "
              f"{peak_g / 1e6:.0f} MB ({peak_g / peak_small_g:.2f}x)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
