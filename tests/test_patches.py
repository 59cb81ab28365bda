"""megatron_patches: every patch still fits megatron-core, is needed, is scoped, and apply() is safe.

* drift: each patch's declared targets (the megatron-core internals it relies on) exist with the
  parameters it expects; an upgrade that moves one fails here, not silently at run time.
* necessity: with one patch disabled (SCIDFM_DISABLE_PATCHES), a training step fails with the exact
  symptom the patch documents, in the smallest layout that reaches the patched code (one process for
  most, EP2 for the all-to-all split sizes, TP2 for the uneven all-gather); with all patches it passes
  (the parity tests prove it changes no numbers).
"""

import subprocess
import sys

import pytest

import megatron_patches
from megatron_patches import PATCHES, UnsupportedMegatronVersion
from scidfm_megatron.testing.fork import DistributedTestError, run_distributed
from test_parallel_parity import parity_rank


def run_py(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full = dict(os.environ, TORCHDYNAMO_DISABLE="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=full)


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_targets_have_not_moved(patch):
    assert patch.targets, f"{patch.name} declares no megatron-core targets"
    assert patch.drift() == []
    assert patch.summary and patch.why and patch.when in ("always", "no_te", "cpu")


def test_drift_is_detected():
    from megatron_patches._base import Target

    assert "not found" in Target("megatron.core.transformer.moe.moe_utils", "no_such_function").check()
    assert "no longer takes" in Target("megatron.core.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu",
                                       ("tensor", "renamed_arg")).check()


def test_refuses_an_unsupported_megatron_version(monkeypatch):
    monkeypatch.setattr(megatron_patches, "megatron_core_version", lambda: "0.17.0")
    with pytest.raises(UnsupportedMegatronVersion,
                       match=r"0\.16\.1.*0\.17\.0 is installed.*pip install megatron-core==0\.16\.1"):
        megatron_patches.apply()


# apply() in a new process: the four checks below run in one interpreter, in this order (the first apply() is
# the idempotency check's), each printing after a "## name" line (one interpreter: megatron imported once).
NEW_PROCESS = {
    "idempotent": (
        "import megatron_patches, torch\n"
        "a = megatron_patches.apply(); f = torch.zeros; t = torch.Tensor.to\n"
        "b = megatron_patches.apply()\n"
        "print(a == b, torch.zeros is f, torch.Tensor.to is t, sorted(a))\n"),
    "callers": (
        "import megatron_patches, torch\n"
        "megatron_patches.apply()\n"
        "try:\n"
        "    torch.zeros(2, device='cuda'); print('user: no error')\n"
        "except (AssertionError, RuntimeError) as e:\n"
        "    print('user: refused')\n"
        "print('user type:', torch.zeros(1).type())\n"
        "ns = {'__name__': 'megatron.core.fake', 'torch': torch}\n"
        "exec(\"t = torch.zeros(2, device='cuda'); u = torch.ones(1).cuda(); "
        "v = torch.ones(1).to(torch.cuda.current_device()); "
        "kind = t.type()\", ns)\n"
        "print('megatron:', ns['t'].device, ns['u'].device, ns['v'].device, ns['kind'])\n"),
    "device_context": (
        "import megatron_patches, torch\n"
        "megatron_patches.apply()\n"
        "with torch.device('meta'):\n"
        "    print('meta:', torch.arange(3).device, torch.zeros(2).device, torch.empty(1).device)\n"),
    "split_sizes": (
        "import megatron_patches, torch\n"
        "megatron_patches.apply()\n"
        "import megatron.core.transformer.moe.moe_utils as mu, megatron.core.transformer.moe.token_dispatcher as td\n"
        "r = td.maybe_move_tensor_to_cpu(torch.tensor([3, 5]), as_numpy=True)\n"
        "print(type(r).__name__, r.tolist(), mu.maybe_move_tensor_to_cpu is td.maybe_move_tensor_to_cpu)\n"),
}


@pytest.fixture(scope="module")
def new_process():
    """{check: what it printed} from one new interpreter running NEW_PROCESS in order."""
    out = run_py("".join(f"print('## {name}', flush=True)\n{code}" for name, code in NEW_PROCESS.items()))
    assert out.returncode == 0, out.stderr
    printed: dict[str, str] = {}
    name = None
    for line in out.stdout.splitlines(keepends=True):
        if line.startswith("## ") and line[3:].strip() in NEW_PROCESS:
            name = line[3:].strip()
            printed[name] = ""
        elif name is not None:
            printed[name] += line
    assert list(printed) == list(NEW_PROCESS), out.stdout
    return printed


def test_apply_is_idempotent_and_cpu_only_patches_follow_cuda(new_process):
    stdout = new_process["idempotent"]
    assert stdout.startswith("True True True")
    expected = sorted(p.name for p in PATCHES)  # no CUDA and no TE here: every patch applies
    assert str(expected) in stdout


def test_unknown_disabled_patch_is_an_error():
    out = run_py("import megatron_patches; megatron_patches.apply()", env={"SCIDFM_DISABLE_PATCHES": "nope"})
    assert out.returncode != 0 and "unknown patches ['nope']" in out.stderr


def test_cpu_device_and_tensor_type_act_only_for_megatron_callers(new_process):
    stdout = new_process["callers"]
    assert "user: refused" in stdout and "user type: torch.FloatTensor" in stdout
    assert "megatron: cpu cpu cpu torch.cuda.FloatTensor" in stdout


def test_cpu_device_keeps_torch_device_context_working(new_process):
    """Wrapped factories must still obey ``with torch.device(...)`` (transformers builds models on the meta
    device and then recomputes non-persistent buffers such as RoPE's inv_freq): regression test for a
    patch that broke it by wrapping the factories before torch cached its set of them."""
    assert "meta: meta meta meta" in new_process["device_context"]


def test_moe_split_sizes_become_numpy_in_both_modules(new_process):
    assert new_process["split_sizes"].strip() == "ndarray [3, 5] True"


SYMPTOMS = {
    "te_general_gemm_missing": "NameError: name 'te_general_gemm' is not defined",
    "cpu_device": "Torch not compiled with CUDA enabled",
    "cpu_rng": "Torch not compiled with CUDA enabled",
    "cpu_streams": "torch.cuda.Stream requires CUDA support",
    "cpu_tensor_type": "assert param.grad.type() == 'torch.cuda.FloatTensor'",
    "moe_cpu_split_sizes": "TypeError: all_to_all_single(): incompatible function arguments",
    "gloo_uneven_all_gather": "ProcessGroupGloo::allgather: invalid tensor size",
}


# The smallest layout (TP, EP) whose training step reaches the patched code (measured 2026-11-28: the MoE
# split sizes reach all_to_all_single only with EP > 1, the uneven all-gather only with TP > 1; the others
# fail on one process, as they did at TP2 x EP2).
LAYOUT = {"moe_cpu_split_sizes": (1, 2), "gloo_uneven_all_gather": (2, 1)}

# Patches whose failure needs a checkpoint round trip are checked where that happens.
CHECKED_ELSEWHERE = {"cpu_sharded_tensor_init": "tests/test_resume.py::test_resume_matrix (fully-parallel load at DP2)",
                     "distopt_torch_adam_load": "tests/test_training.py::test_distributed_optimizer_checkpoint_resumes",
                     "distopt_torch_adam_step": "tests/test_training.py::test_distributed_optimizer_checkpoint_resumes",
                     # memory, not a failure: its values are megatron's (tests/test_data_cache.py), its
                     # peak is measured by tools/bench_data_cache.py
                     "gpt_lean_document_index": "tests/test_data_cache.py::test_lean_document_index_equals_megatrons"}


def test_every_patch_has_a_symptom_check():
    assert set(SYMPTOMS) | set(CHECKED_ELSEWHERE) == {p.name for p in PATCHES}
    assert set(LAYOUT) <= set(SYMPTOMS)


def patch_symptoms(rank, world_size, cases):
    """In a fresh interpreter that has applied no patch: for each (patch, TP, EP), one training step on TP*EP
    ranks forked from here with that patch disabled. {patch: every failed rank's traceback, None if it passed}."""
    import megatron_patches
    import scidfm_megatron.model.accounting
    import scidfm_megatron.model.builder
    import scidfm_megatron.training.engine
    import scidfm_megatron.training.step  # noqa: F401 - imported once here, not in every forked rank

    assert megatron_patches.applied() == [], megatron_patches.applied()
    out = {}
    for name, tp, ep in cases:
        try:
            run_distributed(parity_rank, tp * ep, kwargs=dict(mode="capacity", tp=tp, ep=ep, steps=1),
                            env={"SCIDFM_DISABLE_PATCHES": name}, timeout=300, start_method="fork")
            out[name] = None
        except DistributedTestError as exc:
            out[name] = exc.output
    return out


@pytest.fixture(scope="module")
def symptoms():
    """One fresh interpreter (spawned: ranks forked from this process would inherit the patches it applied)
    forks the ranks of every case, so megatron-core is imported once for all of them."""
    cases = [(name, *LAYOUT.get(name, (1, 1))) for name in sorted(SYMPTOMS)]
    return run_distributed(patch_symptoms, 1, cases, start_method="spawn", process_group=False, timeout=1200)


@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(SYMPTOMS))
def test_each_patch_is_needed(symptoms, name):
    """Remove one patch: a training step on CPU (LAYOUT, else one process) fails with its documented symptom."""
    out = symptoms[name]
    assert out is not None, f"a training step with {name} disabled passed"
    assert SYMPTOMS[name] in out, out[-3000:]
