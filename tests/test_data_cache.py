"""Dataset index caches (issue 23, item 5): megatron's order, no mask, caches only in data.cache_dir, a
read-only corpus, scidfm-prepare-data before the run and nothing rebuilt by the trainer."""

import logging
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT


def _recipe(tmp_path, data_root, name="r.yaml"):
    recipe = {"name": "cache", "unit": "tokens", "data_root": str(data_root), "sources": [
        {"name": "papers", "domain": "papers", "category": "science", "tokens": 50, "data": "papers_text_document"},
        {"name": "molecules", "domain": "chemistry", "category": "science", "tokens": 30,
         "data": "molecules_smiles_document"},
        {"name": "proteins", "domain": "biology", "category": "science", "tokens": 20,
         "data": "proteins_sequence_document"}]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("epochs,separate", [(1, False), (3, False), (2, True), (4, True)])
def test_lean_document_index_equals_megatrons(epochs, separate):
    """gpt_lean_document_index gives megatron's _build_document_index element for element."""
    import megatron.core.datasets.gpt_dataset as gd

    from megatron_patches.gpt_lean_document_index import build_document_index

    original = getattr(gd._build_document_index, "__wrapped_original__", gd._build_document_index)
    docs = np.arange(17, 1017, dtype=np.int32)
    want = original(docs, epochs, np.random.RandomState(5), separate)
    got = build_document_index(docs, epochs, np.random.RandomState(5), separate)
    assert got.dtype == want.dtype == np.int32 and np.array_equal(got, want)
    # from a (start, stop) span, as the lean builder passes it: the same index
    from scidfm_megatron.data.index_cache import DocumentSpan

    assert np.array_equal(build_document_index(DocumentSpan(17, 1017), epochs, np.random.RandomState(5), separate),
                          want)


def test_lean_datasets_keep_megatrons_order_and_build_no_mask(tmp_path, sample_datasets, science_tokenizer):
    """The lean builder gives megatron's own GPTDataset/BlendedDataset indices and samples (same config,
    megatron's classes, a separate cache), keeps no document-id array, maps its indices from the cache,
    and no sample carries an attention mask."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from scidfm_megatron.data import index_cache
    from scidfm_megatron.data.datasets import MegatronTokenizerAdapter, epoch_seed, gpt_dataset_config
    from scidfm_megatron.data.mixture import Mixture

    mix = Mixture.load(_recipe(tmp_path, sample_datasets["dir"]))
    tok = MegatronTokenizerAdapter(science_tokenizer)

    def config(cache):
        return gpt_dataset_config(mix.blend(1), tok, seq_length=64, seed=epoch_seed(7, 1), split="98,2,0",
                                  cache_dir=str(tmp_path / cache), threads=2)

    lean = index_cache.build(config("lean"), [3000, 200, 0], lambda: True)
    with index_cache.process_group():
        ref = BlendedMegatronDatasetBuilder(GPTDataset, [3000, 200, 0], lambda: True, config("ref")).build()
    for a, b in zip(lean[:2], ref[:2], strict=False):
        assert np.array_equal(a.dataset_index, b.dataset_index)
        assert np.array_equal(a.dataset_sample_index, b.dataset_sample_index)
        assert isinstance(a.dataset_index, np.memmap)  # mapped from the cache, not held
        for x, y in zip(a.datasets, b.datasets, strict=False):
            assert isinstance(x.indices, index_cache.DocumentSpan) and len(x.indices) == len(y.indices)
            for name in ("document_index", "sample_index", "shuffle_index"):
                assert np.array_equal(getattr(x, name), getattr(y, name)), name
                assert isinstance(getattr(x, name), np.memmap), name
        for i in (0, 1, len(a) - 1):
            s, r = a[i], b[i]
            assert np.array_equal(s["tokens"], r["tokens"]) and np.array_equal(s["labels"], r["labels"])
            assert "attention_mask" not in s
    assert all(d.cached_attention_mask is None for d in lean[0].datasets)
    assert all(getattr(d, "index_built", False) for d in index_cache.members(lean))


def test_read_only_data_root_and_caches_only_in_cache_dir(tmp_path, sample_datasets, science_tokenizer, monkeypatch):
    """A corpus directory nobody may write to works, with data.cache_dir and without one (a temporary
    cache), and nothing is ever written next to the data (megatron's <prefix>/cache fallback)."""
    from scidfm_megatron.data.datasets import build_pretrain_datasets
    from scidfm_megatron.data.mixture import Mixture

    root = tmp_path / "corpus"
    root.mkdir()
    for name in os.listdir(sample_datasets["dir"]):
        if name.endswith((".bin", ".idx")):
            shutil.copy(os.path.join(sample_datasets["dir"], name), root / name)
    before = sorted(os.listdir(root))
    mix = Mixture.load(_recipe(tmp_path, root))
    os.chmod(root, stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes through file modes: refuse directories under the corpus as a mount would
        makedirs = os.makedirs

        def read_only_makedirs(path, *args, **kwargs):
            if os.path.abspath(path).startswith(str(root)):
                raise PermissionError(13, "Read-only file system", str(path))
            return makedirs(path, *args, **kwargs)

        monkeypatch.setattr(os, "makedirs", read_only_makedirs)
    try:
        for cache in (str(tmp_path / "cache"), None):
            train, valid, _ = build_pretrain_datasets(mix, 1, science_tokenizer, seq_length=64,
                                                      samples=(500, 50, 0), split="98,2,0", cache_dir=cache)
            assert len(train) >= 500 and train[0]["tokens"].shape[0] == 64
        # one source alone takes megatron's single-dataset path (no blend): the same rule holds there
        single = Mixture.load(_recipe(tmp_path, root, "one.yaml"))
        single.sources = single.sources[:1]
        train, _, _ = build_pretrain_datasets(single, 1, science_tokenizer, seq_length=64, samples=(100, 0, 0),
                                              split="100,0,0", cache_dir=str(tmp_path / "cache1"))
        assert len(train) >= 100
    finally:
        os.chmod(root, stat.S_IRWXU)
    assert sorted(os.listdir(root)) == before
    assert any(n.endswith("shuffle_index.npy") for n in os.listdir(tmp_path / "cache1"))


def test_prepare_data_then_the_trainer_builds_nothing(tmp_path, sample_datasets, science_tokenizer_dir, caplog, capsys):
    """scidfm-prepare-data (no process group, CPU) builds every index of the run into data.cache_dir, both
    epochs when asked; the trainer's dataset step then loads them all and builds none (its log says so)."""
    from scidfm_megatron.data import index_cache
    from scidfm_megatron.data.prepare import build_run_datasets
    from scidfm_megatron.tokenizer import ScienceTokenizer
    from scidfm_megatron.training.config import load_run_config

    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"preset": "scidfm-tiny"},
        "train": {"stage": "pretrain", "seq_length": 64, "global_batch_size": 8, "micro_batch_size": 1,
                  "train_iters": 40, "eval_interval": 10, "eval_iters": 2},
        "data": {"tokenizer_model": str(science_tokenizer_dir / "tokenizer.model"),
                 "mixture": str(_recipe(tmp_path, sample_datasets["dir"])), "split": "98,2,0",
                 "cache_dir": str(tmp_path / "cache")}}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "scidfm_megatron.cli.prepare_data", "--config", str(recipe),
                          "--epochs", "1,2", "train.seed=11"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "epoch 1: train" in out.stdout and "epoch 2: train" in out.stdout
    assert "dataset indices: 8 built, 0 loaded" in out.stderr  # 3 sources x (train, valid) + 2 blends
    cfg = load_run_config(str(recipe), ["train.seed=11"])
    tok = ScienceTokenizer(cfg.data.tokenizer_model)
    files = sorted(os.listdir(tmp_path / "cache"))
    for epoch in (1, 2):
        with caplog.at_level(logging.INFO, logger="scidfm_megatron.data"):
            train, valid, _ = build_run_datasets(cfg, tok, epoch=epoch)
        parts = index_cache.members([train, valid])
        assert len(parts) == 8 and not any(d.index_built for d in parts)
        assert f"dataset indices: 0 built, 8 loaded from {tmp_path / 'cache'}" in caplog.text
    assert sorted(os.listdir(tmp_path / "cache")) == files
    # a recipe that is not pretraining, or has nowhere to put the cache, stops with one line (exit 2)
    from scidfm_megatron.cli.prepare_data import main

    for bad, msg in ((["train.stage=sft"], "only pretraining recipes"),
                     (["data.cache_dir=null"], "data.cache_dir is not set")):
        assert main(["--config", str(recipe), *bad]) == 2
        assert msg in capsys.readouterr().err


def test_build_budget_runs_large_builds_alone():
    """BuildBudget: a build that would pass the limit waits for the running ones; one alone always runs."""
    import threading
    import time

    from scidfm_megatron.data.index_cache import BuildBudget

    budget, events = BuildBudget(10), []
    budget.acquire(8)  # a running build

    def big():
        budget.acquire(50)  # over the limit: waits for the first, then runs alone
        events.append("big")
        budget.release(50)

    t = threading.Thread(target=big)
    t.start()
    time.sleep(0.2)
    assert events == [] and budget.used == 8
    budget.release(8)
    t.join(5)
    assert events == ["big"] and budget.used == 0
    budget.acquire(4)
    budget.acquire(6)  # within the limit: no wait
    assert budget.used == 10
