"""GPU check (tests/test_gpu.py): the TransformerEngine spec builds, trains a step under NCCL, and
computes the same loss as megatron's local spec from the same global weights.

Run directly on a GPU machine:  torchrun --nproc-per-node 1 tests/workers/gpu_te_worker.py --out r.pt
"""

import argparse

import torch

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--preset", default="scidfm-debug")


def main():
    args = p.parse_args()
    import torch.distributed as dist

    from scidfm_megatron.config import ParallelConfig
    from scidfm_megatron.model.builder import build_model, have_te, to_transformer_config
    from scidfm_megatron.model.presets import get_preset
    from scidfm_megatron.model.state_dict import gather_global_state_dict, load_global_state_dict
    from scidfm_megatron.parallel import init_distributed

    assert torch.cuda.is_available() and have_te(), "needs CUDA and transformer_engine"
    cfg = get_preset(args.preset, moe_capacity_factor=None)
    par = ParallelConfig()
    init_distributed(cfg, par)
    result = {"backend": dist.get_backend()}
    # fp32 on both sides, TF32 off, so the comparison measures the spec, not the precision.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    te_model = build_model(cfg, par, precision="fp32", backend="te")
    te_sdpa = build_model(cfg, par, precision="fp32", backend="te-sdpa")  # auto's choice with TE
    result["te_sdpa_core_attention"] = sorted({type(m.core_attention).__name__ for m in te_sdpa.modules()
                                               if hasattr(m, "core_attention")})
    local = build_model(cfg, par, precision="fp32", backend="local",
                        config=to_transformer_config(cfg, par, precision="fp32", moe_grouped_gemm=False,
                                                     gradient_accumulation_fusion=False,
                                                     masked_softmax_fusion=False, apply_rope_fusion=False))
    result["te_modules"] = sorted({type(m).__name__ for m in te_model.modules() if type(m).__module__.startswith(
        "megatron.core.extensions.transformer_engine")})
    weights = gather_global_state_dict(local)
    load_global_state_dict(te_model, weights)
    load_global_state_dict(te_sdpa, weights)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=g).cuda()
    pos = torch.arange(32, device="cuda").expand(2, 32)
    losses = {}
    for name, m in (("te", te_model), ("te-sdpa", te_sdpa), ("local", local)):
        out = m(tokens[:, :-1], pos, None, labels=tokens[:, 1:])
        loss = out.float().mean()
        loss.backward()
        losses[name] = float(loss)
        result[f"{name}_grad_finite"] = all(torch.isfinite(p.grad if p.grad is not None else p.main_grad).all().item()
                                            for p in m.parameters() if p.grad is not None)
    result["losses"] = losses
    torch.save(result, args.out)
    print(result, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
