"""Golden per-step losses of tiny stage 1 on CPU (torchtitan keeps tests/assets/losses/*.txt the same way).

A change that moves the numbers of a fixed run (a megatron-core or torch upgrade, a patch, the model, the data
order, the optimizer or the schedule) fails here with the step, the expected and the got loss. The run is
conftest's shared ``stage1_fp32`` (examples/recipes/tiny_stage1.yaml with conftest.overrides: scidfm-tiny, fp32,
EP2 on two gloo processes launched as two nodes, the sample corpus, seq 64, global batch 8), so this test adds no
launch. Its metrics.jsonl holds each step's loss as the float the trainer logged.

Tolerance, measured on the 2-core development machine: two runs give bit-identical losses at all 30 steps
(the run is deterministic on CPU). The same run with OMP_NUM_THREADS=2 instead of 1 (another summation order in
the fp32 kernels, as another CPU would have) moves the first 8 losses by at most 4.3e-8 relative (steps 1-4 not
at all), but step 11 by 2e-5 and step 18 on by ~1e-3: the runs diverge, so only the first STEPS are compared.
RTOL = 1e-5 is ~200x that spread and still names a change of the fifth significant digit of any step.

After an intended change, regenerate the file and commit it with the change that moved the numbers:
    .venv/bin/python -m pytest tests/test_golden_losses.py --update-golden
"""

import math
from pathlib import Path

from conftest import train_losses

GOLDEN = Path(__file__).parent / "assets" / "losses" / "tiny_stage1.txt"
STEPS = 8
RTOL = 1e-5
HEADER = ("# Per-step training loss of tiny stage 1 on CPU (tests/conftest.py stage1_fp32: fp32, EP2 on 2 gloo ranks,\n"
          "# the sample corpus). Written by: .venv/bin/python -m pytest tests/test_golden_losses.py --update-golden\n"
          "# step loss\n")




def read_golden(path: Path = GOLDEN) -> dict[int, float]:
    out = {}
    for line in open(path):
        if line.strip() and not line.startswith("#"):
            step, loss = line.split()
            out[int(step)] = float(loss)
    return out


def compare(expected: dict[int, float], got: dict[int, float], rtol: float = RTOL) -> list[str]:
    """One line per step whose loss moved beyond ``rtol`` (or is missing)."""
    bad = []
    for step, want in sorted(expected.items()):
        have = got.get(step)
        if have is None or not math.isclose(have, want, rel_tol=rtol, abs_tol=0.0):
            diff = "missing" if have is None else f"relative difference {abs(have - want) / abs(want):.2e}"
            bad.append(f"step {step}: expected {want!r}, got {have!r} ({diff})")
    return bad


def test_tiny_stage1_losses_match_the_golden_file(stage1_fp32, request):
    got = train_losses(stage1_fp32[0])
    first = {s: got[s] for s in range(1, STEPS + 1)}
    if request.config.getoption("--update-golden"):
        GOLDEN.write_text(HEADER + "".join(f"{s} {v!r}\n" for s, v in first.items()))
        return
    expected = read_golden()
    assert len(expected) == STEPS, f"{GOLDEN} holds {len(expected)} steps, expected {STEPS}"
    bad = compare(expected, first)
    assert not bad, (f"tiny stage 1 losses differ from {GOLDEN.relative_to(GOLDEN.parents[2])} "
                     f"(rtol {RTOL}):\n  " + "\n  ".join(bad) +
                     "\nIf the change is intended, regenerate the file and commit it with the change:\n"
                     "  .venv/bin/python -m pytest tests/test_golden_losses.py --update-golden")


def test_a_moved_loss_is_named_with_its_step():
    """The comparison itself: a loss moved by more than RTOL is reported with step, expected and got."""
    expected = {1: 10.5, 2: 10.0}
    assert compare(expected, {1: 10.5, 2: 10.0 * (1 + RTOL / 10)}) == []
    bad = compare(expected, {1: 10.5, 2: 10.001})
    assert bad == ["step 2: expected 10.0, got 10.001 (relative difference 1.00e-04)"]
    assert compare(expected, {1: 10.5}) == ["step 2: expected 10.0, got None (missing)"]
