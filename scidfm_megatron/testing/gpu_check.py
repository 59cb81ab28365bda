"""The GPU acceptance check: one command, one results file, well under 8 minutes on one H100/H200.

    bash scripts/gpu_check.sh                 # on the GPU machine (installs gpu_wheels/, then runs this)
    bash scripts/gpu_check.sh --dry-run       # anywhere: the same logic on the CPU (gloo), tiny sizes

Checks, in order (each runs even when an earlier one failed, unless it needs an earlier one's artifact):

  environment   torch / CUDA device / bf16 support / megatron-core / transformers / TransformerEngine; the
                library imports and megatron_patches applies under this torch
  gpu_tests     ``pytest tests -m gpu``: pass / skip counts (skipped without TE, and in the dry run)
  sample_data   scripts/prepare_sample_data.sh: tokenizer + datasets of the bundled sample corpus (--runs DIR:
                reuse a folder it made earlier, e.g. the test suite's)
  train_resume  tiny stage 1 in bf16 through ``-m scidfm_megatron.train``: a run SIGKILLed (whole process
                tree) after its first complete checkpoint, resumed; its losses after the resume must be
                bitwise equal to an uninterrupted reference run's
  stage2        tiny stage 2 in bf16 from stage 1 (checkpoint.init_from, weights only) at near-zero LR, and
                the same run in fp32: per-iteration losses agree (bf16 master weights reloaded), and every
                loss stays at stage 1's level (not back at ln(vocab), the random-init loss)
  sft           tiny SFT in bf16 (and fp32) from stage 2 at near-zero LR: finite, twin-equal, level losses
  convert       stage 1 -> Hugging Face (fp32, scidfm-convert); transformers' logits vs megatron's
                (MegatronLM) on the device, TF32 off, through convert.verify: max |diff| <= 1e-3, greedy next
                tokens agree
  kernels       tools/bench_train.py --gpu-slice: the scidfm-18b slice per backend (MFU, tokens/s, peak
                memory), attention at seq 8192 padded-fused vs unfused, kernel timings (dry run: toy width)
  bench         tools/bench_train.py (GPU: the scidfm-18b 2-layer slice, bf16): its table, stored

Results: one JSON file (``--out``): per check its name, ok, seconds, figures and error text; written after
every check, so a run cut short still leaves what it finished; at the end every subprocess's log goes
beside it as ``<name>_logs.tar.gz``. Exit status 0 only when every check passed.
The tolerances and why: docs/gpu.md.

This driver imports only the standard library (and testing/processes.py, testing/runs.py, which load no
third-party module): a library that fails to import under the GPU machine's torch is reported as a failed check,
not a crash. Its subprocesses get the environment of ``scidfm_megatron.testing.distributed.cpu_env``
(OMP_NUM_THREADS=1, TORCHDYNAMO_DISABLE=1 in the dry run only, the repository on PYTHONPATH, no inherited
MASTER_*/RANK variables); its two child subcommands are in testing/gpu_probe.py. ``tools/gpu_check.py``
launches this module (as ``python -m scidfm_megatron.testing.gpu_check`` does).

Over 500 lines on purpose: the nine checks, read top to bottom in the order they run, with their
assertions; the process plumbing is testing/processes.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from . import processes
from .processes import CheckFailed, Proc, child_env, kill_all, run, run_pair
from .runs import train_losses

ROOT = Path(__file__).resolve().parents[2]  # the repository: examples/, scripts/, tests/, tools/
RECIPES = ROOT / "examples" / "recipes"

# Sizes. Training is the tiny preset at world size 1 (EP1) in both modes; only the iteration counts and
# the benchmark differ. GPU: more stage-1 steps after the checkpoint, so the SIGKILL lands mid-run.
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": dict(budget=450.0, s1_iters=12, s1_save=4, s2_iters=4, sft_iters=3, sft_gbs=8,
                bench=["--gpu-slice", "--seq-length", "4096", "--global-batch", "8", "--micro-batch", "1",
                       "--iters", "6", "--warmup", "2"],
                kernels=["--gpu-slice", "--iters", "6", "--warmup", "2"]),
    "dry-run": dict(budget=600.0, s1_iters=8, s1_save=4, s2_iters=4, sft_iters=3, sft_gbs=4,
                    bench=["--seq-length", "64", "--global-batch", "8", "--micro-batch", "2", "--iters", "3",
                           "--warmup", "1"],
                    kernels=["--gpu-slice", "--dry-run", "--iters", "2", "--warmup", "1"]),
}
# Per-check caps (seconds); every subprocess also stops at the global deadline.
CAPS = dict(environment=90, gpu_tests=150, sample_data=120, train_resume=240, stage2=150, sft=150, convert=180,
            kernels=300, bench=240)

NEED_DATA = {"train_resume", "stage2", "sft", "convert", "bench"}  # checks that need sample_data

# Tolerances (docs/gpu.md explains each).
TWIN_TOL = 0.05        # |bf16 loss - fp32 loss| on the same batch, same loaded weights
LEVEL_TOL = 0.5        # |stage-2 loss - stage-1 final loss|: batch-to-batch spread of the data (~0.3 measured)
MIN_GAP = 1.0          # ln(vocab) - stage-1 final loss must be at least this for the level check to mean anything
SFT_LEVEL_TOL = 0.5    # |SFT loss - first SFT loss|: batch spread of the packed conversations (~0.3 measured)
SFT_MIN_GAP = 0.25     # ln(vocab) - first SFT loss: SFT starts from trained weights, not random ones (gap ~0)
LOGITS_TOL = 1e-3      # transformers vs megatron, fp32, TF32 off


def train_cmd(py: str, recipe: str, overrides: list, deterministic: bool = False) -> list:
    """torchrun (1 process, --standalone: no port to pick) of the trainer's command line entry point."""
    return [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "scidfm_megatron.train",
            "--config", str(RECIPES / recipe), *overrides, *(["train.deterministic=true"] if deterministic else [])]


def need(path: Optional[Path], what: str) -> Path:
    if path is None or not Path(path).exists():
        raise CheckFailed(f"not run: needs {what}, which an earlier check did not produce")
    return Path(path)


def fmt_losses(d: dict) -> dict:
    return {str(k): v for k, v in sorted(d.items())}


# --------------------------------------------------------------------------------------------- the checks
class Checker:
    def __init__(self, args):
        self.args = args
        self.mode = "dry-run" if args.dry_run else "gpu"
        if args.dry_run:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
        self.prof = PROFILES[self.mode]
        self.py = args.python or sys.executable
        if os.sep in self.py:  # e.g. gpu_check.sh's default .venv/bin/python: some children run elsewhere
            self.py = os.path.abspath(self.py)
        self.budget = processes.Budget(args.budget or self.prof["budget"])
        self.work = Path(args.work or tempfile.mkdtemp(prefix="scidfm_gpu_check_")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        processes.configure(cpu_only=args.dry_run, log_dir=self.work / "logs")
        # --runs: a sample-data folder made earlier by scripts/prepare_sample_data.sh (the test suite's, whose
        # session already made one); otherwise the sample_data check makes it in the work dir.
        self.runs = Path(args.runs).resolve() if args.runs else self.work / "runs"
        self.art: dict = {}
        self.t0 = time.time()
        self.results = dict(tool="scidfm_megatron.testing.gpu_check", mode=self.mode,
                            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), work_dir=str(self.work),
                            budget_s=self.budget.left(), **_commit(),
                            torchdynamo_disabled=os.environ.get("TORCHDYNAMO_DISABLE") == "1" or args.dry_run,
                            ok=None, wall_s=None, checks=[])
        self.out = Path(args.out)

    def write(self, archive: bool = False):
        self.results["wall_s"] = round(time.time() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if archive:  # every subprocess's full log, beside the results (a GPU session gets only $OUT back)
            import tarfile

            logs = self.out.with_name(self.out.stem + "_logs.tar.gz")
            with tarfile.open(logs, "w:gz") as tar:
                for f in sorted((self.work / "logs").glob("*.log")):
                    tar.add(f, arcname=f.name)
            self.results["logs"] = str(logs)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        os.replace(tmp, self.out)

    def check(self, name: str, fn: Callable[[dict], None]):
        figures: dict = {}
        t = time.monotonic()
        ok, error = True, None
        try:
            fn(figures)
        except CheckFailed as exc:
            ok, error = False, str(exc)
        except Exception:  # noqa: BLE001 - a bug in a check must not stop the others
            ok, error = False, traceback.format_exc()[-4000:]
        finally:
            kill_all()
        entry = dict(name=name, ok=ok, seconds=round(time.monotonic() - t, 1), figures=figures, error=error)
        self.results["checks"].append(entry)
        self.write()
        print(f"[gpu_check] {name}: {'ok' if ok else 'FAILED'} in {entry['seconds']} s"
              + ("" if ok else f"\n{(error or '')[-1500:]}"), flush=True)

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    def script(self, name: str, module: str) -> list:
        """The project's console script ``name`` beside the children's interpreter (its venv's bin/), else
        the one on PATH (gpu_check.sh's fallback install puts its scripts there), else ``python -m module``
        (the project not installed: gpu_check.sh's installed-megatron-core branch runs it from the repo)."""
        beside = Path(self.py).parent / name
        found = str(beside) if beside.exists() else shutil.which(name)
        return [found] if found else [self.py, "-m", module]

    # a. environment -----------------------------------------------------------------------------------
    def environment(self, fig: dict):
        wheel = os.environ.get("GPU_CHECK_PROJECT_WHEEL")
        env = None
        if wheel:  # pip-installed by gpu_check.sh: import that copy, from outside the repository
            env = child_env()
            env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep)
                                                if p and Path(p).resolve() != ROOT)
        pr = Proc([self.py, "-m", "scidfm_megatron.testing.gpu_probe", "probe-env", "--out", self.work / "env.json"],
                  self.log("environment"), env=env, cwd=self.work)
        pr.wait(self.budget.timeout(CAPS["environment"]))
        env_file = self.work / "env.json"
        if env_file.exists():
            fig.update(json.loads(env_file.read_text()))
        fig["installed"] = os.environ.get("GPU_CHECK_INSTALLED", "").split() or None
        fig["install"] = ("pip: " + wheel) if wheel else ("wheels --target (fallback)" if fig["installed"] else "none")
        if wheel:
            fig["torch_before_install"] = os.environ.get("GPU_CHECK_TORCH_BEFORE")
            fig["pip_report"] = os.environ.get("GPU_CHECK_PIP_REPORT")
        problems = []
        if os.environ.get("GPU_CHECK_INSTALL_ERROR"):
            fig["install_error"] = os.environ["GPU_CHECK_INSTALL_ERROR"]
            problems.append(f"the project's pip install failed: {fig['install_error']}")
        if wheel:
            lib = fig.get("library") or ""
            if not lib or Path(lib).resolve().is_relative_to(ROOT):
                problems.append(f"the environment probe imported {lib or 'nothing'}, not the pip-installed project")
            if fig.get("torch") != fig["torch_before_install"]:
                problems.append(f"torch is {fig.get('torch')} after the install, {fig['torch_before_install']} before")
        if pr.p.returncode != 0 or not env_file.exists():
            problems.append(f"the probe failed:\n{pr.tail()}")
        if fig.get("import_error"):
            problems.append(f"the library does not import: {fig['import_error']}")
        if fig.get("megatron_core") != "0.16.1":
            problems.append(f"megatron-core is {fig.get('megatron_core')}, not 0.16.1")
        if self.mode == "gpu":
            if not fig.get("cuda_available"):
                problems.append("CUDA is not available")
            elif not fig.get("bf16_supported"):
                problems.append(f"{fig.get('device_name')} does not support bf16")
        elif fig.get("cuda_available"):
            problems.append("dry run, but CUDA is visible (gpu_check.sh --dry-run hides it)")
        if problems:
            raise CheckFailed("; ".join(problems))

    # b. the GPU-marked tests --------------------------------------------------------------------------
    def gpu_tests(self, fig: dict):
        # The dry run collects only the file with GPU tests (collecting the whole suite costs ~10 s of CI);
        # on the GPU every GPU-marked test anywhere runs.
        where = str(ROOT / "tests" / "test_gpu.py") if self.mode == "dry-run" else "tests"
        facts = self.work / "gpu_facts"  # what the GPU tests record (which SDPA kernels take head_dim 100...)
        facts.mkdir(parents=True, exist_ok=True)
        pr = run([self.py, "-m", "pytest", where, "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"],
                 self.log("gpu_tests"), self.budget, CAPS["gpu_tests"], check=False,
                 env=child_env({"SCIDFM_GPU_FACTS": str(facts)}))
        for f in sorted(facts.glob("*.json")):
            fig.setdefault("recorded", {})[f.stem] = json.loads(f.read_text())
        out = pr.output()
        counts = {}
        for line in out.splitlines()[::-1]:
            found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line)
            if found:
                counts = {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in found}
                break
        fig.update(returncode=pr.p.returncode, counts=counts,
                   skip_reasons=sorted({m.strip() for m in re.findall(r"^SKIPPED \[\d+\] (.*)$", out, re.M)}))
        selected = sum(counts.get(k, 0) for k in ("passed", "failed", "skipped", "error", "xfailed", "xpassed"))
        fig["all_skipped"] = selected > 0 and counts.get("skipped", 0) == selected
        if pr.p.returncode != 0 or counts.get("failed") or counts.get("error") or selected == 0:
            raise CheckFailed(f"pytest -m gpu exited {pr.p.returncode} ({counts or 'no summary'}):\n{pr.tail()}")

    # sample data ---------------------------------------------------------------------------------------
    def sample_data(self, fig: dict):
        if self.args.runs:
            missing = [p for p in ("tokenizer/tokenizer.model", "tokenizer/science_tokens.json", "data")
                       if not (self.runs / p).exists()]
            if missing:
                raise CheckFailed(f"--runs {self.runs}: not a scripts/prepare_sample_data.sh output (missing "
                                  f"{', '.join(missing)}); drop --runs to prepare the sample data here")
            fig["reused"] = True
        else:
            run(["bash", str(ROOT / "scripts" / "prepare_sample_data.sh")], self.log("sample_data"), self.budget,
                CAPS["sample_data"], env=child_env({"RUNS": str(self.runs), "PY": self.py}))
        tok = self.runs / "tokenizer" / "science_tokens.json"
        self.art["vocab"] = json.loads(tok.read_text())["vocab_size"]
        fig.update(runs=str(self.runs), vocab_size=self.art["vocab"])
        self.art["runs"] = self.runs

    def _common(self, work: Path, **extra) -> list:
        runs = need(self.art.get("runs"), "the sample data")
        base = {"data.tokenizer_model": runs / "tokenizer" / "tokenizer.model", "data.data_root": runs / "data",
                "train.seq_length": 64, "model.max_seq_length": 64, "train.global_batch_size": 8,
                "train.micro_batch_size": 2, "train.eval_interval": "null", "parallel.ep": 1,
                "checkpoint.save": work / "ckpt", "logging.metrics_file": work / "metrics.jsonl",
                "logging.tensorboard_dir": "null", "logging.log_interval": 1}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]

    # c1. stage 1: SIGKILL + resume == uninterrupted --------------------------------------------------------
    def train_resume(self, fig: dict):
        total, every = self.prof["s1_iters"], self.prof["s1_save"]
        ref, run_ = self.work / "s1_ref", self.work / "s1_killed"
        common = {"train.train_iters": total, "checkpoint.save_interval": every, "train.warmup_iters": 1,
                  "train.precision": "bf16"}
        ref_cmd = train_cmd(self.py, "tiny_stage1.yaml", self._common(ref, **common), deterministic=True)
        args = self._common(run_, **common)
        run_cmd = train_cmd(self.py, "tiny_stage1.yaml", args, deterministic=True)
        fig.update(iterations=total, save_interval=every, precision="bf16",
                   deterministic_algorithms=True, world_size=1)
        t = self.budget.timeout(CAPS["train_resume"])
        end = time.monotonic() + t
        ref_p = Proc(ref_cmd, self.log("s1_ref"))
        kill_p = Proc(run_cmd, self.log("s1_killed"))
        first = run_ / "ckpt" / f"iter_{every:07d}" / "scidfm_meta.json"
        while not first.exists() and kill_p.poll() is None:
            if time.monotonic() > end:
                raise CheckFailed(f"timed out waiting for {first}\n{kill_p.tail()}")
            time.sleep(0.02)
        if not first.exists():
            raise CheckFailed(f"the run ended (exit {kill_p.poll()}) before its first checkpoint\n{kill_p.tail()}")
        finished_first = kill_p.poll() is not None
        kill_p.kill()  # SIGKILL to the tree: no handler runs anywhere, not a clean exit
        kill_p._fh.close()
        done = sorted(int(p.name[5:]) for p in (run_ / "ckpt").glob("iter_???????")
                      if (p / "scidfm_meta.json").exists())
        fig["killed_mid_run"] = not finished_first and total not in done
        if not fig["killed_mid_run"]:
            # The run outran the kill: resume explicitly from the earliest checkpoint it kept instead.
            args = args + [f"checkpoint.resume_from={run_ / 'ckpt' / f'iter_{done[0]:07d}'}"]
        before = train_losses(run_ / "metrics.jsonl", tolerant=True)
        # The resumed run starts now, beside the reference's remaining steps (its own directory; on the CPU
        # each is one process on one core, so the pair takes the time of one).
        pr = Proc(train_cmd(self.py, "tiny_stage1.yaml", args, deterministic=True), self.log("s1_resumed"))
        rc = ref_p.wait(end - time.monotonic())
        if rc != 0:
            pr.kill()
            raise CheckFailed(f"the reference run exited {rc}\n{ref_p.tail()}")
        self.art["s1_ckpt"] = ref / "ckpt"
        want = train_losses(ref / "metrics.jsonl", tolerant=True)
        fig["reference_losses"] = fmt_losses(want)
        fig["stage1_final_loss"] = want.get(total)
        rc = pr.wait(end - time.monotonic())
        if rc != 0:
            raise CheckFailed(f"the resumed run exited {rc}\n{pr.tail()}")
        m = re.search(r"resumed from \S+: iteration (\d+)", pr.output())
        if not m:
            raise CheckFailed(f"the second run did not resume from a checkpoint\n{pr.tail()}")
        at = int(m.group(1))
        got = train_losses(run_ / "metrics.jsonl", tolerant=True)
        fig["resumed_from_iteration"] = at
        # Before the kill the two runs did the same thing: equal there shows this device is deterministic,
        # so a difference after the resume is the resume's.
        pre = [i for i in range(1, at + 1) if i in before]
        fig["equal_before_kill"] = bool(pre) and all(before[i] == want.get(i) for i in pre)
        after = list(range(at + 1, total + 1))
        fig["compared_iterations"] = after
        fig["resumed_losses"] = {str(i): got.get(i) for i in after}
        missing = [i for i in after if i not in got or i not in want]
        if missing or not after:
            raise CheckFailed(f"no loss logged for iterations {missing or 'after the resume'}")
        logs = "".join(p.read_text(errors="replace") for p in (self.log("s1_ref"), self.log("s1_killed"),
                                                                   self.log("s1_resumed")) if p.exists())
        fig["nondeterministic_ops"] = sorted(set(re.findall(r"(\S+) does not have a deterministic implementation",
                                                            logs)))
        diffs = [abs(got[i] - want[i]) for i in after]
        fig["max_abs_diff_after_resume"] = max(diffs)
        fig["bitwise_equal_after_resume"] = all(got[i] == want[i] for i in after)
        if not fig["bitwise_equal_after_resume"]:
            why = ("" if fig["equal_before_kill"] else
                   " (the two runs already differed BEFORE the kill: this device/configuration is not "
                   "deterministic, so the resume cannot be judged bitwise)")
            if fig["nondeterministic_ops"]:
                why += f"; ops without a deterministic implementation: {', '.join(fig['nondeterministic_ops'])}"
            raise CheckFailed(f"losses after the resume differ from the uninterrupted run{why}: "
                              f"{ {i: (got[i], want[i]) for i in after} }")

    # c2. stage 2 from stage 1, near-zero LR ------------------------------------------------------------
    def stage2(self, fig: dict):
        s1 = need(self.art.get("s1_ckpt"), "the stage-1 checkpoint")
        iters = self.prof["s2_iters"]
        low = {"train.train_iters": iters, "train.lr": "1.0e-7", "train.min_lr": "1.0e-8", "train.warmup_iters": 0,
               "checkpoint.init_from": s1}
        works = {p: self.work / f"s2_{p}" for p in ("bf16", "fp32")}
        procs = run_pair([train_cmd(self.py, "tiny_stage2.yaml", self._common(w, **low, **{"train.precision": p}))
                          for p, w in works.items()], [self.log(f"s2_{p}") for p in works], self.budget,
                         CAPS["stage2"])
        if not all("initialised weights from" in pr.output() for pr in procs):
            raise CheckFailed("stage 2 did not initialise from stage 1:\n" + procs[0].tail())
        self.art["s2_ckpt"] = works["bf16"] / "ckpt"
        l16, l32 = (train_losses(w / "metrics.jsonl", tolerant=True) for w in works.values())
        s1_losses = train_losses(self.work / "s1_ref" / "metrics.jsonl", tolerant=True)
        final = s1_losses[max(s1_losses)] if s1_losses else None
        ln_v = math.log(self.art["vocab"])
        fig.update(iterations=iters, lr=1e-7, stage1_final_loss=final, ln_vocab=ln_v, losses_bf16=fmt_losses(l16),
                   losses_fp32=fmt_losses(l32), twin_tolerance=TWIN_TOL, level_tolerance=LEVEL_TOL)
        problems = []
        if sorted(l16) != list(range(1, iters + 1)) or sorted(l32) != sorted(l16):
            raise CheckFailed(f"expected losses for iterations 1..{iters}: bf16 {sorted(l16)}, fp32 {sorted(l32)}")
        if not all(math.isfinite(v) for v in [*l16.values(), *l32.values()]):
            problems.append("a loss is not finite")
        twin = max(abs(l16[i] - l32[i]) for i in l16)
        fig["max_abs_diff_bf16_vs_fp32"] = twin
        if twin > TWIN_TOL:
            problems.append(f"bf16 and fp32 stage 2 disagree by {twin:.4f} > {TWIN_TOL} on the same batches "
                            f"(bf16 {fmt_losses(l16)} vs fp32 {fmt_losses(l32)})")
        if final is None:
            problems.append("no stage-1 final loss")
        else:
            level = max(abs(v - final) for v in l16.values())
            fig["max_abs_dev_from_stage1"] = level
            fig["stage1_gap_to_random"] = ln_v - final
            if ln_v - final < MIN_GAP:
                problems.append(f"stage 1 ended at {final:.3f}, within {MIN_GAP} of ln(vocab) = {ln_v:.3f}: "
                                f"too close to random for the level check")
            if level > LEVEL_TOL:
                problems.append(f"a bf16 stage-2 loss is {level:.3f} away from stage 1's final {final:.3f} "
                                f"(> {LEVEL_TOL}; ln(vocab) = {ln_v:.3f}): {fmt_losses(l16)}")
        if problems:
            raise CheckFailed("; ".join(problems))

    # c3. SFT from stage 2 ----------------------------------------------------------------------------------
    def sft(self, fig: dict):
        s2 = need(self.art.get("s2_ckpt"), "the stage-2 checkpoint")
        iters = self.prof["sft_iters"]
        works = {p: self.work / f"sft_{p}" for p in ("bf16", "fp32")}
        # The packed SFT sequences are 256 tokens (prepare_sample_data.sh: --sft-seq-length 256).
        extra = {"data.sft_prefix": self.runs / "data" / "sft", "train.seq_length": 256,
                 "model.max_seq_length": 256, "train.global_batch_size": self.prof["sft_gbs"],
                 "train.train_iters": iters, "train.lr": "1.0e-7", "train.min_lr": "1.0e-8",
                 "train.warmup_iters": 0, "checkpoint.init_from": s2}
        procs = run_pair([train_cmd(self.py, "tiny_sft.yaml", self._common(w, **extra, **{"train.precision": p}))
                          for p, w in works.items()], [self.log(f"sft_{p}") for p in works], self.budget,
                         CAPS["sft"])
        if not all("initialised weights from" in pr.output() for pr in procs):
            raise CheckFailed("SFT did not initialise from stage 2:\n" + procs[0].tail())
        l16, l32 = (train_losses(w / "metrics.jsonl", tolerant=True) for w in works.values())
        fig.update(iterations=iters, seq_length=256, global_batch=self.prof["sft_gbs"], lr=1e-7,
                   losses_bf16=fmt_losses(l16), losses_fp32=fmt_losses(l32), twin_tolerance=TWIN_TOL,
                   level_tolerance=SFT_LEVEL_TOL)
        if sorted(l16) != list(range(1, iters + 1)) or sorted(l32) != sorted(l16):
            raise CheckFailed(f"expected losses for iterations 1..{iters}: bf16 {sorted(l16)}, fp32 {sorted(l32)}")
        problems = []
        if not all(math.isfinite(v) for v in [*l16.values(), *l32.values()]):
            problems.append("a loss is not finite")
        twin = max(abs(l16[i] - l32[i]) for i in l16)
        level = max(abs(v - l16[1]) for v in l16.values())
        ln_v = math.log(self.art["vocab"])
        fig.update(max_abs_diff_bf16_vs_fp32=twin, max_abs_dev_from_first=level, ln_vocab=ln_v,
                   first_loss_gap_to_random=ln_v - l16[1])
        if ln_v - l16[1] < SFT_MIN_GAP:
            problems.append(f"the first SFT loss {l16[1]:.3f} is within {SFT_MIN_GAP} of ln(vocab) = {ln_v:.3f}: "
                            f"the stage-2 weights it starts from look random")
        if twin > TWIN_TOL:
            problems.append(f"bf16 and fp32 SFT disagree by {twin:.4f} > {TWIN_TOL}: {fmt_losses(l16)} vs "
                            f"{fmt_losses(l32)}")
        if level > SFT_LEVEL_TOL:
            problems.append(f"an SFT loss moved {level:.3f} > {SFT_LEVEL_TOL} from the first at LR 1e-7: "
                            f"{fmt_losses(l16)}")
        if problems:
            raise CheckFailed("; ".join(problems))

    # d. megatron -> Hugging Face, logits on the device ---------------------------------------------------
    def convert(self, fig: dict):
        s1 = need(self.art.get("s1_ckpt"), "the stage-1 checkpoint")
        hf = self.work / "hf_stage1"
        t = time.monotonic()
        run([*self.script("scidfm-convert", "scidfm_megatron.cli.convert"), "--direction", "mcore-to-hf", "--load", s1,
             "--save", hf, "--dtype", "fp32", "--force"], self.log("convert"), self.budget, CAPS["convert"])
        fig["convert_s"] = round(time.monotonic() - t, 1)
        device = "cpu" if self.mode == "dry-run" else "cuda"
        res = self.work / "logits.json"
        pr = run([self.py, "-m", "scidfm_megatron.testing.gpu_probe", "compare-logits", "--mcore", s1, "--hf", hf,
                  "--tokenizer", self.runs / "tokenizer" / "tokenizer.model", "--device", device, "--out", res],
                 self.log("logits"), self.budget, CAPS["convert"], check=False)
        if res.exists():
            fig.update(json.loads(res.read_text()))
        if pr.p.returncode != 0 or not res.exists():
            raise CheckFailed(f"the logits comparison failed (exit {pr.p.returncode}):\n{pr.tail()}")
        problems = []
        if not fig["max_abs_diff"] <= LOGITS_TOL:
            problems.append(f"max |logits diff| {fig['max_abs_diff']:.3g} > {LOGITS_TOL}")
        if fig["decisive_disagreements"]:
            problems.append(f"greedy next tokens differ at {fig['decisive_disagreements']} positions whose top-2 "
                            f"margin exceeds twice the logits difference")
        if fig["logits_spread"] <= 0.1:
            problems.append("the logits do not depend on the input (spread <= 0.1)")
        if problems:
            raise CheckFailed("; ".join(problems))

    # e. throughput ----------------------------------------------------------------------------------------
    def bench(self, fig: dict):
        runs = need(self.art.get("runs"), "the sample data")
        cmd = [self.py, str(ROOT / "tools" / "bench_train.py"), "--layouts", "dp", "--nproc", "1", "--runs", runs,
               *self.prof["bench"]]
        pr = run(cmd, self.log("bench"), self.budget, CAPS["bench"], check=False)
        out = pr.output()
        lines = out.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("layout")), None)
        table = lines[max(start - 1, 0):] if start is not None else []
        fig.update(command=" ".join(map(str, cmd[1:])), returncode=pr.p.returncode,
                   table="\n".join(line for line in table if line.strip()) or None)
        if pr.p.returncode != 0 or start is None:
            raise CheckFailed(f"bench_train exited {pr.p.returncode}{'' if start is not None else ', no table'}:"
                              f"\n{pr.tail()}")

    # f. the scidfm-18b slice per backend (local, torch, te if present), attention at seq 8192 and the
    #    kernel measurements (issue 13; docs/kernels.md). Dry run: the same code on CPU at a toy width.
    def kernels(self, fig: dict):
        out_json = self.work / "slice.json"
        cmd = [self.py, str(ROOT / "tools" / "bench_train.py"), *self.prof["kernels"], "--json", str(out_json)]
        pr = run(cmd, self.log("kernels"), self.budget, CAPS["kernels"], check=False)
        fig.update(command=" ".join(map(str, cmd[1:])), returncode=pr.p.returncode)
        if pr.p.returncode != 0 or not out_json.exists():
            raise CheckFailed(f"bench_train --gpu-slice exited {pr.p.returncode}:\n{pr.tail()}")
        fig["slice"] = json.loads(out_json.read_text())

    def run_all(self) -> bool:
        print(f"[gpu_check] {self.mode}: work dir {self.work}, results {self.out}, budget "
              f"{self.budget.left():.0f} s", flush=True)
        self.write()
        for name, fn in (("environment", self.environment), ("gpu_tests", self.gpu_tests),
                         ("sample_data", self.sample_data), ("train_resume", self.train_resume),
                         ("stage2", self.stage2), ("sft", self.sft), ("convert", self.convert),
                         ("kernels", self.kernels), ("bench", self.bench)):
            only = self.args.only.split(",") if self.args.only else None
            if only and name not in only and not (name == "sample_data" and set(only) & NEED_DATA):
                continue
            self.check(name, fn)
        ok = all(c["ok"] for c in self.results["checks"])
        self.results["ok"] = ok
        self.write(archive=True)
        failed = [c["name"] for c in self.results["checks"] if not c["ok"]]
        print(f"[gpu_check] {'all checks passed' if ok else 'FAILED: ' + ', '.join(failed)} "
              f"in {self.results['wall_s']} s -> {self.out}", flush=True)
        return ok


def _commit() -> dict:
    """The commit checked: git's here; on the GPU machine (no .git) the one scripts/gpu_wheels.sh wrote into
    the carried wheels folder (gpu_wheels/COMMIT: the hash, "+dirty" when the tree had changes)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return dict(commit=r.stdout.strip() + ("+dirty" if dirty else ""), commit_source="git")
    except (OSError, subprocess.SubprocessError):
        pass
    f = ROOT / os.environ.get("GPU_WHEELS", "gpu_wheels") / "COMMIT"
    if f.exists():
        return dict(commit=f.read_text().split()[0], commit_source=str(f))
    return dict(commit=None, commit_source="none: no .git and no gpu_wheels/COMMIT")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU (gloo), tiny sizes: the logic, anywhere")
    default_out = (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs") / "gpu_check.json"
    ap.add_argument("--out", default=str(default_out), help="results JSON (default $OUT/gpu_check.json, "
                                                             "else runs/gpu_check.json)")
    ap.add_argument("--work", default=None, help="work directory (checkpoints, logs); default: a new temp dir")
    ap.add_argument("--budget", type=float, default=None, help="global time budget in seconds "
                                                               "(default 450 on the GPU, 600 in the dry run)")
    ap.add_argument("--python", default=None, help="interpreter for the subprocesses (default: this one)")
    ap.add_argument("--runs", default=None,
                    help="reuse this sample-data folder (RUNS of scripts/prepare_sample_data.sh: "
                         "tokenizer/, data/) instead of preparing one in the work dir")
    ap.add_argument("--only", default=None, help="comma-separated check names (sample_data runs when one needs it)")
    args = ap.parse_args(argv)
    checker = Checker(args)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        return 0 if checker.run_all() else 1
    except KeyboardInterrupt as exc:
        kill_all()
        checker.results["ok"] = False
        checker.results["interrupted"] = str(exc) or "interrupted"
        checker.write(archive=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
