"""scidfm_megatron.testing.fork.run_distributed: the runner the distributed tests use (parity, packing, resume,
the patches' symptoms). A result comes back from rank 0 (or every rank), a failing rank raises with its own
traceback, a hung rank is killed at the timeout with every process it started, and nothing it sets leaks."""

import os
import time

import pytest

from scidfm_megatron.testing.fork import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed


def _sum_ranks(rank, world_size, offset, *, scale=1):
    """An all-reduce over the gloo group, plus what each rank sees of its environment and threads."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return dict(rank=rank, total=float(t) * scale, world=dist.get_world_size(), pid=os.getpid(),
                threads=torch.get_num_threads(), flag=os.environ.get("SCIDFM_TEST_FLAG"))


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 refuses")
    import torch.distributed as dist

    dist.barrier()  # rank 0 waits for the dead rank: the runner must not wait for it


def _hang_with_a_child(rank, world_size, pid_file):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(f"{pid_file}.{rank}", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(600)


def test_returns_rank_0_or_every_rank_and_leaks_no_environment():
    before = dict(os.environ)
    got = run_distributed(_sum_ranks, 2, 10, kwargs=dict(scale=2), env={"SCIDFM_TEST_FLAG": "x"})
    assert got["rank"] == 0 and got["total"] == 2 * (10 + 11) and got["world"] == 2
    assert got["pid"] != os.getpid() and got["threads"] == 1 and got["flag"] == "x"
    every = run_distributed(_sum_ranks, 3, 0, all_ranks=True)
    assert [r["rank"] for r in every] == [0, 1, 2] and {r["total"] for r in every} == {3.0}
    assert every[0]["flag"] is None  # the env of the first call stayed in its ranks
    assert dict(os.environ) == before


def test_a_failing_rank_raises_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="failed on rank 1 of 2: ValueError: rank 1 refuses") as info:
        run_distributed(_fail_on_rank_1, 2, timeout=300, grace=2)
    assert info.value.rank == 1 and "_fail_on_rank_1" in info.value.output
    assert time.monotonic() - start < 60  # not the timeout: rank 0, stuck in its barrier, was killed


def test_timeout_kills_every_rank_and_what_it_started(tmp_path):
    import psutil

    with pytest.raises(DistributedTestError, match="did not finish in 3 s"):
        run_distributed(_hang_with_a_child, 2, str(tmp_path / "pids"), timeout=3)
    pids = [int(p) for r in (0, 1) for p in (tmp_path / f"pids.{r}").read_text().split()]
    time.sleep(0.5)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


def test_refuses_to_fork_a_disabled_patch_this_process_applied():
    """Forked ranks inherit the patches this process applied, so SCIDFM_DISABLE_PATCHES could not act there:
    refused, naming the way out (test_patches' symptom checks fork from a spawned interpreter instead)."""
    import megatron_patches

    megatron_patches.apply()  # what any in-process test of the suite may have done before
    with pytest.raises(RuntimeError, match="already applied those patches.*start_method='spawn'"):
        run_distributed(_sum_ranks, 1, 0, env={"SCIDFM_DISABLE_PATCHES": "cpu_rng"}, start_method="fork")

