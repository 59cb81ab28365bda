"""The scidfm-18b slice on one device (``tools/bench_train.py --gpu-slice`` / ``--kernels-only``): training
steps per backend present (tokens/s, MFU, peak memory beside the memory plan), causal attention alone
padded-fused vs unfused, and the RMSNorm / SwiGLU / cross-entropy kernels. ``--dry-run``: the same code on
CPU at a toy width. docs/kernels.md has the figures and what each row decides.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

SLICE = dict(num_layers=2)  # scidfm-18b at full width: d 3200, 32 x 100 heads, 8 experts x 8640, vocab 32196
DRY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4, head_dim=20,
           moe_ffn_hidden_size=96, vocab_size=500)  # --dry-run: the same code on CPU, at a toy width


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak():
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def slice_backends() -> list[str]:
    """Backends present here: local and torch always; te and te-sdpa (auto's choice with TE) when
    TransformerEngine imports and CUDA is there."""
    from scidfm_megatron.config import ConfigError
    from scidfm_megatron.model.builder import resolve_backend

    out = ["local", "torch"]
    try:
        resolve_backend("te")
        out += ["te", "te-sdpa"]
    except ConfigError:
        pass
    return out


def bench_slice_backend(cfg, backend: str, args) -> dict:
    """One backend: the slice's model + DDP + optimizer on this device, --iters real training steps
    (train_step: megatron's schedule and optimizer) on random tokens, after --warmup untimed ones."""
    import dataclasses
    import gc

    import torch

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.accounting import memory_plan, training_flops_per_token
    from scidfm_megatron.model.builder import build_model_chunks, describe_implementations
    from scidfm_megatron.training.engine import build_optimizer, wrap_ddp
    from scidfm_megatron.training.metrics import detect_peak_tflops
    from scidfm_megatron.training.step import train_step

    m = dataclasses.replace(cfg, backend=backend)
    seq, mb = args.seq_length, args.micro_batch
    recompute = None if args.recompute in ("null", "none") else args.recompute
    row = dict(backend=backend, seq=seq, micro_batch=mb, recompute=recompute)
    base = _peak_reset()
    chunks = optimizer = None
    try:
        chunks = build_model_chunks(m, ParallelConfig(), precision="bf16", recompute=recompute)
        row["implementations"] = describe_implementations(chunks)
        config = chunks[0].config
        chunks = wrap_ddp(chunks, config)
        optimizer = build_optimizer(chunks, config, lr=1e-5)
        dev = next(chunks[0].parameters()).device
        g = torch.Generator().manual_seed(0)

        def batch():
            t = torch.randint(0, m.vocab_size, (mb, seq + 1), generator=g)
            return [dict(tokens=t[:, :-1].contiguous().to(dev), labels=t[:, 1:].contiguous().to(dev),
                         loss_mask=torch.ones(mb, seq, device=dev),
                         position_ids=torch.arange(seq, device=dev).expand(mb, seq).contiguous())]

        for _ in range(args.warmup):
            train_step(chunks, optimizer, batch(), seq_length=seq, micro_batch_size=mb)
        _sync()
        times = []
        for _ in range(args.iters):
            b = batch()
            _sync()
            t0 = time.perf_counter()
            loss = train_step(chunks, optimizer, b, seq_length=seq, micro_batch_size=mb).loss
            _sync()
            times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        tps = mb * seq / step
        peak_tflops = args.peak_tflops or detect_peak_tflops()
        flops = training_flops_per_token(m, seq)
        plan = memory_plan(m, world_size=1, seq_len=seq, micro_batch=mb, recompute=recompute, backend=backend,
                           precision="bf16", distributed_optimizer=False)
        row.update(step_s=step, tokens_per_s=tps, tflops=flops * tps / 1e12, loss=loss,
                   mfu=(flops * tps / (peak_tflops * 1e12)) if peak_tflops else None,
                   peak_gib=(_peak() - base) / 2**30 if torch.cuda.is_available() else None,
                   plan_gib=(plan.total - plan.reserve) / 2**30)
    except Exception as exc:  # noqa: BLE001  one backend failing (out of memory, a kernel refused) must not hide the others
        row.update(error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
    finally:
        del chunks, optimizer
        from megatron.core import parallel_state as ps

        # the unfused attention's [b * heads, s, s] scratch buffer lives in megatron's global buffer: free it
        ps.destroy_global_memory_buffer()
        ps._set_global_memory_buffer()
        gc.collect()
        _peak_reset()
    return row


def bench_attention(args, heads: int, head_dim: int, seq: int) -> list[dict]:
    """Causal attention, forward + backward, bf16, [1, heads, seq, head_dim]: the torch backend's padded
    SDPA as SDPA picks (the kernel it took named), then on GPU restricted to each fused kernel (flash, cuDNN,
    memory-efficient: a refusal is a row's error, not a fallback), against the unfused path (SDPA's math
    kernel: the scores of every head materialised, as megatron's local DotProductAttention does). Median
    time of --iters runs and the peak memory above the inputs."""
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scidfm_megatron.model.torch_backend import sdpa_kernel_of, sdpa_padded

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    variants: list[tuple[str, list | None]] = [("padded, SDPA's choice", None)]
    if dev == "cuda":
        variants += [("padded flash", [SDPBackend.FLASH_ATTENTION]), ("padded cuDNN", [SDPBackend.CUDNN_ATTENTION]),
                     ("padded efficient", [SDPBackend.EFFICIENT_ATTENTION])]
    variants.append(("unfused (math)", [SDPBackend.MATH]))
    rows = []
    for name, kernels in variants:
        times, peak, taken = [], 0, None
        try:
            for i in range(args.warmup + args.iters):
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
                base = _peak_reset()
                _sync()
                t0 = time.perf_counter()

                def fwd_bwd():
                    # called only within this iteration, before the del below frees the inputs
                    out = sdpa_padded(qq, kk, vv, is_causal=True)  # noqa: B023, F821
                    out.backward(torch.ones_like(out))

                with sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
                    if i == 0:
                        taken = sdpa_kernel_of(fwd_bwd)
                    else:
                        fwd_bwd()
                _sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
                    peak = max(peak, _peak() - base)
                del qq, kk, vv
            rows.append(dict(kernel=name, taken=taken, ms=1e3 * sorted(times)[len(times) // 2],
                             peak_gib=peak / 2**30 if dev == "cuda" else None))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            rows.append(dict(kernel=name, error=str(exc).splitlines()[0][:160]))
    return rows


def _time_fwd_bwd(fn, make_inputs, args) -> dict:
    """Median forward + backward time (ms) of ``fn`` over --iters runs after --warmup, and the peak memory
    above its inputs (GPU)."""
    import torch

    times, peak = [], 0
    for i in range(args.warmup + args.iters):
        inputs = make_inputs()
        base = _peak_reset()
        _sync()
        t0 = time.perf_counter()
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        _sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            peak = max(peak, _peak() - base)
        del inputs, out
    return dict(ms=1e3 * sorted(times)[len(times) // 2], peak_gib=peak / 2**30 if torch.cuda.is_available() else None)


def bench_kernels(args, cfg) -> list[dict]:
    """The elementwise kernels the issue asks to fuse where PyTorch or megatron-core offer it without TE,
    at the slice's shapes (bf16, tokens = seq x micro-batch): RMSNorm (torch.nn.functional.rms_norm, which
    every backend's RMSNorm calls, vs the composed formula), the experts' weighted SwiGLU (the torch
    backend's eager form vs megatron's weighted_bias_swiglu_impl, torch.compile'd) and the loss
    (megatron's vocab-parallel cross-entropy, its fused variant, torch.compile'd, and F.cross_entropy).
    Each row is the measurement that decides whether the fused variant is switched on (docs/kernels.md)."""
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from scidfm_megatron.model.torch_backend import experts_class

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bf = torch.bfloat16
    T, h, f, k, V = (args.seq_length * args.micro_batch, cfg.hidden_size, cfg.moe_ffn_hidden_size,
                     cfg.moe_router_topk, cfg.padded_vocab_size)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=bf, grad=True):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g).requires_grad_(grad)

    eps = cfg.rms_norm_eps
    w = torch.ones(h, device=dev, dtype=bf, requires_grad=True)
    act = experts_class()._act
    tp = ps.get_tensor_model_parallel_group()
    labels = torch.randint(0, V, (args.seq_length, args.micro_batch), device=dev, generator=g)
    cases: list[tuple[str, str, list[tuple[str, Any]], Any]] = [
        ("rmsnorm", f"[{T}, {h}]", [
            ("F.rms_norm (every backend)", lambda x: F.rms_norm(x, (h,), w, eps)),
            ("composed", lambda x: x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(bf) * w)],
         lambda: (rnd(T, h),)),
        ("swiglu x probs", f"[{T * k}, {2 * f}]", [
            ("eager (torch backend)", lambda y, p: act(y, p)),
            ("megatron weighted_bias_swiglu_impl", lambda y, p: weighted_bias_swiglu_impl(y, None, p.unsqueeze(-1)))],
         lambda: (rnd(T * k, 2 * f), rnd(T * k, dtype=torch.float32))),
        ("cross-entropy", f"[{T}, {V}]", [
            ("megatron vocab_parallel (every backend)", lambda z: vocab_parallel_cross_entropy(z.float(), labels)),
            ("megatron fused_vocab_parallel", lambda z: fused_vocab_parallel_cross_entropy(z, labels, tp)),
            ("F.cross_entropy", lambda z: F.cross_entropy(z.float().flatten(0, 1), labels.flatten(),
                                                           reduction="none").view_as(labels))],
         lambda: (rnd(args.seq_length, args.micro_batch, V),)),
    ]
    rows = []
    for kernel, shape, variants, make in cases:
        for name, fn in variants:
            row: dict[str, Any] = dict(kernel=kernel, shape=shape, variant=name)
            try:
                row.update(_time_fwd_bwd(fn, make, args))
            except Exception as exc:  # noqa: BLE001  e.g. torch.compile without a working Triton: reported, not fatal
                row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
            rows.append(row)
    print(f"\nkernels, forward + backward, bf16, {dev}")
    base: dict[str, float] = {}
    for r in rows:
        if "error" in r:
            print(f"  {r['kernel']:<15}{r['variant']:<42}{r['error']}")
            continue
        ref = base.setdefault(r["kernel"], r["ms"])
        mem = f"{r['peak_gib']:.3f} GiB" if r["peak_gib"] is not None else "n/a"
        print(f"  {r['kernel']:<15}{r['variant']:<42}{r['ms']:>9.3f} ms  ({r['ms'] / ref:.2f}x)  peak {mem}   "
              f"{r['shape']}")
    return rows


def bench_gpu_slice(args) -> dict:
    import torch

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.presets import get_preset
    from scidfm_megatron.parallel import init_distributed

    if args.dry_run:
        cfg = get_preset("scidfm-18b", max_seq_length=args.seq_length, **DRY)
    else:
        cfg = get_preset("scidfm-18b", max_seq_length=args.seq_length, **SLICE)
    init_distributed(cfg, ParallelConfig())
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run: figures mean nothing)"
    print(f"\nscidfm-18b {cfg.num_layers}-layer slice (d {cfg.hidden_size}, {cfg.num_attention_heads} x "
          f"{cfg.head_dim} heads, {cfg.num_experts} experts x {cfg.moe_ffn_hidden_size}), seq {args.seq_length}, "
          f"micro-batch {args.micro_batch}, bf16, recompute {args.recompute}, one device: {dev}; "
          f"median of {args.iters} steps after {args.warmup}", flush=True)
    rows = [bench_slice_backend(cfg, b, args) for b in slice_backends()]
    print(f"{'backend':<9}{'tokens/s':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'plan GiB':>10}"
          f"{'plan/peak':>11}   implementations")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<9}  {r['error']}")
            continue
        ratio = f"{r['plan_gib'] / r['peak_gib']:.2f}" if r.get("peak_gib") else "n/a"
        print(f"{r['backend']:<9}{r['tokens_per_s']:>11,.0f}{r['tflops']:>10.2f}"
              f"{(format(r['mfu'], '.1%') if r['mfu'] else 'n/a'):>8}"
              f"{(format(r['peak_gib'], '.2f') if r['peak_gib'] is not None else 'n/a'):>10}"
              f"{r['plan_gib']:>10.2f}{ratio:>11}   attention {r['implementations']['attention']}, "
              f"experts {r['implementations']['experts']}")
    ok = {r["backend"]: r for r in rows if "error" not in r}
    if "torch" in ok and "local" in ok:
        print(f"torch / local: {ok['torch']['tokens_per_s'] / ok['local']['tokens_per_s']:.2f}x tokens/s")
    att = bench_attention(args, cfg.num_attention_heads, cfg.head_dim, args.seq_length)
    print(f"\nattention alone, causal, forward + backward, 1 x {cfg.num_attention_heads} heads x {args.seq_length} "
          f"x {cfg.head_dim}, bf16")
    for r in att:
        if "error" in r:
            print(f"  {r['kernel']:<28}{r['error']}")
        else:
            mem = f"{r['peak_gib']:.3f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
            print(f"  {r['kernel']:<28}{r['ms']:>10.2f} ms   peak {mem}   (kernel taken: {r['taken']})")
    if "error" not in att[0] and "error" not in att[-1] and att[0].get("peak_gib") and att[-1].get("peak_gib"):
        print(f"  fused ({att[0]['taken']}) / unfused memory: {att[0]['peak_gib'] / att[-1]['peak_gib']:.3f} "
              f"(issue 13 target <= 0.25); time: {att[0]['ms'] / att[-1]['ms']:.3f}")
    kernels = bench_kernels(args, cfg)
    result = dict(device=dev, seq=args.seq_length, micro_batch=args.micro_batch, backends=rows, attention=att,
                  kernels=kernels)
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(args.json)
    return result
