"""Benchmark: checkpoint conversion memory and speed (streamed mcore-to-hf vs a naive in-memory baseline).

    python tools/bench_convert.py [--workdir /tmp/scidfm_bench_convert] [--layers 4] [--max-shard-size 100MB]

Source: a random Hugging Face Mixtral folder (transformers ``MixtralConfig`` + ``save_pretrained``,
fp32, untied embeddings, the project's science tokenizer; about 350 MB at the defaults), converted with
``scidfm-convert --direction hf-to-mcore`` to a megatron-core checkpoint at ``--tp/--pp/--ep``. Both are
cached under ``--workdir`` and reused by later runs (``--rebuild`` starts over).

Measured, each in its own subprocess and on the same megatron checkpoint:

* ours: ``scidfm-convert --direction mcore-to-hf --dtype fp32 --max-shard-size S`` (streamed: one
  megatron slice read, mapped, appended to the current shard file and dropped);
* naive: the obvious alternative -- read every tensor into one global state dict
  (``McoreCheckpoint.read`` of all names), map it all with ``mapping.to_hf``, then write each shard of
  the same plan with ``safetensors.torch.save_file`` (fsynced, as ours), plus the same tokenizer and
  config files. The two outputs are compared tensor by tensor.

Each child imports everything it needs, reports its RSS (the baseline), resets its kernel high-water
mark (``/proc/self/clear_refs``), converts, and reports ``VmHWM`` (the exact peak RSS of the conversion);
the parent also samples the child's RSS every 10 ms. Memory is reported above the baseline. The check:
ours' peak above baseline < 1.5 x (largest output shard + largest single tensor). hf-to-mcore (one
process, streamed) is measured the same way, its check: peak above its imports <= 1.5 x the largest
input shard.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: examples/
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # children run -m from any cwd
BASE_TOKENIZER = ROOT / "examples" / "tokenizer" / "base_tokenizer.model"
MB = 1e6


# ----------------------------------------------------------------------------------------- child
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _hwm() -> int:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries the maxrss of the image before
    exec() over, so a child forked from a big parent would report the parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _report(**kw) -> None:
    print("BENCH " + json.dumps(kw), flush=True)


def _child(mode: str, src: str, dst: str, max_shard: str) -> int:
    """One measured conversion. Imports first (the same set for both modes), then reports the baseline."""
    import safetensors.torch  # noqa: F401
    import torch
    import torch.distributed.checkpoint
    import tqdm  # noqa: F401
    from transformers import GenerationConfig, MixtralConfig  # noqa: F401

    from scidfm_megatron.cli.convert import main as cli_main
    from scidfm_megatron.convert import hf_io, hf_to_mcore, mapping, mcore_io, mcore_to_hf, verify  # noqa: F401
    from scidfm_megatron.convert import tokenizer_files as tokfiles
    from scidfm_megatron.tokenizer import core, hf  # noqa: F401
    if mode == "import":  # megatron's model code too (the structure comes from a meta-device model)
        import megatron.core.dist_checkpointing
        import megatron.core.models.gpt  # noqa: F401

        import megatron_patches
        from scidfm_megatron.model import builder  # noqa: F401

        megatron_patches.apply()

    gc.collect()
    hwm_imports = _hwm()
    _report(event="imported", rss=_rss(), hwm_imports=hwm_imports, reset=_reset_hwm())
    t0 = time.perf_counter()
    if mode == "ours":
        rc = cli_main(["--direction", "mcore-to-hf", "--load", src, "--save", dst, "--dtype", "fp32",
                       "--max-shard-size", max_shard])
        if rc:
            return rc
    elif mode == "import":  # hf-to-mcore; max_shard carries the layout "tp,pp,ep"
        tp, pp, ep = max_shard.split(",")
        rc = cli_main(["--direction", "hf-to-mcore", "--load", src, "--save", dst, "--tp", tp, "--pp", pp, "--ep", ep])
        if rc:
            return rc
    elif mode == "naive":
        from safetensors.torch import save_file

        ckpt = mcore_io.McoreCheckpoint(src)
        cfg = ckpt.model_config
        maps = mapping.tensor_maps(cfg)
        state = ckpt.read([m.mcore for m in maps])  # the whole global state dict
        hf_state = {}
        for m in maps:
            for name, t in zip(m.hf, mapping.to_hf(m, state[m.mcore], cfg), strict=False):
                hf_state[name] = t.to(torch.float32)
        units = [list(zip(m.hf, mapping.hf_shapes(m, cfg), strict=False)) for m in maps]
        shards = hf_io.plan_shards(units, torch.float32, mcore_to_hf.parse_size(max_shard))
        out = Path(dst)
        out.mkdir(parents=True)
        for s in shards:
            save_file({n: hf_state[n] for n, _, _ in s.entries}, str(out / s.filename),
                      metadata={"format": "pt"})
            with open(out / s.filename, "rb+") as f:  # durable, as ours (which fsyncs every shard)
                os.fsync(f.fileno())
        hf_io.write_index(out, shards)
        # the rest of the folder as ours writes it (tokenizer, config), so both do the same work
        tok = mcore_to_hf.resolve_tokenizer(ckpt, None)
        tokfiles.write(tok, out, model_max_length=cfg.max_seq_length)
        ids = mcore_to_hf.token_ids(ckpt, tok)
        mapping.hf_config(cfg, dtype="fp32", token_ids=ids).save_pretrained(out)
        GenerationConfig(do_sample=False, max_new_tokens=256,
                         **{f"{k}_token_id": v for k, v in ids.items() if v is not None}).save_pretrained(out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    wall = time.perf_counter() - t0
    _report(event="done", wall=wall, maxrss=_hwm(), rss_end=_rss())
    return 0


# ---------------------------------------------------------------------------------------- parent
class Sampler:
    """Polls a process tree's RSS every ``interval`` s: per-pid peaks (with cmdlines) and the tree's peak."""

    def __init__(self, pid: int, interval: float = 0.01):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_by_pid: dict[int, int] = {}
        self.cmd_by_pid: dict[int, str] = {}
        self.ppid_by_pid: dict[int, int] = {}
        self.tree_peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    # re-read every time: a process first seen between fork() and exec() shows its parent's
                    cmdline = " ".join(p.cmdline())  # empty once the process is exiting: keep the last
                    if cmdline:
                        self.cmd_by_pid[p.pid] = cmdline
                        self.ppid_by_pid[p.pid] = p.ppid()
                except psutil.Error:
                    continue
                total += rss
                self.peak_by_pid[p.pid] = max(self.peak_by_pid.get(p.pid, 0), rss)
            self.tree_peak = max(self.tree_peak, total)
            time.sleep(self.interval)

    def stop(self):
        self._stop.set()
        self._t.join()


def run_child(mode: str, src: Path, dst: Path, max_shard: str) -> dict:
    if dst.exists():
        shutil.rmtree(dst)
    proc = subprocess.Popen([sys.executable, "-m", "scidfm_megatron.bench.convert", "--_child", mode, str(src),
                             str(dst), max_shard], env=dict(os.environ, PYTHONPATH=PYTHONPATH),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    out, err = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} conversion failed (exit {proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    ev = {}
    for line in out.splitlines():
        if line.startswith("BENCH "):
            d = json.loads(line[6:])
            ev[d.pop("event")] = d
    files = sorted(dst.glob("*.safetensors")) or sorted(dst.rglob("*.distcp"))
    if not ev["imported"]["reset"]:  # peak since exec, imports included (a transient there would count)
        print(f"  ({mode}: could not reset VmHWM after imports; peak includes the import phase)")
    return dict(mode=mode, baseline=ev["imported"]["rss"], maxrss=ev["done"]["maxrss"],
                sampled=sampler.peak_by_pid.get(proc.pid, 0), wall=ev["done"]["wall"],
                bytes=sum(f.stat().st_size for f in files), shard_max=max(f.stat().st_size for f in files),
                n_files=len(files))


def run_repeated(mode: str, src: Path, dst: Path, max_shard: str, n: int) -> dict:
    """``n`` runs, alternating nothing else in between: median wall time, largest peaks."""
    runs = [run_child(mode, src, dst, max_shard) for _ in range(max(1, n))]
    out = dict(runs[-1])
    walls = sorted(r["wall"] for r in runs)
    out["wall"] = walls[len(runs) // 2]
    out["spread"] = f"{walls[0]:.2f}-{walls[-1]:.2f}"
    for k in ("maxrss", "sampled"):
        out[k] = max(r[k] for r in runs)
    out["baseline"] = min(r["baseline"] for r in runs)
    return out


def build_tokenizer(workdir: Path) -> Path:
    from scidfm_megatron.tokenizer.build import build_tokenizer as build

    out = workdir / "tokenizer"
    if not (out / "tokenizer.model").exists():
        build(base_model=str(BASE_TOKENIZER), output_dir=str(out))
    return out


def build_hf(workdir: Path, a) -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from scidfm_megatron.tokenizer import ScienceTokenizer

    hf_dir = workdir / "hf_src"
    stamp = hf_dir / "bench_args.json"
    want = dict(layers=a.layers, hidden=a.hidden, ffn=a.ffn, experts=a.experts, heads=a.heads, kv_heads=a.kv_heads,
                head_dim=a.head_dim, vocab=a.vocab)
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return hf_dir
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    tok_dir = build_tokenizer(workdir)
    tok = ScienceTokenizer(str(tok_dir / "tokenizer.model"))
    cfg = MixtralConfig(vocab_size=max(a.vocab, tok.vocab_size), hidden_size=a.hidden, intermediate_size=a.ffn,
                        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                        head_dim=a.head_dim, num_local_experts=a.experts, num_experts_per_tok=2,
                        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tok.bos_id,
                        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, dtype="float32")
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).float()
    model.save_pretrained(hf_dir, max_shard_size="100MB")
    del model
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copyfile(f, hf_dir / f.name)
    stamp.write_text(json.dumps(want))
    return hf_dir


def hf_to_mcore(hf_dir: Path, dst: Path, a) -> dict:
    """hf-to-mcore in a measured child (one process: the import is streamed): peak RSS above its imports
    against the largest input shard."""
    r = run_child("import", hf_dir, dst, f"{a.tp},{a.pp},{a.ep}")
    shards = sorted(hf_dir.glob("*.safetensors"))
    r["src_bytes"] = sum(f.stat().st_size for f in shards)
    r["src_shard_max"] = max(f.stat().st_size for f in shards)
    r["above"] = r["maxrss"] - r["baseline"]
    return r


def largest_tensor(mcore_dir: Path, hf_out: Path) -> tuple[int, str]:
    """Largest single tensor handled: any megatron slice read (source dtype) or HF tensor written."""
    from scidfm_megatron.convert.hf_io import HFCheckpoint
    from scidfm_megatron.convert.mcore_io import McoreCheckpoint

    ck = McoreCheckpoint(mcore_dir)
    best = (0, "")
    for n, s in ck.slices.items():
        numel = 1
        for d in s.shape:
            numel *= d
        best = max(best, (numel * ck.dtypes[n].itemsize, n))
    hf = HFCheckpoint(hf_out)
    for n, info in hf.meta.items():
        b, e = info["data_offsets"]
        best = max(best, (e - b, n))
    return best


def _weight_map(d: Path) -> dict[str, str] | None:
    index = d / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"] if index.exists() else None


def same_tensors(a: Path, b: Path) -> bool:
    """The two outputs hold the same tensor names, files and values (bitwise)."""
    from safetensors import safe_open

    wa, wb = _weight_map(a), _weight_map(b)
    if wa != wb:
        return False
    for fn in sorted(set(wa.values())) if wa is not None else ["model.safetensors"]:  # one file: no index
        with safe_open(a / fn, "pt") as fa, safe_open(b / fn, "pt") as fb:
            if set(fa.keys()) != set(fb.keys()):
                return False
            for n in fa.keys():
                x, y = fa.get_tensor(n), fb.get_tensor(n)
                if x.dtype != y.dtype or x.shape != y.shape or not x.equal(y):
                    return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/scidfm_bench_convert")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32554)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--max-shard-size", default="100MB")
    ap.add_argument("--repeat", type=int, default=3, help="runs per converter (median time, largest peak)")
    ap.add_argument("--also-shard-size", nargs="*", default=["20MB", "400MB"],
                    help="also run ours at these shard sizes (peak memory should not follow the shard size)")
    ap.add_argument("--skip-hf-to-mcore", action="store_true",
                    help="with a cached megatron checkpoint: do not re-measure hf-to-mcore")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached source folders")
    ap.add_argument("--_child", nargs=4, metavar=("MODE", "SRC", "DST", "MAXSHARD"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        return _child(*a._child)

    work = Path(a.workdir)
    if a.rebuild and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    hf_dir = build_hf(work, a)
    layout = f"tp{a.tp}pp{a.pp}ep{a.ep}"
    mc_dir = work / f"mcore_{layout}"
    mc_stamp = work / f"mcore_{layout}.json"
    stamp = (hf_dir / "bench_args.json").read_text()
    h2m = None
    if not (mc_dir.exists() and mc_stamp.exists() and mc_stamp.read_text() == stamp):
        if mc_stamp.exists():
            mc_stamp.unlink()
        h2m = hf_to_mcore(hf_dir, mc_dir, a)
        mc_stamp.write_text(stamp)
    elif not a.skip_hf_to_mcore:
        h2m = hf_to_mcore(hf_dir, work / "mcore_remeasure", a)
        shutil.rmtree(work / "mcore_remeasure")

    ours = run_repeated("ours", mc_dir, work / "out_ours", a.max_shard_size, a.repeat)
    naive = run_repeated("naive", mc_dir, work / "out_naive", a.max_shard_size, a.repeat)
    identical = same_tensors(work / "out_ours", work / "out_naive")
    other = []
    for size in a.also_shard_size:
        other.append((size, run_child("ours", mc_dir, work / "out_ours_other", size)))
        shutil.rmtree(work / "out_ours_other")
    big, big_name = largest_tensor(mc_dir, work / "out_ours")
    shard = ours["shard_max"]
    bound = 1.5 * (shard + big)
    above = ours["maxrss"] - ours["baseline"]
    ok = above < bound

    def mb(x):
        return f"{x / MB:8.1f}"

    rows = [("", "ours (streamed)", "naive (in memory)", "ours/naive")]
    for label, key, fmt, ratio in [
        ("safetensors written (MB)", "bytes", mb, True),
        ("output files", "n_files", lambda x: f"{x:8d}", False),
        ("largest output shard (MB)", "shard_max", mb, False),
        ("conversion wall time, median (s)", "wall", lambda x: f"{x:8.2f}", True),
        ("  min-max over the runs (s)", "spread", lambda x: f"{x:>9}", False),
        ("throughput at the median (MB/s)", "mbps", lambda x: f"{x:8.1f}", True),
        ("RSS after imports (MB)", "baseline", mb, False),
        ("peak RSS, VmHWM (MB)", "maxrss", mb, True),
        ("peak RSS, sampled 10 ms (MB)", "sampled", mb, True),
        ("peak RSS above imports (MB)", "above", mb, True),
        ("  / (largest shard + tensor)", "rel", lambda x: f"{x:8.2f}", False),
    ]:
        for r in (ours, naive):
            r["mbps"] = r["bytes"] / MB / r["wall"]
            r["above"] = r["maxrss"] - r["baseline"]
            r["rel"] = r["above"] / (shard + big)
        x, y = ours[key], naive[key]
        rows.append((label, fmt(x), fmt(y), f"{x / y:6.2f}" if ratio and y else ""))
    w0 = max(len(r[0]) for r in rows)
    print(f"\nmcore-to-hf ({a.repeat} runs each), {ours['bytes'] / MB:.0f} MB fp32 model ({a.layers} layers x "
          f"{a.experts} experts, hidden {a.hidden}, ffn {a.ffn}), source megatron checkpoint {layout}, "
          f"--max-shard-size {a.max_shard_size}")
    for row in rows:
        print(f"  {row[0]:<{w0}}  {row[1]:>16}  {row[2]:>18}  {row[3]:>10}")
    print(f"  outputs tensor-identical: {'yes' if identical else 'NO'}")
    for size, r in other:
        up = r["maxrss"] - r["baseline"]
        print(f"  ours at --max-shard-size {size}: {r['n_files']} files, largest {r['shard_max'] / MB:.1f} MB, "
              f"peak RSS above imports {up / MB:.1f} MB ({up / (r['shard_max'] + big):.2f} x (shard + tensor)), "
              f"{r['bytes'] / MB / r['wall']:.1f} MB/s")
    print(f"\n  largest tensor: {big_name} {big / MB:.1f} MB; largest output shard {shard / MB:.1f} MB")
    print(f"  bound 1.5 x (shard + tensor) = {bound / MB:.1f} MB; ours above imports = {above / MB:.1f} MB "
          f"({above / (shard + big):.2f} x (shard + tensor)) -> {'PASS' if ok else 'FAIL'}")
    ok_import = True
    if h2m:
        emb = 4 * a.hidden * (-(-max(a.vocab, 1) // 128) * 128)  # padded fp32 embedding: the largest unit
        rel = h2m["above"] / h2m["src_shard_max"]
        ok_import = rel <= 1.5
        print(f"\nhf-to-mcore ({layout} recorded; one process, streamed): {h2m['src_bytes'] / MB:.0f} MB of "
              f"safetensors in {h2m['wall']:.1f} s ({h2m['src_bytes'] / MB / h2m['wall']:.1f} MB/s, conversion "
              f"after imports), {h2m['n_files']} checkpoint file(s)")
        print(f"  RSS after imports {h2m['baseline'] / MB:.1f} MB; peak RSS (VmHWM) {h2m['maxrss'] / MB:.1f} MB, "
              f"sampled {h2m['sampled'] / MB:.1f} MB; peak above imports {h2m['above'] / MB:.1f} MB")
        print(f"  largest input shard {h2m['src_shard_max'] / MB:.1f} MB, largest tensor written (padded "
              f"embedding) ~{emb / MB:.1f} MB; peak above imports / largest shard = {rel:.2f} "
              f"(bound 1.5) -> {'PASS' if ok_import else 'FAIL'}")
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")
    return 0 if ok and identical and ok_import else 1


if __name__ == "__main__":
    sys.exit(main())
