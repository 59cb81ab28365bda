"""Recipes as a user brings them (issue 19): megatron-core's own config checks in --check, the router keys,
top-1 routing, paths independent of the working directory, a checkpoint that keeps its tokenizer,
layout-only checks of the shipped 18B recipes, unservable resumes found by --check, help on every flag.

The two training runs here are single-process and in this process (no launcher, no second megatron import):
a few steps of scidfm-tiny, one with top-1 routing, one with the default top-2 (Mixtral-exportable)."""

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from conftest import RECIPES

TINY = (RECIPES / "tiny_stage1.yaml").read_text()


def entry(capsys, *args) -> subprocess.CompletedProcess:
    """``scidfm-train ARGS`` in this process (the console script is ``sys.exit(main())``)."""
    from scidfm_megatron.cli.train import main

    capsys.readouterr()
    rc = main(argv=[str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def one_line_refusal(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------ megatron's own checks, router keys
@pytest.mark.parametrize("overrides,key", [
    (["model.moe_router_topk=1", "model.moe_router_pre_softmax=false"], "model.moe_router_pre_softmax"),
    (["model.moe_router_enable_expert_bias=true"], "model.moe_router_score_function"),
    (["model.moe_router_group_topk=1"], "model.moe_router_num_groups"),
])
def test_a_setting_megatron_refuses_is_caught_by_check_in_one_line(capsys, overrides, key):
    """Before: --check said OK and megatron raised at model build, a traceback per rank."""
    r = entry(capsys, "--config", RECIPES / "scidfm18b_stage1.yaml", "--check", "--layout-only",
              "--world-size", "128", *overrides)
    line = one_line_refusal(r, key, "megatron-core refuses this model/layout")
    assert line.startswith(f"scidfm-train: configuration error: {key}")


def test_router_keys_reach_megatrons_transformer_config():
    from scidfm_megatron.parallel import validate_layout
    from scidfm_megatron.training.config import load_run_config
    from scidfm_megatron.training.megatron_check import check_megatron_configs

    cfg = load_run_config(RECIPES / "tiny_stage1.yaml", [
        "model.moe_router_score_function=sigmoid", "model.moe_router_enable_expert_bias=true",
        "model.moe_router_bias_update_rate=0.01", "model.moe_router_num_groups=4", "model.moe_router_group_topk=2",
        "model.moe_router_topk_scaling_factor=2.5", "model.moe_router_pre_softmax=true",
        "model.moe_router_load_balancing_type=seq_aux_loss"])
    tc = check_megatron_configs(cfg, validate_layout(cfg.model, cfg.parallel, 2))
    assert (tc.moe_router_score_function, tc.moe_router_enable_expert_bias, tc.moe_router_bias_update_rate,
            tc.moe_router_num_groups, tc.moe_router_group_topk, tc.moe_router_topk_scaling_factor,
            tc.moe_router_pre_softmax, tc.moe_router_load_balancing_type) == (
        "sigmoid", True, 0.01, 4, 2, 2.5, True, "seq_aux_loss")
    # defaults: Mixtral's routing, pre-softmax on exactly for top-1
    plain = load_run_config(RECIPES / "tiny_stage1.yaml")
    lay = validate_layout(plain.model, plain.parallel, 2)
    assert check_megatron_configs(plain, lay).moe_router_pre_softmax is False
    plain.model.moe_router_topk = 1
    assert check_megatron_configs(plain, lay).moe_router_pre_softmax is True


# ------------------------------------------------------------------ layout-only check of the 18B recipes
@pytest.mark.parametrize("recipe,world", [("scidfm18b_stage1.yaml", 128), ("scidfm18b_stage2.yaml", 128),
                                          ("scidfm18b_sft.yaml", 16)])
def test_shipped_18b_recipes_pass_layout_only_check_without_their_data(capsys, recipe, world):
    r = entry(capsys, "--config", RECIPES / recipe, "--check", "--layout-only", "--world-size", world)
    assert r.returncode == 0, r.stderr
    assert "layout and model (no file opened) OK" in r.stdout
    if not os.path.exists("/data/scidfm"):  # the full check needs the cluster's files: one line says which
        one_line_refusal(entry(capsys, "--config", RECIPES / recipe, "--check", "--world-size", world),
                         "/data/scidfm", "does not exist")


# ------------------------------------------------------------------ paths
def test_recipe_paths_are_relative_to_the_recipe_file_and_overrides_to_the_cwd(tmp_path, monkeypatch):
    from scidfm_megatron.training.config import load_run_config

    (tmp_path / "proj").mkdir()
    recipe = tmp_path / "proj" / "r.yaml"
    recipe.write_text("model: {preset: scidfm-tiny}\ndata: {tokenizer_model: tok/tokenizer.model, "
                      "mixture: ../mix.yaml}\ncheckpoint: {save: ckpt, init_from: /abs/ckpt}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config("proj/r.yaml", ["logging.metrics_file=out/m.jsonl"])
    assert cfg.data.tokenizer_model == str(tmp_path / "proj" / "tok" / "tokenizer.model")
    assert cfg.data.mixture == str(tmp_path / "mix.yaml")
    assert cfg.checkpoint.save == str(tmp_path / "proj" / "ckpt") and cfg.checkpoint.init_from == "/abs/ckpt"
    assert cfg.logging.metrics_file == str(tmp_path / "out" / "m.jsonl")


# ------------------------------------------------------------------ two small runs in this process
def train_here(runs: Path, proj: Path, cwd: Path, *overrides: str) -> list[dict]:
    """The tiny recipe copied to ``proj`` with its tokenizer as ``proj/tok/tokenizer.model`` (a relative
    path in the recipe), trained for 3 steps on one process from ``cwd``. Returns the step history."""
    import torch.distributed as dist

    from scidfm_megatron.training.config import load_run_config
    from scidfm_megatron.training.trainer import run

    (proj / "tok").mkdir(parents=True)
    shutil.copyfile(runs / "tokenizer" / "tokenizer.model", proj / "tok" / "tokenizer.model")
    recipe = (TINY.replace("../../runs/tokenizer/tokenizer.model", "tok/tokenizer.model")
              .replace("../mixtures/sample_corpus.yaml", str(RECIPES.parent / "mixtures" / "sample_corpus.yaml"))
              .replace("../../runs/tiny/stage1/checkpoints", "ckpt"))
    (proj / "recipe.yaml").write_text(recipe)
    cwd.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        cfg = load_run_config(str(proj / "recipe.yaml"), [
            f"data.data_root={runs / 'data'}", "parallel.ep=1", "train.train_iters=3", "train.seq_length=64",
            "model.max_seq_length=64", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.warmup_iters=1", "train.eval_interval=null", "logging.tensorboard_dir=null",
            "checkpoint.save_interval=null", *overrides])
        assert cfg.data.tokenizer_model == str(proj / "tok" / "tokenizer.model")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return run(cfg)
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def top1(runs, tmp_path_factory):
    """A recipe that only says model.moe_router_topk: 1, trained 3 steps."""
    import io
    from contextlib import redirect_stdout

    work = tmp_path_factory.mktemp("top1")
    out = io.StringIO()
    records = ListHandler()
    datasets_log = logging.getLogger("megatron.core.datasets")
    datasets_log.addHandler(records)
    try:
        with redirect_stdout(out):
            history = train_here(runs, work / "proj", work / "elsewhere", "model.moe_router_topk=1")
    finally:
        datasets_log.removeHandler(records)
    return work, history, out.getvalue() + "\n".join(r.getMessage() for r in records.records)


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_a_top1_recipe_trains_with_pre_softmax_logged(top1):
    work, history, log = top1
    assert len(history) == 3 and all(h["loss"] == h["loss"] and h["loss"] < 11 for h in history), history
    assert "model.moe_router_pre_softmax is null and model.moe_router_topk is 1: routing with megatron's " \
           "pre-softmax" in log
    assert "path_to_cache is None" not in log  # megatron's per-dataset "no cache" lines (data.cache_dir: null)
    ckpt = work / "proj" / "ckpt" / "iter_0000003"
    meta = json.loads((ckpt / "scidfm_meta.json").read_text())
    assert meta["config"]["model"]["moe_router_topk"] == 1


def test_a_checkpoint_keeps_its_tokenizer_with_its_fingerprint(top1, runs):
    from scidfm_megatron.tokenizer.fingerprint import tokenizer_fingerprint

    work, _, _ = top1
    ckpt = work / "proj" / "ckpt" / "iter_0000003"
    meta = json.loads((ckpt / "scidfm_meta.json").read_text())
    assert (ckpt / "tokenizer.model").read_bytes() == (runs / "tokenizer" / "tokenizer.model").read_bytes()
    assert meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(runs / "tokenizer" / "tokenizer.model")
    assert meta["config"]["data"]["tokenizer_model"] == str(work / "proj" / "tok" / "tokenizer.model")


def test_an_unservable_resume_is_found_by_check_in_one_line(top1, runs, tmp_path, capsys):
    """The save directory holds iter_3: a run with another global batch, sequence length or tokenizer cannot
    continue it. Before: --check said OK and every rank refused after setup, with a traceback each."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    work, _, _ = top1
    base = ["--config", work / "proj" / "recipe.yaml", "--check", "--world-size", "1", "parallel.ep=1",
            "model.moe_router_topk=1", f"data.data_root={runs / 'data'}", "train.train_iters=6",
            "train.micro_batch_size=2", "train.warmup_iters=1",
            f"data.tokenizer_model={runs / 'tokenizer' / 'tokenizer.model'}"]
    ok = entry(capsys, *base, "train.seq_length=64", "model.max_seq_length=64", "train.global_batch_size=4")
    assert ok.returncode == 0, ok.stderr
    one_line_refusal(entry(capsys, *base, "train.seq_length=64", "model.max_seq_length=64",
                           "train.global_batch_size=8"), "train.global_batch_size=4 and this run has 8")
    one_line_refusal(entry(capsys, *base, "train.seq_length=32", "model.max_seq_length=64",
                           "train.global_batch_size=4"), "train.seq_length=64 and this run has 32")
    # the same vocabulary, other bytes (another build): a resume keeps the tokenizer
    m = pb.ModelProto()
    m.ParseFromString((runs / "tokenizer" / "tokenizer.model").read_bytes())
    m.trainer_spec.model_prefix = "another-build"
    other = tmp_path / "other.model"
    other.write_bytes(m.SerializeToString())
    one_line_refusal(entry(capsys, *base[:-1], f"data.tokenizer_model={other}", "train.seq_length=64",
                           "model.max_seq_length=64", "train.global_batch_size=4"),
                     "was trained with another tokenizer", "a resume keeps the tokenizer")


@pytest.fixture(scope="module")
def top2_moved(runs, tmp_path_factory):
    """The default (top-2) recipe with relative paths, trained from one folder; then its tokenizer is gone."""
    import io
    from contextlib import redirect_stdout

    work = tmp_path_factory.mktemp("top2")
    with redirect_stdout(io.StringIO()):
        train_here(runs, work / "proj", work / "cwd_a")
    shutil.rmtree(work / "proj" / "tok")  # the recipe's tokenizer is gone: the checkpoint's copy serves
    return work


def test_convert_and_evaluate_from_another_working_directory(top2_moved, runs, monkeypatch):
    from scidfm_megatron.cli.convert import main as convert
    from scidfm_megatron.cli.evaluate import main as evaluate

    work = top2_moved
    monkeypatch.chdir((work / "cwd_b").mkdir() or work / "cwd_b")
    assert convert(["--direction", "mcore-to-hf", "--load", str(work / "proj" / "ckpt"), "--save", "hf"]) == 0
    assert (work / "cwd_b" / "hf" / "tokenizer.model").read_bytes() == \
        (runs / "tokenizer" / "tokenizer.model").read_bytes()
    paper = RECIPES.parent / "eval" / "paper" / "sciq.jsonl"
    # the megatron checkpoint itself (the HF folder carries its tokenizer files: nothing to find)
    with warnings.catch_warnings(record=True) as seen:  # and the checkpoint load says nothing it need not
        warnings.simplefilter("always")
        assert evaluate(["--model", str(work / "proj" / "ckpt"), "--task", "sciq", "--data", str(paper),
                         "--limit", "2", "--output", "r.json"]) == 0
    known = [str(w.message) for w in seen if "ShardedTensor" in str(w.message) or "`load_state_dict`" in str(w.message)]
    assert not known, known
    assert json.loads(Path("r.json").read_text())


def test_a_top1_model_is_not_exported_as_a_mixtral(top1, tmp_path, monkeypatch, capsys):
    """A top-1 (pre-softmax) model is no Mixtral: the export refuses it in one line, naming the key."""
    from scidfm_megatron.cli.convert import main as convert

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert convert(["--direction", "mcore-to-hf", "--load", str(top1[0] / "proj" / "ckpt"), "--save", "hf1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.moe_router_pre_softmax=True" in err[0] and not Path("hf1").exists(), err


# ------------------------------------------------------------------ help on every flag
def test_every_flag_of_every_console_script_has_help(monkeypatch):
    """Each scidfm-* entry point of setup.py is run until it parses its arguments; every argument of its
    parser (and sub-parsers) must carry help text."""
    import importlib
    import sys

    from conftest import ROOT

    scripts = re.findall(r'"(scidfm-[\w-]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text())
    assert len(scripts) >= 11, scripts
    # every CLI main() is in scidfm_megatron/cli/ (the -m aliases of the training entry call its main;
    # the benchmark and test programs under bench/ and testing/, run with python -m, are not CLIs of the library)
    assert [m for _, m, _ in scripts if not m.startswith("scidfm_megatron.cli.")] == [], scripts
    outside = [str(p.relative_to(ROOT)) for p in (ROOT / "scidfm_megatron").rglob("*.py")
               if not {"cli", "bench", "testing"} & set(p.parts) and re.search(r"^def main\(", p.read_text(), re.M)]
    assert outside == [], outside
    parsers = []

    class Parsed(Exception):
        pass

    def capture(self, *a, **k):
        parsers.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)

    def walk(parser, name, out):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    walk(sp, f"{name} {sub}", out)
            elif not isinstance(a, argparse._HelpAction) and (not a.help or a.help == argparse.SUPPRESS):
                out.append(f"{name} {'/'.join(a.option_strings) or a.dest}")

    missing = []
    for script, module, fn in scripts:
        parsers.clear()
        monkeypatch.setattr(sys, "argv", [script])
        with pytest.raises(Parsed):
            getattr(importlib.import_module(module), fn)()
        for p in parsers:
            walk(p, script, missing)
    assert not missing, missing


def test_stage_flag_and_the_alias_modules_refuse_a_recipe_of_the_other_stage(capsys, monkeypatch):
    """One entry (scidfm_megatron/cli/train.py): ``--stage`` (what scidfm-pretrain / scidfm-sft and the
    launchers' STAGE= add) refuses a recipe of the other stage in one line, before anything is built, and
    the alias modules job scripts launch (``-m scidfm_megatron.pretrain`` / ``.sft``) run that same main."""
    import runpy
    import sys

    r = entry(capsys, "--stage", "sft", "--config", RECIPES / "tiny_stage1.yaml", "--print-config")
    one_line_refusal(r, "scidfm-sft: configuration error:", "tiny_stage1.yaml is a train.stage=pretrain recipe")
    for module, recipe, stage in (("scidfm_megatron.sft", "tiny_stage1.yaml", "pretrain"),
                                  ("scidfm_megatron.pretrain", "tiny_sft.yaml", "sft")):
        monkeypatch.setattr(sys, "argv", [module, "--config", str(RECIPES / recipe), "--print-config"])
        capsys.readouterr()
        with warnings.catch_warnings(), pytest.raises(SystemExit) as exc:
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
            runpy.run_module(module, run_name="__main__")
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"is a train.stage={stage} recipe" in err, err
