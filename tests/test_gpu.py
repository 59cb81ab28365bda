"""GPU-only (skipped without CUDA): the TransformerEngine spec model, under NCCL.

Results from the last GPU run are recorded in docs/gpu.md.
"""

import pytest
import torch

from conftest import WORKERS
from scidfm_megatron.testing.distributed import run_torchrun


@pytest.mark.gpu
@pytest.mark.integration
def test_te_spec_model_matches_local_spec(tmp_path):
    pytest.importorskip("transformer_engine")
    out = tmp_path / "te.pt"
    run_torchrun(WORKERS / "gpu_te_worker.py", 1, ["--out", out], timeout=900)
    r = torch.load(out)
    assert r["backend"] == "nccl"
    assert "TEGroupedMLP" in r["te_modules"] and "TELayerNormColumnParallelLinear" in r["te_modules"]
    assert r["te_grad_finite"] and r["local_grad_finite"]
    assert abs(r["losses"]["te"] - r["losses"]["local"]) <= 1e-3 * abs(r["losses"]["local"]), r["losses"]
    # auto's choice with TE: TE's linears and experts, the padded SDPA as core attention, the same loss
    assert r["te_sdpa_core_attention"] == ["PaddedSDPAttention"] and r["te-sdpa_grad_finite"]
    assert abs(r["losses"]["te-sdpa"] - r["losses"]["local"]) <= 1e-3 * abs(r["losses"]["local"]), r["losses"]
