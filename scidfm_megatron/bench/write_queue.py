"""The checkpoint writer's result queue: megatron's against ours, side by side, in one run.

    python tools/bench_write_queue.py          # same as python -m scidfm_megatron.bench.write_queue

megatron-core's checkpoint writer returns each rank's write results through a queue served by a spawned
``multiprocessing`` Manager, made on the first save (dist_checkpointing/strategies/filesystem_async.py).
For each queue, a fresh interpreter (the queue is module state) makes it, has a forked writer put a
``torch.distributed.checkpoint`` result in it, as megatron's writer does, and takes it back; it reports the
time of that first put and get, which is on every rank's first save, and the Manager's CPU time and memory.
Ours (training/write_queue.py) moves pickled bytes, so its Manager never imports torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure(which: str) -> dict:
    """In a fresh interpreter (the queue is module state): make the queue, put and get one result; the figures."""
    import multiprocessing as mp

    import psutil
    import torch
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from torch.distributed.checkpoint.metadata import MetadataIndex

    if which == "ours":
        from scidfm_megatron.training.write_queue import orphan_safe_write_queue

        orphan_safe_write_queue()
    q = fa._get_write_results_queue()
    manager = [c for c in psutil.Process().children() if "resource_tracker" not in " ".join(c.cmdline())][0]
    item = {0: [MetadataIndex("decoder.weight", offset=torch.Size([2, 0]))]}
    t = time.perf_counter()
    writer = mp.get_context("fork").Process(target=q.put, args=(item,))
    writer.start()
    writer.join()
    if q.get_nowait() != item:
        raise RuntimeError("the queue returned another object")
    first = time.perf_counter() - t
    cpu = manager.cpu_times()
    return dict(queue=which, manager_pid=manager.pid, first_put_get_s=first, manager_cpu_s=cpu.user + cpu.system,
                manager_rss_mib=manager.memory_info().rss / 2**20,
                manager_has_torch=any("libtorch" in m.path for m in manager.memory_maps()))


def main(argv=None) -> int:
    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for which in ("megatron", "ours"):
        code = (f"import json; from scidfm_megatron.bench.write_queue import measure; "
                f"print(json.dumps(measure({which!r})))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        if r.returncode != 0:
            print(f"bench_write_queue: the {which} queue failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{'queue':<10} {'first put+get':>14} {'Manager CPU':>12} {'Manager RSS':>12}  torch in Manager")
    for row in rows:
        print(f"{row['queue']:<10} {row['first_put_get_s']:>12.2f} s {row['manager_cpu_s']:>10.2f} s "
              f"{row['manager_rss_mib']:>8.0f} MiB  {'yes' if row['manager_has_torch'] else 'no'}")
    ours = rows[1]
    print(f"ours / megatron: first put+get {ours['first_put_get_s'] / base['first_put_get_s']:.3f}x, "
          f"Manager RSS {ours['manager_rss_mib'] / base['manager_rss_mib']:.3f}x (per rank, once per process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
