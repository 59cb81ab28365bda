"""The GPU check's two child processes (scidfm_megatron/testing/gpu_check.py runs them with ``-m``):

  probe-env       what this interpreter has: torch / CUDA device / bf16 / megatron-core / transformers /
                  TransformerEngine, whether the library imports and megatron_patches applies under this
                  torch, what ``model.backend: auto`` builds for scidfm-18b here
  compare-logits  a megatron checkpoint and its Hugging Face conversion on the same token batch, on the
                  device, fp32, TF32 off, through ``scidfm_megatron.convert.verify`` (each side's trace and
                  its per-layer comparison): max |logit difference| and the greedy next tokens
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: examples/sample_corpus


def probe_env(out: str) -> int:
    import importlib.metadata as md
    import platform

    r: dict = {"python": platform.python_version(), "executable": sys.executable}

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    try:
        import torch

        r["torch"] = torch.__version__
        r.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            r.update(device_name=torch.cuda.get_device_name(), device_count=torch.cuda.device_count(),
                     capability=".".join(map(str, torch.cuda.get_device_capability())),
                     bf16_supported=bool(torch.cuda.is_bf16_supported()),
                     memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    except Exception as exc:  # noqa: BLE001
        r["torch_error"] = f"{type(exc).__name__}: {exc}"
    for dist in ("transformers", "sentencepiece", "safetensors", "tensorboard", "numpy", "triton", "psutil", "PyYAML",
                 "zstandard", "pytest"):
        r[dist.lower()] = version(dist)
    try:
        import megatron_patches

        r["megatron_core"] = megatron_patches.megatron_core_version()
        err = megatron_patches.transformer_engine_import_error()
        r["transformer_engine"] = version("transformer_engine") or version("transformer-engine")
        r["transformer_engine_import"] = "ok" if err is None else f"{type(err).__name__}: {err}"
        # The whole training / inference / conversion import path under this torch (no torch pin asserted).
        import scidfm_megatron.convert.mcore_to_hf
        import scidfm_megatron.inference
        import scidfm_megatron.training.trainer
        from scidfm_megatron.model.builder import resolve_backend

        r["library"] = str(Path(scidfm_megatron.inference.__file__).parent)
        r["patches_applied"] = megatron_patches.apply()
        r["model_backend_auto"] = resolve_backend("auto")
        import torch

        from scidfm_megatron.model.builder import attention_kernel, chosen_pieces
        from scidfm_megatron.model.presets import get_preset

        big = get_preset("scidfm-18b")  # what auto builds for it here, and the SDPA kernel its attention takes
        r["auto_pieces_scidfm_18b"] = chosen_pieces(big)
        bf16 = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        r["attention_kernel_scidfm_18b"] = {
            "pretrain": attention_kernel(big, backend="torch", dtype=bf16),
            "sft": attention_kernel(big, backend="torch", dtype=bf16, masked=True)}
    except Exception as exc:  # noqa: BLE001
        r["import_error"] = f"{type(exc).__name__}: {exc}"
        r["import_traceback"] = traceback.format_exc()[-2000:]
    Path(out).write_text(json.dumps(r, indent=1, default=str))
    print(json.dumps(r, indent=1, default=str))
    return 0


def compare_logits(a) -> int:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    from scidfm_megatron.convert import verify
    from scidfm_megatron.tokenizer import ScienceTokenizer, wrap_molecule

    tok = ScienceTokenizer(a.tokenizer)
    paper = json.loads(open(ROOT / "examples" / "sample_corpus" / "papers.jsonl").readline())["text"]
    ids = tok.encode(wrap_molecule("CC(=O)Oc1ccccc1C(=O)O") + " " + paper[:400], bos=True)[:64]
    batch = torch.tensor([ids, ids[::-1]])
    r: dict = {"device": a.device, "tf32": False, "tokens": list(batch.shape)}
    ref = verify.megatron_trace(Path(a.mcore), batch, "fp32", a.device)  # megatron first, freed before HF loads
    got = verify.hf_trace(Path(a.hf), batch, torch.float32, a.device)
    r.update(megatron_class=ref.model_class, megatron_param_device=ref.device, hf_class=got.model_class,
             hf_param_device=got.device)
    want, have = ref.logits, got.logits
    if have.shape != want.shape:
        raise SystemExit(f"shapes differ: transformers {tuple(have.shape)}, megatron {tuple(want.shape)}")
    rows, first = verify.compare(ref, got, "fp32")  # per layer: hidden states and router choices
    diff = (have - want).abs().max().item()
    top2 = want.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    agree = have.argmax(-1) == want.argmax(-1)
    r.update(max_abs_diff=diff, max_abs_logit=want.abs().max().item(),
             logits_spread=(want[:, 1:] - want[:, :-1]).abs().max().item(),
             greedy_agree_fraction=agree.float().mean().item(), greedy_agree_last=bool(agree[:, -1].all()),
             decisive_disagreements=int((~agree & (margin > 2 * diff)).sum()), layers=rows,
             verify_first_disagreement=first)
    Path(a.out).write_text(json.dumps(r, indent=1))
    print(json.dumps(r, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("probe-env").add_argument("--out", required=True)
    cmp = sub.add_parser("compare-logits")
    for k in ("--mcore", "--hf", "--tokenizer", "--device", "--out"):
        cmp.add_argument(k, required=True)
    a = ap.parse_args(argv)
    return probe_env(a.out) if a.command == "probe-env" else compare_logits(a)


if __name__ == "__main__":
    sys.exit(main())
