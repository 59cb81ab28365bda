#!/usr/bin/env python
"""Dataset-index cache at corpus scale: cold build and cached start-up, time and peak RSS vs the targets.

    python tools/bench_data_cache.py --scale 0.05              # 1/20 of the corpus, the new code
    python tools/bench_data_cache.py --scale 0.05 --old        # also megatron's plain builder (the old code)
    python tools/bench_data_cache.py --scale 1 --work /work/tmp/bench_cache --keep

Synthetic data, written once into ``--work`` (reused when present): one Megatron dataset per source of
SciDFM's Table 2 (examples/mixtures/scidfm_table2.yaml, epoch 1) with that source's token count and the
document count below (967M documents in all at --scale 1; PubChem 458M), a real ``.idx`` (lengths
varying around the source's mean, pointers, document indices) and a sparse ``.bin`` (holes, no disk).
Then, each in a fresh subprocess, on one rank and ``--threads`` builder threads:

* **cold**: ``build_pretrain_datasets`` with the scidfm-18b stage-1 plan (examples/recipes/
  scidfm18b_stage1.yaml: 137100 x 512 = 70.2M training samples of 8192 tokens, 353,280 validation
  samples for eval every 2000 steps x 10 iterations, split 998,2,0, seed 1234), all scaled by --scale,
  into an empty cache directory;
* **cached**: the same call again, the cache now full: what every rank of the run does at start-up.

Each reports the call's wall time and CPU time (user + system, all threads: on a loaded machine the
wall time says little), the process's peak RSS (``ru_maxrss``: includes torch/megatron, ~0.4
GiB, and the resident pages of mapped files) and its RSS after the call, then reads the first 8 and the
last training samples. ``--old`` runs the same two phases with megatron-core's plain builder as this
project used it before (``GPTDataset``, its mgrid document index, ``create_attention_mask`` on, one
builder thread). The new code's build budget (data/index_cache.py, 4 GiB) is scaled by --scale too, so
that the same builds run side by side as at --scale 1. Run the old code only at a small --scale: at --scale 1
it peaked at 18.4 GiB.
Figures at --scale < 1 are printed with a linear projection to --scale 1, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the repository: examples/mixtures/

# Documents per source (millions) at --scale 1: 967M in all. PubChem's 458M is the measured
# count; the rest is this benchmark's assumption of plausible mean lengths (the paper gives tokens only).
DOCS_M = {
    "AMPS": 5.0, "OEIS": 0.37, "Proof-Pile-2": 30.0, "MathGLM-dataset": 50.0, "MathPile": 0.1,
    "PubChem Compound": 458.0, "USPTO": 1.0, "Uniprot": 0.57, "BioRxiv": 0.2, "MedRxiv": 0.03,
    "RefSeq Genome": 0.2, "Uniref": 60.0, "GeoNames": 12.0, "the-stack (science languages)": 5.0,
    "Scientific Papers": 25.0, "Scientific Books": 0.05, "SlimPajama-Arxiv": 1.56, "LibreText": 0.01,
    "WikiBooks": 0.03, "En-Zh-Trans": 10.0, "Wikipedia-Zh": 1.3, "Baike": 15.0,
    "SlimPajama-CommonCrawl": 110.0, "SlimPajama-C4": 140.0, "SlimPajama-GitHub": 20.0,
    "SlimPajama-Books": 0.2, "SlimPajama-Wikipedia": 13.0, "SlimPajama-StackExchange": 8.38,
}
TRAIN_SAMPLES = 137100 * 512  # scidfm18b_stage1.yaml: train_iters x global_batch_size
VALID_SAMPLES = (137100 // 2000 + 1) * 10 * 512  # eval_interval 2000, eval_iters 10 (the trainer's rule)
SEQ, SPLIT, SEED, VOCAB = 8192, "998,2,0", 1234, 32196
TARGETS = {"cold": (300.0, 8.0), "cached": (10.0, 1.0)}  # seconds, GiB
CHUNK = 1 << 23


def sources(scale: float) -> list[tuple[str, str, int, int]]:
    """(name, prefix name, documents, tokens) per epoch-1 source of the Table-2 mixture."""
    from scidfm_megatron.data.mixture import Mixture

    mix = Mixture.load(ROOT / "examples" / "mixtures" / "scidfm_table2.yaml", data_root="/nonexistent")
    assert abs(sum(DOCS_M.values()) - 967.0) < 1e-6 and set(DOCS_M) == {s.name for s in mix.sources}
    out = []
    for s in mix.sources:
        docs = max(2000, int(round(DOCS_M[s.name] * 1e6 * scale)))
        tokens = max(2 * docs, int(round(mix.tokens(1)[s.name] * 1e9 * scale)))
        out.append((s.name, str(s.for_epoch(1)[0]).replace("/", "_"), docs, tokens))
    return out


def _lengths(docs: int, tokens: int, seed: int, start: int, stop: int) -> np.ndarray:
    """Lengths of documents [start, stop): pairs base+d, base-d (d random), the remainder spread as +1."""
    base, extra = divmod(tokens, docs)
    n = stop - start
    rng = np.random.default_rng([seed, start])
    d = rng.integers(0, base // 2 + 1, size=(n + 1) // 2, dtype=np.int64)
    lengths = np.full(n, base, dtype=np.int64)
    lengths[0::2] += d[: (n + 1) // 2]
    lengths[1::2] -= d[: n // 2]
    if n % 2:  # an unpaired last document: no offset (keeps the sum exact)
        lengths[-1] = base
    ids = np.arange(start, stop)
    lengths += ids < extra
    return lengths.astype(np.int32)


def write_dataset(prefix: Path, docs: int, tokens: int, seed: int) -> None:
    from scidfm_megatron.data.indexed import DTYPE_CODES, INDEX_HEADER, read_index_counts

    idx, binf = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if idx.exists() and binf.exists() and read_index_counts(prefix) == (docs, docs) \
            and binf.stat().st_size == 2 * tokens:
        return
    tmp = Path(f"{prefix}.idx.tmp")
    with open(tmp, "wb") as f:
        f.write(INDEX_HEADER + np.array([1], "<u8").tobytes() + bytes([DTYPE_CODES[np.uint16]])
                + np.array([docs, docs + 1], "<u8").tobytes())
        total = 0
        for a in range(0, docs, CHUNK):
            lengths = _lengths(docs, tokens, seed, a, min(docs, a + CHUNK))
            total += int(lengths.sum(dtype=np.int64))
            f.write(lengths.tobytes())
        assert total == tokens, (prefix, total, tokens)
        offset = 0
        for a in range(0, docs, CHUNK):
            nbytes = _lengths(docs, tokens, seed, a, min(docs, a + CHUNK)).astype(np.int64) * 2
            ptr = np.cumsum(nbytes) - nbytes + offset
            offset = int(ptr[-1] + nbytes[-1])
            f.write(ptr.tobytes())
        for a in range(0, docs + 1, CHUNK):
            f.write(np.arange(a, min(docs + 1, a + CHUNK), dtype=np.int64).tobytes())
    with open(binf, "wb") as f:
        f.truncate(2 * tokens)  # sparse: holes read as token 0
    os.replace(tmp, idx)


def make_data(work: Path, scale: float) -> Path:
    import yaml

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    recipe: dict[str, Any] = {"name": f"table2-synthetic-x{scale:g}", "unit": "tokens", "data_root": str(data),
                              "sources": []}
    for i, (name, prefix, docs, tokens) in enumerate(sources(scale)):
        write_dataset(data / prefix, docs, tokens, seed=i)
        recipe["sources"].append({"name": name, "domain": "d", "category": "science", "tokens": tokens,
                                  "data": prefix})
    path = work / "mixture.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class _Tok:
    vocab_size, eod_id, pad_id, model_file = VOCAB, VOCAB - 4, VOCAB - 5, "synthetic"


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(args) -> None:
    """One phase in this process; prints one JSON line."""
    from scidfm_megatron.cli.train import quiet_megatron

    quiet_megatron()
    from scidfm_megatron.data.mixture import Mixture

    mix = Mixture.load(args.mixture)
    samples = (max(1, round(TRAIN_SAMPLES * args.scale)), max(1, round(VALID_SAMPLES * args.scale)), 0)
    import megatron.core.datasets.gpt_dataset  # noqa: F401
    import torch  # noqa: F401  (imported before the baseline, as in a training process)

    base = _rss_gib()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime
    t0 = time.perf_counter()
    if args.impl == "new":
        from scidfm_megatron.data import index_cache
        from scidfm_megatron.data.datasets import build_pretrain_datasets

        # the build budget shrinks with the corpus, so that builds overlap as they would at --scale 1
        index_cache.BUDGET.limit = max(1, int(index_cache.BUDGET.limit * min(1.0, args.scale)))

        train, valid, _ = build_pretrain_datasets(mix, 1, _Tok(), seq_length=SEQ, samples=samples, seed=SEED,
                                                  split=SPLIT, cache_dir=args.cache, threads=args.threads)
    else:  # megatron's plain builder as this project called it before (old gpt_dataset_config)
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        from scidfm_megatron.data.datasets import MegatronTokenizerAdapter
        from scidfm_megatron.data.index_cache import process_group

        config = GPTDatasetConfig(random_seed=SEED, sequence_length=SEQ, blend=mix.blend(1), split=SPLIT,
                                  path_to_cache=args.cache, tokenizer=MegatronTokenizerAdapter(_Tok()),
                                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                                  mid_level_dataset_surplus=0.005)
        with process_group():
            train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, list(samples), lambda: True, config).build()
    seconds = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime - cpu0
    peak_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    after = _rss_gib()
    t1 = time.perf_counter()
    mask = False
    for i in list(range(8)) + [len(train) - 1]:
        s = train[i]
        mask |= "attention_mask" in s
    read_s = time.perf_counter() - t1
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_gib": peak_build, "base_gib": base, "after_gib": after,
                      "peak_with_reads_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "read_s": read_s, "mask": mask, "train": len(train), "valid": len(valid) if valid else 0,
                      "samples": samples}))


def run_phase(args, impl: str, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "scidfm_megatron.bench.data_cache", "--child", "--impl", impl,
           "--mixture", str(args.mixture), "--cache", str(cache), "--scale", str(args.scale),
           "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        import threading

        outs: dict[str, str] = {}
        readers = [threading.Thread(target=lambda k, f: outs.__setitem__(k, f.read()), args=(k, f))
                   for k, f in (("out", proc.stdout), ("err", proc.stderr))]
        for r in readers:
            r.start()
        while proc.poll() is None:  # the child's resident memory, sampled every 50 ms from outside
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        key = line.split(":")[0]
                        if key in peak:
                            peak[key] = max(peak[key], int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                pass
            time.sleep(0.05)
        for r in readers:
            r.join()
    if proc.returncode != 0:
        sys.exit(f"{impl} phase failed:\n{outs['err'][-4000:]}")
    res = json.loads(outs["out"].strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    res["sampled_anon_gib"] = peak["RssAnon"] / 2**20
    res["sampled_file_gib"] = peak["RssFile"] / 2**20
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the corpus (documents and tokens)")
    ap.add_argument("--work", default=None, help="directory for the synthetic data and caches (default: a temporary "
                                                "directory under /tmp, removed unless --keep)")
    ap.add_argument("--threads", type=int, default=2, help="megatron num_dataset_builder_threads (new code)")
    ap.add_argument("--old", action="store_true", help="also run megatron's plain builder (the old code)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic data (reused by the next run)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="new", help=argparse.SUPPRESS)
    ap.add_argument("--mixture", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.old and args.scale > 0.2:
        sys.exit("--old at --scale > 0.2: the old code peaks at ~18 GiB at --scale 1; run it at a fraction")
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_data_cache_"))
    t0 = time.perf_counter()
    args.mixture = make_data(work, args.scale)
    docs = sum(d for _, _, d, _ in sources(args.scale))
    tokens = sum(t for _, _, _, t in sources(args.scale))
    print(f"synthetic data: {len(DOCS_M)} sources, {docs:,} documents, {tokens / 1e9:,.2f}B tokens in {work} "
          f"({time.perf_counter() - t0:.0f} s); scale {args.scale:g}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    try:
        for impl in (["new", "old"] if args.old else ["new"]):
            cache = work / f"cache_{impl}"
            shutil.rmtree(cache, ignore_errors=True)
            for phase in ("cold", "cached"):
                r = run_phase(args, impl, cache)
                rows.append((impl, phase, r))
                print(f"  {impl:>3} {phase:<6} {r['seconds']:7.1f} s (CPU {r['cpu_s']:.1f} s)  "
                      f"peak {r['peak_gib']:5.2f} GiB (after imports {r['base_gib']:.2f}, "
                      f"after the call {r['after_gib']:.2f}; with 9 reads "
                      f"{r['peak_with_reads_gib']:.2f}, {r['read_s']:.1f} s; sampled peaks: anonymous "
                      f"{r['sampled_anon_gib']:.2f}, file-backed {r['sampled_file_gib']:.2f})  "
                      f"mask built: {r['mask']}  "
                      f"train {r['train']:,} valid {r['valid']:,}  load {os.getloadavg()[0]:.1f}", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nscale {args.scale:g}: {docs:,} documents; plan {round(TRAIN_SAMPLES * args.scale):,} train + "
          f"{round(VALID_SAMPLES * args.scale):,} validation samples of {SEQ}")
    print(f"{'code':<5}{'phase':<8}{'seconds':>9}{'CPU s':>8}{'peak GiB':>10}{'anon GiB':>10}"
          + ("" if args.scale == 1 else f"{'-> x1 s':>10}{'-> x1 GiB':>11}")
          + f"{'target':>16}")
    for impl, phase, r in rows:
        line = (f"{impl:<5}{phase:<8}{r['seconds']:>9.1f}{r['cpu_s']:>8.1f}{r['peak_gib']:>10.2f}"
                f"{r['sampled_anon_gib']:>10.2f}")
        if args.scale != 1:  # linear projection of what grows with the corpus (the import baseline does not)
            line += (f"{r['seconds'] / args.scale:>10.0f}"
                     f"{r['base_gib'] + (r['peak_gib'] - r['base_gib']) / args.scale:>11.2f}")
        s, g = TARGETS[phase]
        line += f"{f'<= {s:g} s, {g:g} GiB':>16}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
