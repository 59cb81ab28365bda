"""Issue 13, the ``torch`` backend (model/torch_backend.py), on one process: padded SDPA attention equals
megatron's unfused DotProductAttention, grouped experts equal megatron's per-expert MLPs, and a ``torch``
model is a ``local`` model (same checkpoint keys and shapes, same logits and gradients from the same
weights). The multi-rank layout case is in test_parallel_parity.py; GPU-only checks are marked ``gpu``."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from scidfm_megatron.config import ParallelConfig
from scidfm_megatron.model.presets import get_preset

# head_dim 20: padded to 24 inside the attention, so every model-level comparison runs the padding.
DEBUG = dict(head_dim=20, moe_capacity_factor=None)


@pytest.fixture(scope="module")
def rank():
    """A single-process megatron runtime in this process (in-memory store), torn down after the module."""
    import torch.distributed as dist

    from scidfm_megatron.parallel import destroy_distributed, init_distributed

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    init_distributed(get_preset("scidfm-debug"), ParallelConfig())
    yield
    destroy_distributed()


@pytest.fixture(scope="module")
def models(rank):
    """The same global weights in a ``local`` model and in a ``torch`` model (the latter with
    train.recompute: selective, i.e. moe_act recompute)."""
    from scidfm_megatron.model.builder import build_model
    from scidfm_megatron.model.state_dict import gather_global_state_dict, load_global_state_dict

    cfg = get_preset("scidfm-debug", **DEBUG)
    torch.manual_seed(0)
    local = build_model(cfg, ParallelConfig(), precision="fp32", backend="local")
    tcfg = dataclasses.replace(cfg, backend="torch")
    tmod = build_model(tcfg, ParallelConfig(), precision="fp32", recompute="selective")
    weights = gather_global_state_dict([local])
    load_global_state_dict([tmod], weights)
    return cfg, local, tmod, weights


def assert_within(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str = ""):
    """max |got - ref| <= tol x max |ref|: equal to ``tol`` at the tensor's own scale."""
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert scale > 0 and err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x scale {scale:.3g}"


def _attention_pair(head_dim, heads, groups):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from scidfm_megatron.model.builder import to_transformer_config
    from scidfm_megatron.model.torch_backend import attention_class

    cfg = get_preset("scidfm-debug", head_dim=head_dim, num_attention_heads=heads, num_query_groups=groups)
    tc = to_transformer_config(cfg, ParallelConfig(), precision="fp32")
    args = dict(config=tc, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**args), attention_class()(**args)


@pytest.mark.parametrize("head_dim,heads,groups", [(100, 4, 4), (100, 4, 2)], ids=["hd100", "hd100-gqa"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document"])
def test_padded_attention_equals_unpadded(rank, monkeypatch, head_dim, heads, groups, masked):
    """fp32: outputs and q/k/v gradients within 1e-6 of megatron's DotProductAttention, relative to each
    tensor's largest entry (its scale here is ~4; megatron's own fp32 error against float64 is 1.2e-6
    absolute, so 1e-6 absolute would test rounding); the kernel is given head_dim 104 and the scale
    1/sqrt(100), and is_causal when no mask is given."""
    from scidfm_megatron.device import device
    from scidfm_megatron.model.packing import document_attention_mask

    ref, mod = _attention_pair(head_dim, heads, groups)
    g = torch.Generator().manual_seed(1)
    s, b, dev = 24, 2, device()
    q = torch.randn(s, b, heads, head_dim, generator=g).to(dev)
    k, v = (torch.randn(s, b, groups, head_dim, generator=g).to(dev) for _ in range(2))
    mask = None
    if masked:  # two documents then padding in sample 0, three documents in sample 1
        doc = torch.tensor([[0] * 10 + [1] * 9 + [-1] * 5, [0] * 6 + [1] * 12 + [2] * 6])
        mask = document_attention_mask(doc).to(dev)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(qq, kk, vv, **kw):
        seen.append((qq.shape[-1], kw.get("scale"), kw.get("is_causal"), kw.get("attn_mask") is not None))
        return sdpa(qq, kk, vv, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    grad_out = torch.randn(s, b, heads * head_dim, generator=g).to(dev)
    outs, grads = [], []
    for m in (ref, mod):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = m(*qkv, mask)
        out.backward(grad_out)
        outs.append(out.detach())
        grads.append([t.grad for t in qkv])
    assert seen == [(104, 1 / math.sqrt(100), not masked, masked)]
    assert_within(outs[1], outs[0], 1e-6, "output")
    for name, a, r in zip("qkv", grads[1], grads[0], strict=False):
        assert_within(a, r, 1e-6, f"d{name}")


def test_grouped_experts_equal_per_expert_mlp(models):
    """The experts of layer 0 (the same weights): GroupedExperts vs megatron's SequentialMLP, one expert
    given no token, outputs and input/weight gradients within 1e-6; torch._grouped_mm's path (forward on
    CPU: its CPU backward is not supported by torch) equals the per-expert loop."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    cfg, local, tmod, _ = models
    ref, mod = local.decoder.layers[0].mlp.experts, tmod.decoder.layers[0].mlp.experts
    assert type(ref) is SequentialMLP and type(mod).__name__ == "GroupedExperts"
    counts = torch.tensor([5, 0, 7, 3, 1, 4, 6, 2])
    g = torch.Generator().manual_seed(2)
    dev = next(mod.parameters()).device
    x = torch.randn(int(counts.sum()), cfg.hidden_size, generator=g).to(dev)
    probs = torch.rand(x.shape[0], generator=g).to(dev)
    grad_out = torch.randn(x.shape[0], cfg.hidden_size, generator=g).to(dev)
    res = []
    for m in (ref, mod):
        m.zero_grad(set_to_none=True)
        xx, pp = x.clone().requires_grad_(), probs.clone().requires_grad_()
        out, bias = m(xx, counts, pp)
        assert bias is None
        out.backward(grad_out)
        res.append((out.detach(), xx.grad, pp.grad, [p.grad.clone() for p in m.parameters()]))
    (o0, x0, p0, w0), (o1, x1, p1, w1) = res
    torch.testing.assert_close(o1, o0, rtol=0, atol=1e-6)
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(p1, p0, rtol=0, atol=1e-6)
    assert len(w0) == len(w1) == 2 * cfg.num_experts
    for a, r in zip(w1, w0, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
    mod.grouped = True
    try:
        with torch.no_grad():
            o2, _ = mod(x, counts, probs)
    finally:
        mod.grouped = None
    torch.testing.assert_close(o2, o0, rtol=0, atol=1e-5)


def test_torch_model_is_a_local_model(models):
    """Same state-dict keys and shapes, sharded checkpoint keys and parameter order; the local model's global
    weights give the same logits (1e-5) and gradients, causal and with a packed-SFT document mask, with the
    experts' SwiGLU recomputed (moe_act: the checkpoint is registered once per layer and forward)."""
    from megatron.core.tensor_parallel import CheckpointWithoutOutput

    from scidfm_megatron.model.packing import document_attention_mask
    from scidfm_megatron.model.state_dict import gather_global_state_dict

    cfg, local, tmod, weights = models
    sd_t = tmod.state_dict()
    sd_l = local.state_dict()
    assert sorted(sd_t) == sorted(sd_l)
    assert all(sd_t[k].shape == sd_l[k].shape for k in sd_l if not k.endswith("_extra_state"))
    got = gather_global_state_dict([tmod])
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    # what a megatron distributed checkpoint stores (sharded keys, global shapes, offsets) and the parameter
    # order the optimizer state follows are the same: a local checkpoint resumes under torch and back
    sh_l, sh_t = local.sharded_state_dict(), tmod.sharded_state_dict()
    assert sorted(sh_l) == sorted(sh_t)
    for key, ten in sh_l.items():
        if hasattr(ten, "global_shape"):
            assert (ten.key, ten.global_shape, ten.global_offset) == (
                sh_t[key].key, sh_t[key].global_shape, sh_t[key].global_offset), key
    assert [n for n, _ in local.named_parameters()] == [n for n, _ in tmod.named_parameters()]

    calls = []
    orig = CheckpointWithoutOutput.discard_output_and_register_recompute

    def counted(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    g, dev = torch.Generator().manual_seed(3), next(tmod.parameters()).device
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=g).to(dev)
    doc = torch.tensor([[0] * 12 + [1] * 16 + [-1] * 4, [0] * 32], device=dev)
    pos = torch.cat([torch.arange(12), torch.arange(16), torch.arange(4)]).expand(2, 32).contiguous().to(dev)
    for mask in (None, document_attention_mask(doc)):
        outs = []
        CheckpointWithoutOutput.discard_output_and_register_recompute = counted
        try:
            for m in (local, tmod):
                m.zero_grad(set_to_none=True)
                logits = m(ids, pos, mask)
                logits.float().square().mean().backward()
                outs.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        finally:
            CheckpointWithoutOutput.discard_output_and_register_recompute = orig
            # a backward outside megatron's schedule leaves the aux-loss scale a 0-d tensor, which the
            # schedule's later copy_ of a [1] tensor into it refuses (megatron-core 0.16.1)
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

            MoEAuxLossAutoScaler.main_loss_backward_scale = None
        (l0, g0), (l1, g1) = outs
        torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
        for n, gr in g0.items():
            torch.testing.assert_close(g1[n], gr, rtol=1e-4, atol=1e-8, msg=lambda m: f"grad {n}: {m}")  # noqa: B023
    assert len(calls) == 2 * cfg.num_layers, calls


def test_backend_and_recompute_choices(rank):
    """model.backend torch is accepted; selective recompute is moe_act for torch, core_attn + moe for local
    (megatron has no moe_act for per-expert MLPs), a module list is taken as given, a wrong one named."""
    from scidfm_megatron.config import ConfigError
    from scidfm_megatron.model.builder import resolve_backend, to_transformer_config

    torch_cfg = get_preset("scidfm-debug", backend="torch")
    assert resolve_backend("torch") == "torch"
    assert to_transformer_config(torch_cfg, ParallelConfig(), recompute="selective").recompute_modules == ["moe_act"]
    local_cfg = get_preset("scidfm-debug", backend="local")
    assert to_transformer_config(local_cfg, ParallelConfig(), recompute="selective").recompute_modules == [
        "core_attn", "moe"]
    tc = to_transformer_config(torch_cfg, ParallelConfig(), recompute="core_attn,moe_act")
    assert tc.recompute_granularity == "selective" and tc.recompute_modules == ["core_attn", "moe_act"]
    with pytest.raises(ValueError, match="moe_act needs model.backend torch or te"):
        to_transformer_config(local_cfg, ParallelConfig(), recompute="core_attn,moe_act")
    with pytest.raises(ConfigError, match="model.backend must be auto, te, te-sdpa, torch or local, got 'flash'"):
        get_preset("scidfm-debug", backend="flash")


def test_sdpa_kernel_taken_names_the_kernel():
    """The name the first log line prints: SDPA's fused CPU kernel here, "math" when SDPA is restricted to its
    unfused kernel (the GPU names, flash / cudnn / efficient, are asserted by the GPU test below)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scidfm_megatron.model.builder import attention_kernel
    from scidfm_megatron.model.torch_backend import sdpa_kernel_taken

    before = torch.get_rng_state()
    if not torch.cuda.is_available():
        assert sdpa_kernel_taken(2, 100, seq=16) == "cpu-flash"
        # the trainer's first line: the torch backend's padded SDPA, as packed SFT calls it too
        assert attention_kernel(get_preset("scidfm-debug", backend="torch"), masked=True) == "SDPA cpu-flash"
    with sdpa_kernel([SDPBackend.MATH]):
        assert sdpa_kernel_taken(2, 100, seq=16, masked=True) == "math"
        assert attention_kernel(get_preset("scidfm-debug", backend="torch")) == "SDPA math"
    assert attention_kernel(get_preset("scidfm-debug", backend="local")).startswith("unfused")
    assert torch.equal(torch.get_rng_state(), before)  # the run's random stream is not touched


@pytest.mark.gpu
def test_padded_attention_runs_under_each_fused_kernel_on_gpu():
    """bf16 at SciDFM's shape (32 heads x 100, seq 2048): the padded attention runs forward and backward with
    SDPA restricted to each of the flash, cuDNN and memory-efficient kernels (causal; the efficient one also
    with a document mask, as packed SFT gives it), the dispatch names that kernel, and output and gradients
    equal the unfused math kernel's (fp32) within bf16 rounding (2e-2 of each tensor's scale). Which kernels
    accept the *unpadded* head_dim 100 is recorded, not asserted (PyTorch's flash pads by itself; cuDNN and
    efficient refuse): into $SCIDFM_GPU_FACTS/sdpa_kernels.json when set (the GPU check stores it)."""
    import json
    import os

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scidfm_megatron.model.packing import document_attention_mask
    from scidfm_megatron.model.torch_backend import sdpa_kernel_of, sdpa_padded

    g = torch.Generator(device="cuda").manual_seed(0)
    s = 2048
    q, k, v = (torch.randn(1, 32, s, 100, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    doc = torch.tensor([[0] * 700 + [1] * 1000 + [2] * 348])
    keep = ~document_attention_mask(doc).cuda()  # SDPA's convention: True = attend

    def fwd_bwd(dtype, mask=None, padded=True):
        qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
        attn = sdpa_padded if padded else F.scaled_dot_product_attention
        out = attn(qq, kk, vv, attn_mask=mask, is_causal=mask is None)
        out.float().square().mean().backward()
        return [out.float(), *(t.grad.float() for t in (qq, kk, vv))]

    refs = {}
    for masked in (False, True):
        with sdpa_kernel([SDPBackend.MATH]):
            refs[masked] = fwd_bwd(torch.float32, keep if masked else None)
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}
    facts = {"shape": [1, 32, s, 100], "dtype": "bf16", "capability": list(torch.cuda.get_device_capability()),
             "torch": torch.__version__, "unpadded_head_dim_100": {}, "padded_104": {}}
    for name, backend in kernels.items():
        with sdpa_kernel([backend]):
            try:
                fwd_bwd(torch.bfloat16, padded=False)
                facts["unpadded_head_dim_100"][name] = "accepted"
            except RuntimeError as exc:
                facts["unpadded_head_dim_100"][name] = "refused: " + str(exc).splitlines()[0][:200]
            for masked in ((False, True) if name == "efficient" else (False,)):
                res = []
                taken = sdpa_kernel_of(lambda: res.extend(fwd_bwd(torch.bfloat16, keep if masked else None)))  # noqa: B023
                assert taken == name, (name, masked, taken)
                for what, got, ref in zip(("out", "dq", "dk", "dv"), res, refs[masked], strict=False):
                    assert_within(got, ref, 2e-2, f"{name} masked={masked} {what}")
                facts["padded_104"][name + (" + document mask" if masked else "")] = "ran, equals math"
    if os.environ.get("SCIDFM_GPU_FACTS"):
        with open(os.path.join(os.environ["SCIDFM_GPU_FACTS"], "sdpa_kernels.json"), "w") as f:
            json.dump(facts, f, indent=1)


@pytest.mark.gpu
def test_grouped_mm_equals_loop_on_gpu():
    """bf16 on CUDA (where this torch's _grouped_mm runs: 8.0+ and the probe): torch._grouped_mm over 8
    experts equals the per-expert loop,
    forward and backward, within bf16 rounding."""
    from scidfm_megatron.model.torch_backend import _grouped_mm_supported, grouped_linear

    dev = torch.device("cuda")
    if not _grouped_mm_supported(dev, torch.bfloat16):
        pytest.skip("torch._grouped_mm does not run (or differ from the loop) on this device with this torch")
    g = torch.Generator(device="cuda").manual_seed(0)
    # group sizes as routing gives them (padded to 16 rows inside), and already aligned (no padding)
    for counts in ([300, 0, 129, 64, 1000, 7, 256, 44], [320, 0, 128, 64, 1008, 16, 256, 48]):
        x = torch.randn(sum(counts), 512, device=dev, dtype=torch.bfloat16, generator=g)
        ws = [torch.randn(1024, 512, device=dev, dtype=torch.bfloat16, generator=g) / 20 for _ in counts]
        res = []
        for grouped in (True, False):
            xx = x.clone().requires_grad_()
            ww = [w.clone().requires_grad_() for w in ws]
            out = grouped_linear(xx, ww, counts, grouped=grouped)
            out.float().square().mean().backward()
            res.append((out.float(), xx.grad.float(), [w.grad.float() for w in ww]))
        torch.testing.assert_close(res[0][0], res[1][0], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(res[0][1], res[1][1], rtol=2e-2, atol=2e-2)
        for a, b in zip(res[0][2], res[1][2], strict=False):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_gpu_slice_benchmark_refuses_cpu_and_its_code_runs(rank, capsys):
    """tools/bench_train.py --gpu-slice (scidfm_megatron/bench/gpu_slice.py): one line and exit 2 without CUDA;
    its --dry-run (the same code at a toy width on CPU) trains the local and torch backends and times attention
    fused vs unfused."""
    from scidfm_megatron.bench.train import run

    if not torch.cuda.is_available():
        assert run(["--gpu-slice"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "no CUDA device" in err
    r = run(["--gpu-slice", "--dry-run", "--seq-length", "32", "--iters", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    assert [row["backend"] for row in r["backends"]][:2] == ["local", "torch"]
    assert all("error" not in row and row["tokens_per_s"] > 0 for row in r["backends"]), [
        row.get("error") for row in r["backends"]]
    assert r["backends"][1]["implementations"]["attention"] == "PaddedSDPAttention"
    assert len(r["attention"]) == 2 and all("ms" in a for a in r["attention"]), r["attention"]
    assert "torch / local:" in out and "attention alone" in out


@pytest.fixture
def stub_machine(monkeypatch):
    """Stub what resolve_backend and the experts' choice look at: TransformerEngine's import, CUDA, the
    device's compute capability and the one-time _grouped_mm probe (recorded, answering True)."""
    import megatron_patches
    from scidfm_megatron.model import builder, torch_backend

    probes = []

    def machine(te: bool, cuda: bool = True, capability=(9, 0)):
        monkeypatch.setattr(megatron_patches, "transformer_engine_import_error",
                            lambda: None if te else ModuleNotFoundError("No module named 'transformer_engine'"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch_backend, "_grouped_mm_probe", lambda dev, dt: probes.append((dev, dt)) or True)
        builder.resolve_backend.cache_clear()
        torch_backend._grouped_mm_supported.cache_clear()
        return probes

    yield machine
    builder.resolve_backend.cache_clear()
    torch_backend._grouped_mm_supported.cache_clear()


FUSED = ("padded-sdpa", "te-fused")


def test_auto_never_picks_an_unfused_attention_where_a_fused_one_exists(stub_machine, monkeypatch):
    """model.backend auto, TE and the device stubbed, SciDFM's head_dim 100, pretraining and SFT: with TE,
    TE's linears, norms and grouped experts with the padded SDPA as core attention (te-sdpa; SFT keeps it:
    no fallback to local); without TE on CUDA the torch backend, whose experts take torch._grouped_mm on
    sm80 as on sm90 where the probe says it equals the loop, and the loop below sm80. Explicit te keeps TE's
    attention (unfused at 100: the memory plan counts its s x s transient, the fused choices none) and is
    refused for SFT. The te-sdpa layer spec is TE's with PaddedSDPAttention as core attention."""
    from scidfm_megatron.config import ConfigError
    from scidfm_megatron.model.accounting import memory_plan
    from scidfm_megatron.model.builder import chosen_pieces, layer_spec, sft_backend_error

    cfg = get_preset("scidfm-18b")
    assert cfg.head_dim == 100
    plan = dict(seq_len=8192, micro_batch=1, tp=2, pp=2, ep=8, etp=1, world_size=128)

    stub_machine(te=True)
    auto = chosen_pieces(cfg)
    assert auto == dict(backend="te-sdpa", attention="padded-sdpa", experts="TEGroupedMLP",
                        linear="TransformerEngine", norm="TENorm"), auto
    assert sft_backend_error(cfg) is None  # SFT: the same pieces, the document mask goes to SDPA
    explicit = chosen_pieces(cfg, backend="te")
    assert explicit["attention"] == "te-unfused"
    assert "te" in sft_backend_error(dataclasses.replace(cfg, backend="te"))
    assert chosen_pieces(get_preset("scidfm-18b", head_dim=128), backend="te")["attention"] == "te-fused"
    assert memory_plan(cfg, backend="te", **plan).attention_transient == 1 * 16 * 8192 * 8192 * 6
    assert memory_plan(cfg, backend="local", **plan).attention_transient == 1 * 16 * 8192 * 8192 * 6
    assert memory_plan(cfg, backend="te-sdpa", **plan).attention_transient == 0
    assert memory_plan(cfg, backend="torch", **plan).attention_transient == 0

    from megatron.core.models.gpt import gpt_layer_specs

    # TE is not installed here: its spec's structure is the local one's; what te-sdpa changes is checked
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda num_experts, moe_grouped_gemm: gpt_layer_specs.get_gpt_layer_local_spec(
                            num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm"))
    core = layer_spec(cfg).submodules.self_attention.submodules.core_attention
    assert core.__name__ == "PaddedSDPAttention"
    assert layer_spec(cfg, backend="te").submodules.self_attention.submodules.core_attention.__name__ != (
        "PaddedSDPAttention")

    for cap, grouped in (((9, 0), True), ((8, 0), True), ((7, 5), False)):
        probes = stub_machine(te=False, capability=cap)
        probes.clear()
        pieces = chosen_pieces(cfg)
        assert pieces["backend"] == "torch" and pieces["attention"] in FUSED
        assert pieces["experts"] == ("GroupedExperts (torch._grouped_mm)" if grouped
                                     else "GroupedExperts (per-expert loop)"), (cap, pieces)
        assert len(probes) == (1 if grouped else 0)  # below sm80 the probe is not even run
    with pytest.raises(ConfigError, match="te-sdpa"):
        get_preset("scidfm-debug", backend="flash")


def test_grouped_mm_probe_requires_equality_with_the_loop(monkeypatch):
    """The one-time probe behind the experts' choice: a _grouped_mm that computes the loop's result (an
    exact emulation, with autograd) passes; one that is off, or raises, sends the experts to the loop."""
    from scidfm_megatron.model import torch_backend

    def emulated(x, w, offs):  # rows offs[i-1]:offs[i] times w[i] ([E, in, out])
        ends = offs.tolist()
        starts = [0] + ends[:-1]
        return torch.cat([x[a:b] @ w[i] for i, (a, b) in enumerate(zip(starts, ends, strict=False))])

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "_grouped_mm", emulated, raising=False)
    assert torch_backend._grouped_mm_probe(cpu, torch.float32) is True
    monkeypatch.setattr(torch, "_grouped_mm", lambda x, w, offs: 1.05 * emulated(x, w, offs), raising=False)
    assert torch_backend._grouped_mm_probe(cpu, torch.float32) is False

    def unsupported(*a, **k):
        raise RuntimeError("grouped gemm is not supported on this device")

    monkeypatch.setattr(torch, "_grouped_mm", unsupported, raising=False)
    assert torch_backend._grouped_mm_probe(cpu, torch.float32) is False
