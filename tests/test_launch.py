"""Launchers (examples/launch/): the recipe's layout is used unless overridden, the configuration is
checked before anything starts, and under SLURM the time-limit signal reaches the trainers.

The torchrun launchers run with PYTHON = a stub that runs the real interpreter for the ``--check`` call
and only records the ``torch.distributed.run`` command line. slurm.sbatch runs with stand-ins for
``srun`` (starts its command once per task with SLURM_PROCID/LOCALID/NTASKS/NODEID, forwards SIGTERM to
the tasks and records it) and ``scontrol`` (prints 127.0.0.1): real SLURM is not available here.
"""

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from conftest import RECIPES, ROOT, overrides
from scidfm_megatron.testing.distributed import cpu_env, free_port
from test_training import kill_tree, losses, wait_for

LAUNCH = ROOT / "examples" / "launch"


def stub_python(tmp_path: Path) -> tuple[Path, Path]:
    """PYTHON for the torchrun launchers: the real interpreter, except that ``-m torch.distributed.run``
    only writes its arguments (one per line) to the returned record file."""
    record = tmp_path / "torchrun_argv"
    stub = tmp_path / "python"
    stub.write_text(f"""#!/usr/bin/env bash
if [ "${{1:-}} ${{2:-}}" = "-m torch.distributed.run" ]; then
  shift 2; printf '%s\\n' "$@" > {shlex.quote(str(record))}; exit 0
fi
exec {shlex.quote(sys.executable)} "$@"
""")
    stub.chmod(0o755)
    return stub, record


LAUNCH_VARS = ("TP", "PP", "EP", "ETP", "VPP", "STAGE", "NPROC", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
               "SLURM_NTASKS_PER_NODE")


def launch_env(extra: dict) -> dict:
    """cpu_env without launcher variables the caller's shell may have exported (run_main.sh exports EP)."""
    env = {k: v for k, v in cpu_env().items() if k not in LAUNCH_VARS}
    env.update(extra)
    return env


def launch(tmp_path, script, env, args):
    stub, record = stub_python(tmp_path)
    r = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=launch_env({"PYTHON": str(stub), **env}))
    argv = record.read_text().splitlines() if record.exists() else None
    return r, argv


def data_args(runs, mixture=None):
    args = [f"data.tokenizer_model={runs / 'tokenizer' / 'tokenizer.model'}"]
    return args + ([f"data.mixture={mixture}"] if mixture else [])


def test_recipe_layout_is_used_unless_overridden(runs, tmp_path):
    recipe = str(RECIPES / "tiny_stage1.yaml")  # parallel: {tp: 1, pp: 1, ep: 2}
    r, argv = launch(tmp_path, "torchrun_single.sh", {"RECIPE": recipe, "NPROC": "2"}, data_args(runs))
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("on TP1 x PP1 x DP2 (experts: ETP1 x EP2 x EDP1) on 2 processes" in r.stdout
            and "configuration OK" in r.stdout)
    assert not [a for a in argv if a.startswith("parallel.")], argv  # nothing overrides the recipe
    i = argv.index("-m")
    assert argv[i + 1:i + 4] == ["scidfm_megatron.train", "--config", recipe], argv
    assert argv[argv.index("--nproc-per-node") + 1] == "2" and argv[argv.index("--nnodes") + 1] == "1"
    assert argv[argv.index("--max-restarts") + 1] == "3", argv  # automatic restart by default (issue 22)

    r, argv = launch(tmp_path, "torchrun_single.sh", {"RECIPE": recipe, "NPROC": "2", "EP": "1"}, data_args(runs))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on TP1 x PP1 x DP2 (experts: ETP1 x EP1 x EDP2) on 2 processes" in r.stdout
    assert [a for a in argv if a.startswith("parallel.")] == ["parallel.ep=1"], argv

    r, argv = launch(tmp_path, "torchrun_single.sh", {"RECIPE": recipe, "NPROC": "2", "MAX_RESTARTS": "0"},
                     data_args(runs))
    assert r.returncode == 0 and argv[argv.index("--max-restarts") + 1] == "0", r.stdout + r.stderr

    # STAGE adds --stage, which checks the recipe's stage (in the --check too: test_recipes.py)
    r, argv = launch(tmp_path, "torchrun_single.sh", {"RECIPE": recipe, "NPROC": "2", "STAGE": "pretrain"},
                     data_args(runs))
    assert r.returncode == 0, r.stdout + r.stderr
    i = argv.index("-m")
    assert argv[i + 1:i + 5] == ["scidfm_megatron.train", "--stage", "pretrain", "--config"], argv


def test_18b_recipe_runs_its_own_layout_on_16_nodes(runs, tmp_path):
    """The 18B recipe on 16 x 8 GPUs is TP2 x PP2 x EP8 (ETP1), not the TP1/PP1/EP1 the launcher used to impose."""
    recipe = str(RECIPES / "scidfm18b_stage1.yaml")
    env = {"RECIPE": recipe, "NNODES": "16", "NODE_RANK": "3", "MASTER_ADDR": "node0", "GPUS_PER_NODE": "8"}
    # the sample tokenizer stands in for the 18B run's (whose file is on the cluster): its vocabulary too
    import json

    vocab = json.loads((runs / "tokenizer" / "science_tokens.json").read_text())["vocab_size"]
    r, argv = launch(tmp_path, "torchrun_multinode.sh", env, data_args(runs) + [f"model.vocab_size={vocab}"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "scidfm-18b on TP2 x PP2 x DP32 (experts: ETP1 x EP8 x EDP8) on 128 processes" in r.stdout, r.stdout
    assert not [a for a in argv if a.startswith("parallel.")], argv
    assert [argv[argv.index(k) + 1] for k in ("--nnodes", "--node-rank", "--nproc-per-node", "--master-addr")] == \
        ["16", "3", "8", "node0"], argv


def test_bad_layout_fails_before_torchrun_with_exit_code_2(runs, tmp_path):
    env = {"RECIPE": str(RECIPES / "tiny_stage1.yaml"), "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "GPUS_PER_NODE": "2"}
    r, argv = launch(tmp_path, "torchrun_multinode.sh", env, data_args(runs) + ["parallel.tp=3"])
    assert r.returncode == 2 and "configuration error" in r.stderr and "tp" in r.stderr, r.stdout + r.stderr
    assert argv is None  # torchrun was never started
    r, argv = launch(tmp_path, "torchrun_multinode.sh", {**env, "TP": "3"}, data_args(runs))
    assert r.returncode == 2 and "configuration error" in r.stderr and argv is None, r.stdout + r.stderr


SRUN = r"""#!/usr/bin/env bash
# Stand-in for srun inside an allocation of one node: --ntasks-per-node N (other options, all --opt=value,
# are ignored), then N copies of the command with SLURM_PROCID/LOCALID/NTASKS/NODEID; SIGTERM is recorded
# in $SRUN_SIGNAL_LOG and forwarded to every task (as real srun does); exits with the tasks' worst status.
echo $$ > "$SRUN_PID_FILE"
n=1
while [ $# -gt 0 ]; do
  case "$1" in
    --ntasks-per-node) n=$2; shift 2 ;;
    --ntasks-per-node=*) n=${1#*=}; shift ;;
    -*) shift ;;
    *) break ;;
  esac
done
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$n SLURM_NODEID=0 SLURM_NTASKS_PER_NODE=$n "$@" &
  pids+=($!)
done
trap 'echo TERM >> "$SRUN_SIGNAL_LOG"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for p in "${pids[@]}"; do
  while kill -0 "$p" 2>/dev/null; do wait "$p"; done
  wait "$p"; s=$?; [ "$s" -gt "$rc" ] && rc=$s
done
exit $rc
"""


def test_slurm_time_limit_signal_reaches_the_trainers_through_srun(runs, tmp_path):
    """SIGTERM to the batch shell (what --signal=B:TERM@300 does) -> srun -> every trainer: complete
    checkpoint at the last logged step, exit 0. Then the job as SLURM requeues it after a preemption
    (#SBATCH --requeue; the same script again with SLURM_RESTART_COUNT=1): it says so and the trainers
    resume from that checkpoint."""
    assert "\n#SBATCH --requeue\n" in (LAUNCH / "slurm.sbatch").read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    work = tmp_path / "w"
    signals, srun_pid, log = tmp_path / "srun_signals", tmp_path / "srun_pid", tmp_path / "job.out"
    env = launch_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NNODES": "1",
                      "SLURM_JOB_NODELIST": "x",
                      "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
                      "RECIPE": str(RECIPES / "tiny_stage1.yaml"), "SRUN_SIGNAL_LOG": str(signals),
                      "SRUN_PID_FILE": str(srun_pid)})
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"),
                                 *overrides(runs, work, **{"train.train_iters": 1000})],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        metrics = work / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc=proc)
        proc.send_signal(signal.SIGTERM)  # the batch shell only, as SLURM's B: does
        rc = proc.wait(timeout=300)
        text = log.read_text()
        assert signals.exists() and signals.read_text().split() == ["TERM"], text[-3000:]
        assert rc == 0, text[-3000:]
        assert "on TP1 x PP1 x DP2 (experts: ETP1 x EP2 x EDP1) on 2 processes" in text  # the --check line
        assert "stopped by signal" in text, text[-3000:]
        from scidfm_megatron.training.checkpoint import complete_checkpoints

        done = complete_checkpoints(work / "ckpt")
        last = max(losses(work))
        assert done and done[-1][0] == last and (work / "ckpt" / "latest").read_text() == str(last), (done, last)
        requeued = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"),
                                   *overrides(runs, work, **{"train.train_iters": 1000, "train.exit_after_iters": 1})],
                                  cwd=ROOT, env={**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(free_port())},
                                  capture_output=True, text=True, timeout=600)
        text = requeued.stdout + requeued.stderr
        assert requeued.returncode == 0 and "[launch] requeued job (SLURM_RESTART_COUNT=1)" in text, text[-3000:]
        assert f"resumed from {done[-1][1]}: iteration {last}" in text and max(losses(work)) == last + 1, text[-3000:]
    finally:  # without the forwarding the trainers would run on, orphaned: never leave them behind
        if proc.poll() is None:
            kill_tree(proc.pid, signal.SIGKILL)
        if srun_pid.exists():
            try:
                kill_tree(int(srun_pid.read_text()), signal.SIGKILL)
            except Exception:  # noqa: BLE001  best-effort cleanup: srun may be gone already
                pass
