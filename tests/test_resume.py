"""Resume anything, exactly (issue 12): the resume matrix for both optimizers, EP=1 <-> EP>1 included,
Adam's own state checked; bad checkpoints refused before any step, naming the file and the fix.

Two runs of ``resume_rank`` (2 and 4 forked gloo ranks) check the whole matrix: each layout is saved
once after K=3 steps, and every pair resumes it at another layout for N=3 steps, compared with the
uninterrupted run to 1e-5 (fp32, dropless). A resume that lost the optimizer's moments is off by 1e-2 at the second
step after it (checked by hand: zeroing exp_avg/exp_avg_sq after the load gives 0.011 and 0.023)."""

import json
import os
import re
import shutil

import pytest
import torch

from scidfm_megatron.testing.fork import run_distributed

K, N = 3, 3
# Two launches. On 2 ranks, for both optimizers: every degree changes in both directions (TP up in 2 and
# down in 3, PP up in 1 and down in 2, EP 2 -> 1 in 1 and 1 -> 2 in 3, VPP on in 1 and off in 2; DP2
# wherever TP and PP are 1), plus, for the distributed optimizer, the fast dp_reshardable format at its own
# layout (4). On 4 ranks: DP4 <-> TP2 x PP2 x EP2 (ETP1) and on to PP2 x DP2.
TWO = ["ep2>pp2vpp2", "pp2vpp2>tp2", "tp2>ep2", "tp2+dp>tp2"]
FOUR = ["dp>tp2pp2ep2etp1", "tp2pp2ep2etp1>dp", "tp2pp2ep2etp1>pp2"]
PLAIN = {2: TWO[:3], 4: FOUR[:2]}
CASES = [(2, "dist", p) for p in TWO] + [(2, "plain", p) for p in PLAIN[2]] + \
        [(4, "dist", p) for p in FOUR] + [(4, "plain", p) for p in PLAIN[4]]


@pytest.fixture(scope="module")
def matrices(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    out = {}

    def launch(n):
        if n not in out:
            pairs = TWO if n == 2 else FOUR
            out[n] = (run_distributed(resume_rank, n, pairs, d / f"work{n}", timeout=900,
                                      kwargs=dict(plain_pairs=PLAIN[n], k=K, n=N, keep=d / f"kept{n}")),
                      d / f"kept{n}")
        return out[n]
    return launch


@pytest.fixture(scope="module")
def matrix(matrices):
    return matrices(2)


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,optimizer,pair", CASES)
def test_resume_matrix(matrices, nproc, optimizer, pair):
    r = matrices(nproc)[0][optimizer]
    got, want = r["pairs"][pair], r["ref"]
    assert len(got) == N and max(abs(a - b) for a, b in zip(got, want, strict=False)) <= 1e-5, (pair, got, want)
    assert r["adam_steps"][pair] == [K + N], "Adam's step after the resumed steps is not the iteration"


@pytest.mark.distributed
def test_old_checkpoints_refuse_to_cross_ep(matrix):
    msg = matrix[0]["plain"]["legacy_cross_ep"]
    assert msg and "older version" in msg and "checkpoint.init_from=" in msg


@pytest.mark.distributed
def test_fast_format_refuses_another_layout(matrix):
    """The periodic save's dp_reshardable format loads at its own layout (the matrix's tp2+dp>tp2 pair)
    and is refused elsewhere before anything is loaded, naming the format and the fix."""
    msg = matrix[0]["dist"]["fast_format_other_layout"]
    assert msg and "dp_reshardable format" in msg and "checkpoint.init_from=" in msg


@pytest.mark.distributed
@pytest.mark.parametrize("damage", ["missing", "truncated", "metadata"])
def test_damaged_checkpoint_names_the_file(matrix, tmp_path, damage):
    from scidfm_megatron.training.checkpoint import CheckpointMismatch, check_files, find_resume

    src = find_resume(matrix[1], cleanup=False)
    check_files(src)  # the intact checkpoint passes
    bad = tmp_path / src.name
    shutil.copytree(src, bad)
    shards = sorted(p for p in os.listdir(bad) if p.endswith(".distcp"))
    if damage == "missing":
        os.remove(bad / shards[-1])
        want = f"{bad / shards[-1]} is missing"
    elif damage == "truncated":
        with open(bad / shards[0], "r+b") as f:
            f.truncate(100)
        want = f"{bad / shards[0]} is truncated (100 bytes"
    else:
        os.remove(bad / "common.pt")
        want = f"{bad / 'common.pt'} is missing"
    with pytest.raises(CheckpointMismatch, match="resume from an earlier") as exc:
        check_files(bad)
    assert want in str(exc.value)


def test_changed_global_batch_is_refused_with_the_reason():
    from types import SimpleNamespace

    from scidfm_megatron.training.checkpoint import CheckpointMismatch, check_data_position

    saved = {"train": {"global_batch_size": 8, "seq_length": 64}}
    check_data_position(saved, SimpleNamespace(global_batch_size=8, seq_length=64), "c/iter_0000003")
    with pytest.raises(CheckpointMismatch, match="train.global_batch_size=8 and this run has 16.*init_from"):
        check_data_position(saved, SimpleNamespace(global_batch_size=16, seq_length=64), "c/iter_0000003")
    with pytest.raises(CheckpointMismatch, match="train.seq_length=64 and this run has 128"):
        check_data_position(saved, SimpleNamespace(global_batch_size=8, seq_length=128), "c/iter_0000003")


def test_checkpoint_package_exports_every_public_name():
    """training/checkpoint/ is split into modules; callers import from the package as before: every name the
    single module had resolves there, and every public name of its modules is exported."""
    import importlib

    from scidfm_megatron.training import checkpoint as ckpt

    before_split = ("FORMATS TOKENIZER_FILE CheckpointMismatch check_data_position check_files check_model_shapes "
                    "complete_checkpoints find_resume is_weights_only iter_dir load masters_reloaded read_meta "
                    "resolve rng_state save saved_config set_rng_state tokenizer_file").split()
    assert [n for n in before_split if not hasattr(ckpt, n)] == []
    for name in ("directory", "integrity", "reshard", "save_load"):
        mod = importlib.import_module(f"{ckpt.__name__}.{name}")
        public = {n for n, v in vars(mod).items() if not n.startswith("_")
                  and (getattr(v, "__module__", None) == mod.__name__ or n.isupper())}
        assert public - set(ckpt.__all__) == set(), name
        assert all(getattr(ckpt, n) is getattr(mod, n) for n in public)


def test_async_save_killed_mid_write_is_never_published(runs, tmp_path):
    """checkpoint.async_save with the distributed optimizer (periodic saves in the fast dp_reshardable
    format): the job is SIGKILLed while the iteration-4 save is written but not yet finalized (a fault point,
    SCIDFM_TEST_HOLD_ASYNC_WRITE=4, holds every rank's writer after its last byte: no race with the write);
    iter_0000004.tmp stays, never iter_0000004 or `latest` = 4; the next run resumes from iteration 2 and
    continues bitwise as the uninterrupted run, whose last save (the end of the run) is the layout-free
    fully_reshardable format."""
    import signal
    import subprocess

    from conftest import ROOT, cmd, overrides, train
    from scidfm_megatron.testing.distributed import cpu_env
    from test_training import kill_tree, losses, wait_for

    common = {"train.train_iters": 6, "train.use_distributed_optimizer": "true", "checkpoint.save_interval": 2,
              "checkpoint.async_save": "true"}
    ref = tmp_path / "ref"
    r = train(2, overrides(runs, ref, **common) + ["parallel.ep=2"])
    assert "iter_0000002 (dp_reshardable, asynchronously)" in r.stdout
    assert "saved checkpoint" in r.stdout and "iter_0000006 (fully_reshardable)" in r.stdout
    run = tmp_path / "run"
    args = overrides(runs, run, **common) + ["parallel.ep=2"]
    proc = subprocess.Popen(cmd(2, "tiny_stage1.yaml", args), cwd=ROOT, stdout=subprocess.PIPE,
                            env=cpu_env({"SCIDFM_TEST_HOLD_ASYNC_WRITE": "4"}), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    tmp4, final4 = run / "ckpt" / "iter_0000004.tmp", run / "ckpt" / "iter_0000004"
    wait_for(lambda: all((tmp4 / f"written.rank{k}").exists() for k in (0, 1)), timeout=600, proc=proc)
    kill_tree(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp4.exists() and not final4.exists()
    assert (run / "ckpt" / "latest").read_text().strip() == "2"
    r = train(2, args)
    assert "ignoring interrupted checkpoint save" in r.stdout + r.stderr and "iteration 2" in r.stdout
    got, want = losses(run), losses(ref)
    assert [got[i] for i in range(3, 7)] == [want[i] for i in range(3, 7)]  # bitwise, from the async save


# ------------------------------------------------------------------ the ranks (forked by run_distributed)
SEQ, GLOBAL_BATCH, MICRO = 32, 8, 1


def parallel_config(name):
    from scidfm_megatron.config import ParallelConfig

    deg = {k: int(v) for k, v in re.findall(r"(etp|tp|pp|ep|vpp)(\d+)", name)}
    return ParallelConfig(tp=deg.get("tp", 1), pp=deg.get("pp", 1), ep=deg.get("ep", 1), vpp=deg.get("vpp"),
                          etp=deg.get("etp"))


def batches(step, dp, dp_rank, vocab):
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 5, (GLOBAL_BATCH, 1), generator=g)
    tokens = (start + stride * torch.arange(SEQ + 1)) % vocab
    per = GLOBAL_BATCH // dp
    mine = tokens[dp_rank * per:(dp_rank + 1) * per]
    return [dict(tokens=mine[i:i + MICRO, :-1].contiguous(), labels=mine[i:i + MICRO, 1:].contiguous(),
                 loss_mask=torch.ones(MICRO, SEQ), position_ids=torch.arange(SEQ).expand(MICRO, SEQ).contiguous())
            for i in range(0, per, MICRO)]


def resume_rank(rank, world_size, pairs, workdir, *, plain_pairs=None, optimizers=("plain", "dist"), k=3, n=3,
                fmt="fully_reshardable", keep=None):
    """One rank of the resume matrix (rank 0 returns the report).

    Every layout is built in the same processes (megatron's groups re-initialised per layout), from one set
    of global weights (the first layout's initialisation), and trained on the same global batches (each DP
    rank takes its contiguous share), fp32 and dropless, with the run's real pieces: DDP, megatron's
    optimizer (plain or distributed, ``optimizers``) through ``training.engine``, ``training.step.train_step``
    and ``training.checkpoint.save/load``.

      1. reference: the first layout trains k + n steps without interruption (losses of steps k+1..k+n);
      2. every layout that is a source of a pair trains k steps and saves a full checkpoint (model, optimizer);
      3. every pair "A>B" loads A's checkpoint at layout B and trains n steps.
    The report is {optimizer: {"ref": [...], "pairs": {"A>B": [...]}, "adam_steps": {"A>B": [...]}}},
    adam_steps being the set of Adam step counts over every parameter after the resumed steps (all k + n).
    ``pairs`` (``plain_pairs`` for the plain optimizer when given): "A>B" strings. Layout names: dp, ep2, tp2,
    pp2, pp2vpp2, tp2pp2ep2etp1, ... (degrees not named are 1, ETP defaults to TP; DP fills the world). A
    source named with "+dp" (e.g. "ep2+dp>ep2") is saved in the fast dp_reshardable format of the
    distributed optimizer, the others in ``fmt``. ``keep``: copy the plain optimizer's first saved
    checkpoint directory there."""
    from scidfm_megatron.model.presets import get_preset

    model_cfg = get_preset("scidfm-debug", moe_capacity_factor=None)
    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    weights = os.path.join(workdir, "weights.pt")
    report = {}
    for optimizer in optimizers:
        spec = plain_pairs if optimizer == "plain" and plain_pairs else pairs
        split = [tuple(x.split(">")) for x in spec]
        sources = list(dict.fromkeys(a for a, _ in split))
        report[optimizer] = resume_matrix(workdir, k, n, fmt, keep, optimizer, model_cfg, split, sources, sources[0],
                                   weights)
    return report if rank == 0 else None


def adam_steps(opt) -> list:
    """Adam's step of every parameter this rank's optimizer(s) hold."""
    out = set()
    for o in getattr(opt, "chained_optimizers", [opt]):
        for st in o.optimizer.state.values():
            if "step" in st:
                out.add(float(st["step"]))
    return sorted(out)


def legacy_refusal(work, pairs, build, done, ckpt):
    """A checkpoint written before optimizer state was keyed by parameter (its scidfm_meta.json has no
    optimizer_keys) cannot cross EP=1 <-> EP>1: the load must refuse with the reason, before loading."""
    import torch.distributed as dist

    src = next((a for a, b in pairs if parallel_config(a).ep > 1 and parallel_config(b).ep == 1), None)
    dst = next(b for a, b in pairs if a == src)
    path = ckpt.find_resume(os.path.join(work, src), cleanup=False)
    old = os.path.join(work, "legacy", path.name)
    if dist.get_rank() == 0:
        shutil.copytree(path, old)
        meta = json.load(open(os.path.join(old, "scidfm_meta.json")))
        meta.pop("optimizer_keys")
        json.dump(meta, open(os.path.join(old, "scidfm_meta.json"), "w"))
    dist.barrier()
    layout, chunks, opt = build(dst)
    try:
        ckpt.load(old, chunks, opt)
        message = None
    except ckpt.CheckpointMismatch as exc:
        message = str(exc)
    done(chunks)
    return message


def resume_matrix(workdir, k, n, fmt, keep, optimizer, model_cfg, pairs, sources, first, weights):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from scidfm_megatron.model.builder import build_model_chunks
    from scidfm_megatron.model.state_dict import gather_global_state_dict, load_global_state_dict
    from scidfm_megatron.parallel import init_distributed
    from scidfm_megatron.training import checkpoint as ckpt
    from scidfm_megatron.training.engine import build_optimizer, wrap_ddp
    from scidfm_megatron.training.step import train_step

    work = os.path.join(workdir, optimizer)
    dist_opt = optimizer == "dist"

    def build(name):
        par = parallel_config(name)
        layout = init_distributed(model_cfg, par, seed=1234)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        chunks = build_model_chunks(model_cfg, par, precision="fp32")
        config = chunks[0].config
        if os.path.exists(weights):
            load_global_state_dict(chunks, torch.load(weights))
        else:
            sd = gather_global_state_dict(chunks)
            if dist.get_rank() == 0:
                torch.save(sd, weights)
            dist.barrier()
        chunks = wrap_ddp(chunks, config, use_distributed_optimizer=dist_opt)
        opt = build_optimizer(chunks, config, lr=1e-3, weight_decay=0.1, clip_grad=1.0,
                              use_distributed_optimizer=dist_opt)
        return layout, chunks, opt

    def steps(layout, chunks, opt, first_step, count):
        out = []
        for s in range(first_step, first_step + count):
            r = train_step(chunks, opt, batches(s, layout.dp, ps.get_data_parallel_rank(), model_cfg.vocab_size),
                           seq_length=SEQ, micro_batch_size=MICRO)
            out.append(r.loss)
        return out

    def done(chunks):
        del chunks
        ps.destroy_model_parallel()

    result = {"pairs": {}, "adam_steps": {}}
    layout, chunks, opt = build(first)
    result["ref"] = steps(layout, chunks, opt, 1, k + n)[k:]
    done(chunks)
    for name in sources:
        layout, chunks, opt = build(name)
        steps(layout, chunks, opt, 1, k)
        ckpt.save(os.path.join(work, name), k, chunks, opt, None, {"consumed_samples": k * GLOBAL_BATCH},
                  optimizer_format="dp_reshardable" if name.endswith("+dp") else fmt)
        done(chunks)
    for a, b in pairs:
        layout, chunks, opt = build(b)
        ckpt.load(ckpt.find_resume(os.path.join(work, a), cleanup=False), chunks, opt)
        result["pairs"][f"{a}>{b}"] = steps(layout, chunks, opt, k + 1, n)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, adam_steps(opt))
        result["adam_steps"][f"{a}>{b}"] = sorted({x for r in every for x in r})
        done(chunks)
    if optimizer == "plain":
        result["legacy_cross_ep"] = legacy_refusal(work, pairs, build, done, ckpt)
    fast = next((a for a, _ in pairs if a.endswith("+dp")), None)
    if fast:  # the fast format at another layout: refused before loading
        other = next(n for n in sources if parallel_config(n) != parallel_config(fast))
        layout, chunks, opt = build(other)
        try:
            ckpt.load(ckpt.find_resume(os.path.join(work, fast), cleanup=False), chunks, opt)
            result["fast_format_other_layout"] = None
        except ckpt.CheckpointMismatch as exc:
            result["fast_format_other_layout"] = str(exc)
        done(chunks)
    dist.barrier()
    if dist.get_rank() == 0:
        if keep and optimizer == "plain":
            shutil.copytree(os.path.join(work, sources[0]), keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return result
