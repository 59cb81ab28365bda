"""Smoke test of tools/bench_train.py --overhead (scidfm_megatron/bench/overhead.py): one 2-process launch,
both sides train, the table and the JSON come out. No timing is asserted (CI machines are shared; the benchmark
itself judges)."""

import json
import math

from scidfm_megatron.bench.overhead import median_ci
from scidfm_megatron.bench.train import run


def test_overhead_mode_runs_both_loops(runs, tmp_path, capsys):
    out = tmp_path / "overhead.json"
    run(["--overhead", "--rounds", "2", "--steps", "1", "--warmup-steps", "1", "--breakdown",
         "--runs", str(runs), "--json", str(out)])
    text = capsys.readouterr().out
    assert "trainer (wall)" in text and "bare (wall)" in text and ("PASS (wall)" in text or "FAIL (wall)" in text)
    [res] = json.loads(out.read_text())
    assert res["iteration"] == 2 * 1 + 2 * 2 * 1  # warmup of each side, then 2 rounds x 1 step x 2 sides
    for side in ("trainer", "bare"):
        assert len(res["per_step_s"][side]) == 2 and min(res["per_step_s"][side]) > 0
        assert len(res["cpu_per_step_s"][side]) == 2 and min(res["cpu_per_step_s"][side]) > 0
        assert math.isfinite(res[f"{side}_loss"]) and 0 < res[f"{side}_loss"] < 12  # ln(32.5k) = 10.4 at init
    for what in ("wall", "cpu"):
        lo, hi = res[what]["ci95"]
        assert lo <= res[what]["ratio"] <= hi
    assert {"train_step", "Trainer._moe_aux", "micro_batches"} <= set(res["breakdown"]["parts"])


def test_median_ci_order_statistics():
    ci = median_ci
    assert ci(list(range(1, 21))) == (6, 15)  # n = 20: 6th and 15th (95.9%)
    assert ci(list(range(1, 31))) == (10, 21)
    assert ci([3.0]) == (3.0, 3.0)


def test_tools_are_launchers_of_modules_that_exist():
    """tools/ keeps no library logic: each file is a launcher of a package module's main() (the documented
    `python tools/bench_*.py` commands), or a dev-time generator of the bundled fixtures, or hf_generate.py
    (transformers alone, on purpose)."""
    import importlib
    import re
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"
    standalone = {"make_sample_corpus.py", "make_eval_fixtures.py", "_wheeldata.py", "hf_generate.py"}
    launchers = {}
    for f in sorted(tools.glob("*.py")):
        if f.name in standalone:
            continue
        text = f.read_text()
        m = re.search(r"^from (scidfm_megatron\.[\w.]+) import main$", text, re.M)
        assert m and len(text.splitlines()) <= 10, f"{f.name} is not a launcher"
        launchers[f.name] = m.group(1)
    assert {"bench_train.py", "gpu_check.py", "train_synthetic.py"} <= set(launchers)
    for name, module in launchers.items():
        assert callable(importlib.import_module(module).main), name
