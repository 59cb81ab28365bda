"""The GPU acceptance check (scripts/gpu_check.sh, tools/gpu_check.py) in its CPU dry run: the same driver,
the same checks and assertions as on the GPU machine, tiny sizes, gloo, bf16 where the check says bf16.
docs/gpu.md says what each check asserts on the GPU."""

import json
import math
import subprocess
import sys

from conftest import ROOT
from scidfm_megatron.testing.distributed import cpu_env

CHECKS = ["environment", "gpu_tests", "sample_data", "train_resume", "stage2", "sft", "convert", "kernels", "bench"]


def test_dry_run_passes_every_check(runs, tmp_path):
    """--runs: the sample data the session already made with the same script (scripts/prepare_sample_data.sh)."""
    out = tmp_path / "r.json"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--work", str(tmp_path / "work"), "--runs", str(runs)], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200, env=cpu_env({"PYTHON": sys.executable}))
    assert out.exists(), (r.stdout + r.stderr)[-4000:]
    res = json.loads(out.read_text())
    checks = {c["name"]: c for c in res["checks"]}
    failed = {n: (c["error"] or "")[-1500:] for n, c in checks.items() if not c["ok"]}
    assert r.returncode == 0 and not failed, (failed, (r.stdout + r.stderr)[-3000:])
    assert list(checks) == CHECKS and res["ok"] is True and res["mode"] == "dry-run"
    assert checks["sample_data"]["figures"]["reused"] and checks["sample_data"]["figures"]["runs"] == str(runs)

    env = checks["environment"]["figures"]
    assert env["megatron_core"] == "0.16.1" and env["cuda_available"] is False and "import_error" not in env

    gpu = checks["gpu_tests"]["figures"]  # no CUDA in the dry run: the GPU tests are collected and skipped
    assert gpu["all_skipped"] and gpu["counts"]["skipped"] >= 1 and "needs CUDA" in " ".join(gpu["skip_reasons"])

    s1 = checks["train_resume"]["figures"]
    assert s1["precision"] == "bf16" and s1["killed_mid_run"] and s1["equal_before_kill"]
    assert s1["resumed_from_iteration"] == s1["save_interval"] and len(s1["compared_iterations"]) >= 3
    assert s1["bitwise_equal_after_resume"] and s1["max_abs_diff_after_resume"] == 0.0

    s2 = checks["stage2"]["figures"]
    l16, l32 = s2["losses_bf16"], s2["losses_fp32"]
    assert list(l16) == list(l32) == ["1", "2", "3", "4"]
    assert s2["max_abs_diff_bf16_vs_fp32"] <= 0.05 and s2["max_abs_dev_from_stage1"] <= 0.5
    # Not re-randomised: every stage-2 loss is far below ln(vocab), the loss of a random model.
    assert all(v < s2["ln_vocab"] - 0.8 for v in l16.values()), l16

    sft = checks["sft"]["figures"]
    assert all(math.isfinite(v) for v in sft["losses_bf16"].values()) and sft["max_abs_diff_bf16_vs_fp32"] <= 0.05

    conv = checks["convert"]["figures"]
    assert conv["hf_class"] == "MixtralForCausalLM" and conv["device"] == "cpu"
    assert conv["max_abs_diff"] <= 1e-4 and conv["decisive_disagreements"] == 0 and conv["greedy_agree_last"]

    kern = checks["kernels"]["figures"]["slice"]  # the slice benchmark's code path, at a toy width on CPU
    assert {b["backend"] for b in kern["backends"]} >= {"local", "torch"} and kern["attention"] and kern["kernels"]
    bench = checks["bench"]["figures"]
    assert bench["table"] and any(line.startswith("dp ") for line in bench["table"].splitlines())


def test_losses_parser_skips_a_line_cut_by_sigkill(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "tools"))
    m = tmp_path / "m.jsonl"
    m.write_text('{"iteration": 1, "phase": "train", "loss": 10.5}\n{"iteration": 2, "phase": "valid", "loss": 9}\n'
                 '{"iteration": 2, "phase": "train", "loss": 9.5}\n{"iteration": 3, "pha')
    assert gpu_check.losses(m) == {1: 10.5, 2: 9.5}
