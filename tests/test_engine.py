"""The engine's contract (issue 10): router statistics stay on the device, the backend is what was asked
for or an error that says why, the log names the implementations, and a bad recipe fails in seconds."""

import subprocess
import sys

import pytest
import torch

from conftest import RECIPES, ROOT
from scidfm_megatron.testing.distributed import cpu_env


@pytest.fixture
def one_rank():
    """A single-process megatron runtime in this process (in-memory store, no port), torn down after."""
    import torch.distributed as dist

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.presets import get_preset
    from scidfm_megatron.parallel import destroy_distributed, init_distributed

    cfg = get_preset("scidfm-debug")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    init_distributed(cfg, ParallelConfig())
    yield cfg
    destroy_distributed()


class HostSyncCounter:
    """Counts the Tensor methods that copy to the host (each is a GPU synchronisation on CUDA)."""

    NAMES = ("cpu", "item", "tolist", "numpy", "__int__", "__float__", "__bool__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def counted(self_, *a, _orig=orig, _name=name, **k):
                self.calls.append(_name)
                return _orig(self_, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_router_statistics_reach_the_host_once_per_step(one_rank, monkeypatch):
    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.builder import build_model
    from scidfm_megatron.model.routing import RouterRecorder
    from scidfm_megatron.training.metrics import ExpertLoad

    cfg = one_rank
    model = build_model(cfg, ParallelConfig(), precision="fp32")
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    with RouterRecorder([model]) as rec:
        model(ids, pos, None)  # warm-up: first calls may build caches
        rec.clear()
        counter = HostSyncCounter(monkeypatch)
        for _ in range(3):  # three micro-batches of one step
            model(ids, pos, None)
        in_forward = [c for c in counter.calls]
        load, offered = ExpertLoad(cfg.num_layers, cfg.num_experts, cfg.moe_router_topk).reduce(rec.calls)
    monkeypatch.undo()
    # The hooks themselves add no host copy (whatever megatron's own forward does is counted here too,
    # so compare with the same forwards without the recorder).
    counter2 = HostSyncCounter(monkeypatch)
    for _ in range(3):
        model(ids, pos, None)
    monkeypatch.undo()
    assert len(in_forward) == len(counter2.calls), (in_forward, counter2.calls)
    assert len(rec.calls) == 3 * cfg.num_layers
    assert all(c.tokens_per_expert.device == ids.device and c.tokens_per_expert.dtype == torch.int64
               for c in rec.calls)
    # reduce: one copy of one [layers, experts + 1] tensor to the host
    assert counter.calls[len(in_forward):].count("cpu") == 1
    assert load.shape == (cfg.num_layers, cfg.num_experts) and torch.all(offered == 3 * 2 * 16 * cfg.moe_router_topk)
    assert torch.all(load.sum(1) <= offered) and float(load.sum()) > 0


def entry(capsys, *args) -> subprocess.CompletedProcess:
    """``python -m scidfm_megatron.train ARGS`` in this process: the module's whole body is
    ``sys.exit(main())`` (scidfm_megatron/cli/train.py), and a valid recipe's check imports megatron-core
    (~5 s a subprocess). The command line itself (exit status 2, message on stderr) runs as a subprocess in
    test_a_bad_recipe_fails_before_anything_is_built and in the launchers' checks (tests/test_launch.py)."""
    from scidfm_megatron.cli.train import main

    capsys.readouterr()
    rc = main(argv=[str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def check(capsys, *overrides, recipe="tiny_stage1.yaml", runs=None):
    args = ["--config", RECIPES / recipe, "--check", "--world-size", "2"]
    if runs is not None:
        args += [f"data.tokenizer_model={runs / 'tokenizer' / 'tokenizer.model'}", f"data.data_root={runs / 'data'}"]
    return entry(capsys, *args, *overrides)


def test_backend_te_without_transformer_engine_fails_with_the_reason(runs, capsys):
    pytest.importorskip("megatron.core")
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: TE may be installed")
    r = check(capsys, "model.backend=te", runs=runs)
    assert r.returncode == 2
    assert "model.backend is 'te' but TransformerEngine does not import: ModuleNotFoundError" in r.stderr, r.stderr
    r = check(capsys, "model.backend=auto", runs=runs)
    assert r.returncode == 0 and "(backend auto" in r.stdout  # the config keeps what the recipe says ...
    assert "[scidfm] model.backend: auto -> local (CUDA is not available)" in r.stdout  # ... and logs what it builds
    r = check(capsys, "model.backend=fused", runs=runs)
    assert r.returncode == 2 and "model.backend must be auto, te, te-sdpa, torch or local, got 'fused'" in r.stderr


def test_the_log_names_the_implementations(one_rank):
    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.builder import build_model, describe_implementations

    impl = describe_implementations([build_model(one_rank, ParallelConfig(), precision="fp32")])
    assert impl["attention"] == "DotProductAttention"
    assert impl["experts"] == "SequentialMLP"
    assert impl["norm"] == "RMSNorm (scidfm_megatron)"
    assert "ColumnParallelLinear" in impl["linear"] and "RowParallelLinear" in impl["linear"]


@pytest.mark.parametrize("override,message", [
    ("train.warmup_iters=100", "train.warmup_iters (100) must be smaller than the decay length"),
    ("train.global_batch_size=12", "must be a multiple of micro_batch_size x DP = 4 x 2"),
    ("parallel.ep=3", "ETP*EP*PP=3 must divide world size=2"),
    ("model.vocab_size=1000", "model.vocab_size is 1000 but"),
    ("engine.overlap_param_gather=true", "engine.overlap_param_gather needs train.use_distributed_optimizer"),
    ("checkpoint.resume_from=/nonexistent/ckpt", "checkpoint.resume_from: /nonexistent/ckpt does not exist"),
])
def test_a_bad_recipe_fails_before_anything_is_built(runs, override, message):
    """What used to surface after ~40 s of model and data building fails in the config check, with the
    key named, in --check, in --print-config, and (the same function) at the start of every rank."""
    for flag in ("--check", "--print-config"):
        args = [sys.executable, "-m", "scidfm_megatron.train", "--config", str(RECIPES / "tiny_stage1.yaml"), flag,
                "--world-size", "2", f"data.tokenizer_model={runs / 'tokenizer' / 'tokenizer.model'}", override]
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=cpu_env())
        assert r.returncode == 2 and message in r.stderr, (flag, r.stdout, r.stderr)


def test_param_sync_func_only_with_align_param_gather(one_rank):
    """Megatron-LM sets the schedule's param_sync_func only with align_param_gather; with
    overlap_param_gather alone the DDP forward pre-hooks gather the parameters bucket by bucket."""
    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.builder import build_model_chunks
    from scidfm_megatron.training.engine import build_optimizer, wrap_ddp

    for align in (False, True):
        chunks = build_model_chunks(one_rank, ParallelConfig(), precision="fp32")
        config = chunks[0].config
        chunks = wrap_ddp(chunks, config, use_distributed_optimizer=True, overlap_grad_reduce=True,
                          overlap_param_gather=True, align_param_gather=align)
        build_optimizer(chunks, config, lr=1e-4, use_distributed_optimizer=True)
        assert config.grad_sync_func is not None
        assert (config.param_sync_func is not None) == align, align


def test_capacity_routing_with_padding_copies_nothing_to_the_host(one_rank, monkeypatch):
    """With an expert capacity and padding (packed SFT), the router drops among the real tokens on the
    device: no nonzero() and no device-to-host copy per MoE layer (counted as the router-statistics test
    counts them, plus nonzero), and the result is megatron's own dropping applied to the real tokens alone
    (capacity from the real-token count)."""
    import dataclasses

    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.builder import build_model

    cfg = dataclasses.replace(one_rank, moe_capacity_factor=1.0)
    model = build_model(cfg, ParallelConfig(), precision="fp32")
    router = model.decoder.layers[0].mlp.router
    assert type(router).__name__ == "PaddingAwareRouter" and router.config.moe_expert_capacity_factor == 1.0
    g = torch.Generator().manual_seed(5)
    s, b, E, k = 24, 2, cfg.num_experts, cfg.moe_router_topk
    logits = torch.randn(s, b, E, generator=g)
    pad = torch.zeros(s, b, dtype=torch.bool)
    pad[17:, 0] = True  # sample 0 ends in padding
    pad[21:, 1] = True
    router.eval()
    counter = HostSyncCounter(monkeypatch)
    nonzero = []
    orig_nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda t, *a, **kw: nonzero.append(1) or orig_nonzero(t, *a, **kw))
    with torch.no_grad():
        probs, rmap = router.routing(logits.clone(), padding_mask=pad)
    monkeypatch.undo()
    assert counter.calls == [] and nonzero == [], (counter.calls, nonzero)

    # the reference: megatron's routing without padding, then its dropping over the real tokens only
    real = ~pad.reshape(-1)
    router.config.moe_expert_capacity_factor = None
    try:
        with torch.no_grad():
            p_all, m_all = router.routing(logits.clone(), padding_mask=pad)  # no capacity: every top-k kept
    finally:
        router.config.moe_expert_capacity_factor = 1.0
    idx = real.nonzero().squeeze(-1)
    p_ref, m_ref = apply_router_token_dropping(p_all[idx], m_all[idx], router_topk=k, capacity_factor=1.0,
                                               drop_policy="probs")
    assert torch.equal(rmap[idx], m_ref) and torch.equal(probs[idx], p_ref)
    assert not rmap[~real].any() and not probs[~real].any()
    assert int(m_all[idx].sum()) > int(m_ref.sum())  # the capacity did drop tokens: the case is not trivial


def test_the_engine_makes_the_parallel_choices_the_builder_applies(monkeypatch):
    """training/engine.py is the one place for parallel choices: sequence parallelism (auto: TP > 1) and the
    pipeline's p2p (Megatron-LM's overlapped, unbatched p2p with VPP) come from ``parallel_choices``, which
    ``build_engine`` hands to the builder, whose TransformerConfig carries what it is given."""
    import types

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.builder import to_transformer_config
    from scidfm_megatron.model.presets import get_preset
    from scidfm_megatron.training import engine
    from scidfm_megatron.training.config import load_run_config

    assert engine.parallel_choices(ParallelConfig(tp=2, pp=2, vpp=2)) == dict(
        sequence_parallel=True, overlap_p2p_comm=True, batch_p2p_comm=False)
    assert engine.parallel_choices(ParallelConfig(tp=2, sequence_parallel=False)) == dict(
        sequence_parallel=False, overlap_p2p_comm=False, batch_p2p_comm=True)
    given = dict(sequence_parallel=False, overlap_p2p_comm=False, batch_p2p_comm=True)
    tc = to_transformer_config(get_preset("scidfm-debug"), ParallelConfig(tp=2), precision="fp32", parallel=given)
    assert (tc.sequence_parallel, tc.overlap_p2p_comm, tc.batch_p2p_comm) == (False, False, True)

    seen = {}

    class Built(Exception):
        pass

    def fake_chunks(*a, **kw):
        seen.update(kw)
        raise Built

    monkeypatch.setattr("scidfm_megatron.model.builder.build_model_chunks", fake_chunks)
    cfg = load_run_config(str(RECIPES / "tiny_stage1.yaml"), ["parallel.tp=2", "parallel.ep=1"])
    with pytest.raises(Built):
        engine.build_engine(cfg, types.SimpleNamespace(dp=1))
    assert seen["parallel"] == engine.parallel_choices(cfg.parallel) and seen["parallel"]["sequence_parallel"]
