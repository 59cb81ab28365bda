"""The bf16 tier on CPU (issue 10): the precision real runs use, through the real trainer and CLI.

With bf16, megatron-core's optimizer keeps fp32 master copies of the weights, made when it is built. A
weights-only load (stage 2 and SFT through ``checkpoint.init_from``, every Hugging Face import) must copy
the loaded weights into them, or the first step writes the random initialisation back. Each test
continues from trained weights at a near-zero LR for several steps: the loss must stay at the trained
level. The negative control runs stage 2 with ``reload_model_params`` disabled (a ``sitecustomize`` in
the workers' PYTHONPATH) and sees the loss jump back to that of a random model. SFT from a bf16
checkpoint is the ``sft`` check of scripts/gpu_check.sh, whose CPU dry run is in the suite
(tests/test_gpu_check.py); it fails without the reload too. Stage 2 with the plain optimizer at EP2 is
test_hf_import_keeps_its_weights_in_bf16 (the stage-2 recipe from the imported stage 1; the same
weights-only load and reload into the chained dense + expert optimizers) and, at EP1, the ``stage2`` check
of the dry run.

Tolerances: at LR 1e-7 the weights do not move (updates are below bf16's resolution), so the loss only
varies with the batch (up to 0.3 between the tiny runs' batches of 8 x 64 tokens). The fault sends it
back to the random model's level, stage 1's first loss (~10.4 = ln vocab), from ~8.2 for the trained
weights: every step must stay clearly below that level.
"""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, overrides, train
from scidfm_megatron.testing.distributed import cpu_env
from scidfm_megatron.testing.runs import console_script

BF16 = {"train.precision": "bf16"}
NEAR_ZERO = {"train.lr": "1.0e-7", "train.min_lr": "1.0e-8", "train.warmup_iters": 0}
LEARNED = 1.5  # stage 1 lowers the loss by 2.0-2.5 from the random model's 10.4 (observed, all batches)


def train_losses(work: Path) -> list[float]:
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    return [r["loss"] for r in rows if r.get("phase") == "train"]


@pytest.fixture(scope="module")
def stage1(runs, tmp_path_factory):
    """scidfm-tiny stage 1 in bf16, EP2 (chained dense + expert optimizers) on 2 processes."""
    work = tmp_path_factory.mktemp("bf16_stage1")
    r = train(2, overrides(runs, work, **BF16, **{"train.train_iters": 10, "train.lr": 3e-3}) + ["parallel.ep=2"])
    assert "(bf16, backend local): attention kernel unfused" in r.stdout  # the run says what it runs
    losses = train_losses(work)
    assert losses[-1] < losses[0] - LEARNED, losses
    return work


@pytest.fixture(scope="module")
def no_reload(tmp_path_factory):
    """A PYTHONPATH entry whose sitecustomize turns megatron's master-weight reload into a no-op."""
    d = tmp_path_factory.mktemp("no_reload")
    (d / "sitecustomize.py").write_text(
        "from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer\n"
        "MixedPrecisionOptimizer.reload_model_params = lambda self, state_dict=None: None\n")
    return d


def near_zero_run(runs, work, init_from, recipe="tiny_stage2.yaml", stage="pretrain", env=None, iters=4, **extra):
    args = overrides(runs, work, **BF16, **NEAR_ZERO, **{"train.train_iters": iters, "checkpoint.init_from": init_from},
                     **extra) + ["parallel.ep=2"]
    if env is None:
        r = train(2, args, recipe=recipe, stage=stage)
    else:
        from conftest import cmd

        r = subprocess.run(cmd(2, recipe, args, stage), cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=cpu_env(env))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "initialised weights from" in r.stdout
    # printed only after the masters were checked equal to the loaded weights (not with the reload disabled)
    assert ("master weights reloaded from them, checked equal" in r.stdout) == (env is None), r.stdout[-2000:]
    return train_losses(work)


def assert_kept(losses: list[float], trained_level: float, what: str):
    assert len(losses) >= 3
    assert max(losses) < trained_level, f"{what}: a step ran on untrained weights: {losses} (must be < {trained_level})"


@pytest.mark.parametrize("optimizer", ["distributed"])  # plain: test_hf_import_keeps_its_weights_in_bf16
def test_stage2_keeps_stage1_weights_in_bf16(runs, stage1, tmp_path, optimizer):
    first = train_losses(stage1)[0]
    extra = {"train.use_distributed_optimizer": "true"} if optimizer == "distributed" else {}
    losses = near_zero_run(runs, tmp_path / "s2", stage1 / "ckpt", **extra)
    assert_kept(losses, first - LEARNED, f"stage 2 ({optimizer} optimizer)")


def test_without_the_master_reload_stage2_reverts_to_random_weights(runs, stage1, tmp_path, no_reload):
    """The negative control: the same stage 2 with megatron's reload_model_params disabled."""
    import os

    first = train_losses(stage1)[0]
    losses = near_zero_run(runs, tmp_path / "s2", stage1 / "ckpt", iters=3,
                           env={"PYTHONPATH": f"{no_reload}{os.pathsep}{ROOT}"})
    assert losses[0] < first - LEARNED  # the load itself worked: step 1 runs on the loaded weights...
    assert max(losses[1:]) > losses[0] + 1.0, losses  # ...then the first update wrote the random init back


def test_hf_import_keeps_its_weights_in_bf16(runs, stage1, tmp_path):
    """Stage 1 -> Hugging Face folder -> megatron EP2 checkpoint -> bf16 stage 2 (plain optimizer) at LR ~0."""
    cli = console_script("scidfm-convert")
    for args in (["--direction", "mcore-to-hf", "--load", stage1 / "ckpt", "--save", tmp_path / "hf"],
                 ["--direction", "hf-to-mcore", "--load", tmp_path / "hf", "--save", tmp_path / "mc", "--ep", "2"]):
        r = subprocess.run([*cli, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=cpu_env(),
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    first = train_losses(stage1)[0]
    losses = near_zero_run(runs, tmp_path / "ft", tmp_path / "mc")
    assert_kept(losses, first - LEARNED, "stage 2 (plain optimizer) from the HF import")
