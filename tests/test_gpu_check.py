"""The GPU acceptance check (scripts/gpu_check.sh, scidfm_megatron/testing/gpu_check.py) in its CPU dry run:
the same driver, the same checks and assertions as on the GPU machine, tiny sizes, gloo, bf16 where the check
says bf16. docs/gpu.md says what each check asserts on the GPU."""

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


def test_install_flag_is_refused_where_it_cannot_apply(tmp_path):
    """--install (the dry run after the wheel install: the CPU stand-in, docs/gpu.md) goes with --dry-run and
    needs gpu_wheels/manifest.txt; otherwise one line and exit 2, before anything runs."""
    sh = str(ROOT / "scripts" / "gpu_check.sh")
    env = cpu_env({"PYTHON": sys.executable, "GPU_WHEELS": str(tmp_path / "none")})
    for args, says in ((["--install"], "--install goes with --dry-run"),
                       (["--dry-run", "--install"], f"--install: no {tmp_path / 'none'}/manifest.txt")):
        r = subprocess.run(["bash", sh, *args, "--out", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True,
                           text=True, timeout=60, env=env)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "r.json").exists()


def test_losses_parser_skips_a_line_cut_by_sigkill(tmp_path):
    from scidfm_megatron.testing.runs import train_losses

    m = tmp_path / "m.jsonl"
    m.write_text('{"iteration": 1, "phase": "train", "loss": 10.5}\n{"iteration": 2, "phase": "valid", "loss": 9}\n'
                 '{"iteration": 2, "phase": "train", "loss": 9.5}\n{"iteration": 3, "pha')
    assert train_losses(m, tolerant=True) == {1: 10.5, 2: 9.5}


def test_dynamo_off_on_cpu_only_and_commit_from_the_wheels(tmp_path, monkeypatch):
    """TorchDynamo is disabled for the dry run's children only (on the GPU megatron's jit_fuser compiles, as
    in a user's run); without .git (the GPU machine) the results name the commit gpu_wheels.sh wrote."""
    from scidfm_megatron.testing import gpu_check, processes

    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    monkeypatch.setattr(processes, "CPU_ONLY", False)
    assert "TORCHDYNAMO_DISABLE" not in processes.child_env()
    monkeypatch.setattr(processes, "CPU_ONLY", True)
    assert processes.child_env()["TORCHDYNAMO_DISABLE"] == "1"
    assert gpu_check._commit()["commit_source"] == "git"

    (tmp_path / "COMMIT").write_text("0123abcd+dirty\n")
    monkeypatch.setenv("GPU_WHEELS", str(tmp_path))

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(gpu_check.subprocess, "run", no_git)
    assert gpu_check._commit() == dict(commit="0123abcd+dirty", commit_source=str(tmp_path / "COMMIT"))


def test_torchrun_log_streams_while_it_runs(tmp_path, monkeypatch):
    """With SCIDFM_TORCHRUN_LOG_DIR (the GPU check sets it) a launch's output is in its log file as it runs:
    a benchmark stopped at its timeout still leaves what its ranks printed, and no rank is left running."""
    import subprocess as sp

    import pytest

    from scidfm_megatron.testing.distributed import run_torchrun

    script = tmp_path / "slow.py"
    marker = tmp_path / "pid"
    script.write_text("import os, time\nprint('rank started', flush=True)\n"
                      f"open({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)\n")
    logs = tmp_path / "logs"
    monkeypatch.setenv("SCIDFM_TORCHRUN_LOG_DIR", str(logs))
    with pytest.raises(sp.TimeoutExpired):
        run_torchrun(script, 1, [], timeout=15)
    (log,) = logs.glob("torchrun_slow_*.log")
    assert "rank started" in log.read_text()
    import psutil

    pid = int(marker.read_text())

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_deterministic_run_names_a_nondeterministic_op(monkeypatch):
    """train.deterministic: an op without a deterministic implementation is named once, even under an
    'ignore' filter (the launchers set PYTHONWARNINGS=ignore); the run goes on (warn, not raise)."""
    import warnings

    import torch

    from scidfm_megatron.training.determinism import enable_deterministic, nondeterministic_ops

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("ignore")
            enable_deterministic()
            t = torch.zeros(4)
            for _ in range(3):
                t.put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))
    finally:
        torch.use_deterministic_algorithms(before)
    text = "\n".join(str(w.message) for w in seen)
    assert nondeterministic_ops(text) == ["put_"] and len(seen) == 1, text


def test_setup_states_ranges_and_constraints_pin_them():
    """setup.py: ranges a GPU image satisfies as it is (Python 3.12, its torch 2.11 build: pip then leaves
    torch alone), exact only for megatron-core (megatron_patches refuse any other release); every
    requirement pinned in constraints.txt, which scripts/setup_env.sh passes to pip."""
    import re

    import setuptools
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    seen = {}
    orig = setuptools.setup
    setuptools.setup = lambda **kw: seen.update(kw)
    try:
        code = (ROOT / "setup.py").read_text().replace('open("README.md"', f'open({str(ROOT / "README.md")!r}')
        exec(compile(code, "setup.py", "exec"), {"__name__": "__main__"})
    finally:
        setuptools.setup = orig
    assert SpecifierSet(seen["python_requires"]).contains("3.12.1") and SpecifierSet(
        seen["python_requires"]).contains("3.11.7")
    reqs = [Requirement(r) for r in seen["install_requires"] + [r for v in seen["extras_require"].values() for r in v]]
    exact = {r.name for r in reqs if any(s.operator == "==" for s in r.specifier)}
    assert exact == {"megatron-core"}, exact
    torch_req = next(r for r in reqs if r.name == "torch")
    for v in ("2.11.0+cu130", "2.13.0", "2.6.0"):
        assert torch_req.specifier.contains(v), (torch_req, v)
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            assert [s.operator for s in r.specifier] == ["=="], line
            pins[r.name.lower()] = str(r.specifier)[2:]
    for r in reqs:  # each range admits the pinned version
        assert r.name.lower() in pins and r.specifier.contains(pins[r.name.lower()]), (r, pins.get(r.name.lower()))
    assert re.search(r'CONSTRAINTS=\$\{CONSTRAINTS-constraints.txt\}', (ROOT / "scripts" / "setup_env.sh").read_text())
