"""Mixtures -> megatron blends (issue 3, acceptance 2) and SFT data (acceptance 6)."""

import json

import numpy as np
import pytest
import yaml

from conftest import ROOT, SAMPLE
from scidfm_megatron.config import ConfigError
from scidfm_megatron.data.mixture import Mixture, count_tokens


def test_table2_recipe_reproduces_the_paper():
    m = Mixture.load(ROOT / "examples" / "mixtures" / "scidfm_table2.yaml")
    t1 = m.tokens(1)
    sci = sum(v for s, v in t1.items() if next(x for x in m.sources if x.name == s).category == "science")
    assert round(sci, 2) == 306.59 and round(sum(t1.values()) - sci, 2) == 268.60
    slim = sum(v for s, v in t1.items() if next(x for x in m.sources if x.name == s).group == "SlimPajama w/o Arxiv")
    assert round(slim, 2) == 241.64
    by_domain = {}
    for s in m.sources:
        by_domain[s.domain] = by_domain.get(s.domain, 0) + t1[s.name]
    assert {k: round(v, 2) for k, v in by_domain.items()} == {
        "math": 36.34, "chemistry": 18.47, "biology": 21.83, "geography": 0.82, "science code": 9.65,
        "general science": 219.48, "general": 268.60}
    (p1, w1), (p2, w2) = m.blend(1), m.blend(2)
    assert w1 == w2 and abs(sum(w1) - 1) < 1e-12
    changed = {s.name for s, a, b in zip(m.sources, p1, p2, strict=False) if a != b}
    assert changed == {"SlimPajama-CommonCrawl", "SlimPajama-C4", "SlimPajama-GitHub"}
    report = m.report(2)
    assert "re-sampled" in report and "306.59" in report and "268.60" in report


def test_recipe_errors_name_the_problem(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "sources": [{"name": "a", "domain": "d", "category": "science",
                                                           "tokens": 1, "data": "nope_text_document"},
                                                          {"name": "a", "domain": "d", "category": "general"}]}))
    with pytest.raises(ConfigError, match=r"duplicate source names \['a'\]"):
        Mixture.load(p)
    p.write_text(yaml.safe_dump({"name": "x", "sources": [{"name": "a", "domain": "d", "category": "sciense"}]}))
    with pytest.raises(ConfigError, match=r"m.yaml: mixture.sources\[0\].category must be science or general, "
                                          r"got 'sciense'$"):
        Mixture.load(p)
    p.write_text(yaml.safe_dump({"name": "x", "unit": "tokens", "sources": [
        {"name": "a", "domain": "d", "category": "science", "tokens": "auto", "data": "nope_text_document"}]}))
    with pytest.raises(ConfigError, match="nope_text_document.idx does not exist: preprocess that source first"):
        Mixture.load(p).blend(1)


def test_blended_dataset_samples_in_recipe_proportions(tmp_path, sample_datasets, science_tokenizer):
    from scidfm_megatron.data.datasets import build_pretrain_datasets

    recipe = {"name": "props", "unit": "tokens", "data_root": sample_datasets["dir"], "sources": [
        {"name": "papers", "domain": "papers", "category": "science", "tokens": 50, "data": "papers_text_document"},
        {"name": "molecules", "domain": "chemistry", "category": "science", "tokens": 30,
         "data": "molecules_smiles_document"},
        {"name": "proteins", "domain": "biology", "category": "science", "tokens": 20,
         "data": "proteins_sequence_document"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    mix = Mixture.load(tmp_path / "r.yaml")
    train, valid, _ = build_pretrain_datasets(mix, 1, science_tokenizer, seq_length=64, samples=(10_000, 100, 0),
                                              split="98,2,0", cache_dir=str(tmp_path / "cache"))
    assert len(train) >= 10_000
    counts = np.bincount(train.dataset_index[:10_000], minlength=3) / 10_000
    for got, want in zip(counts, (0.5, 0.3, 0.2), strict=False):
        assert abs(got - want) <= 0.02 * want, counts
    # Samples are real token windows of the right length from the right source.
    sample = train[0]
    assert sample["tokens"].shape[0] == 64 and int(sample["tokens"].max()) < science_tokenizer.vocab_size
    mol_rows = np.nonzero(train.dataset_index[:200] == 1)[0]
    text = science_tokenizer.decode(train[int(mol_rows[0])]["tokens"].tolist())
    assert "SMILES" in text or all(c not in text for c in " .,")  # molecule windows: spans or raw SMILES


def test_auto_token_counts_come_from_the_index(sample_datasets):
    s = json.loads(open(sample_datasets["papers"].replace("_text_document", "_summary.json")).read())
    assert count_tokens(sample_datasets["papers"]) == s["tokens"]["text"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, science_tokenizer_dir):
    from scidfm_megatron.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("sft")
    s = preprocess([str(SAMPLE / "instructions.jsonl")], str(out / "sft"),
                   str(science_tokenizer_dir / "tokenizer.model"), sft_seq_length=512, workers=2, progress=False)
    return out / "sft", s


def test_sft_loss_mask_is_exactly_the_assistant_turns(sft_data, science_tokenizer):
    from scidfm_megatron.data.sft import SFTDataset

    tok = science_tokenizer
    prefix, summary = sft_data
    convs = [json.loads(line)["messages"] for line in open(SAMPLE / "instructions.jsonl")]
    assert sum(sum(m["role"] == "assistant" for m in c) > 1 for c in convs) > 50  # multi-turn samples exist
    ds = SFTDataset(str(prefix), 512, tok.pad_id)
    # Re-split every packed sequence at its <s> tokens: conversations come back whole and in order.
    pieces = []
    for i in range(len(ds.tokens)):
        ids, mask = ds.tokens[i].tolist(), ds.mask[i].tolist()
        assert ids[0] == tok.bos_id and len(ids) <= 513
        starts = [k for k, t in enumerate(ids) if t == tok.bos_id] + [len(ids)]
        pieces += [(ids[a:b], mask[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
    assert len(pieces) == len(convs) == summary.sft["conversations"]
    recorded = json.loads(open(f"{prefix}_summary.json").read())  # what training checks its recipe against
    assert recorded["tokenizer"]["kind"] == "science" and recorded["tokenizer"]["vocab_size"] == tok.vocab_size
    assert recorded["largest_id"] == {"messages": max(max(ids) for ids, _ in pieces)}
    truncated = 0
    for (ids, mask), msgs in zip(pieces, convs, strict=True):
        want = "".join(m["content"] + "</s>" for m in msgs if m["role"] == "assistant")
        got = tok.decode([t for t, m in zip(ids, mask, strict=False) if m])
        if len(ids) == 513:  # truncated to the sequence: its targets are a prefix
            truncated += 1
            assert want.startswith(got)
        else:
            assert got == want
        # markers never targets
        assert all(m == 0 for t, m in zip(ids, mask, strict=False) if t in tok.special_ids.values())
    assert truncated == summary.sft["truncated"]


def test_sft_dataset_pads_and_shifts(sft_data, science_tokenizer):
    from scidfm_megatron.data.sft import SFTDataset

    prefix, _ = sft_data
    ds = SFTDataset(str(prefix), 512, science_tokenizer.pad_id)
    item = ds[len(ds) - 1]
    raw = ds.tokens[len(ds) - 1].tolist()
    n = len(raw) - 1
    assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (512,)
    assert item["tokens"][:n + 1].tolist() == raw and item["labels"][:n].tolist() == raw[1:]
    assert item["loss_mask"][n:].sum() == 0 and (item["tokens"][n + 1:] == science_tokenizer.pad_id).all()
    assert item["loss_mask"][:n].tolist() == ds.mask[len(ds) - 1].tolist()[1:]


def test_sft_bad_conversations_are_rejected_by_line(tmp_path, science_tokenizer_dir):
    from scidfm_megatron.data.preprocess import preprocess

    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"messages": "not a list"}),
        json.dumps({"conversation": []}),
    ]) + "\n")
    s = preprocess([str(src)], str(tmp_path / "s"), str(science_tokenizer_dir / "tokenizer.model"),
                   sft_seq_length=64, progress=False)
    reasons = {r.line: r.reason for r in s.rejections}
    assert s.documents["messages"] == 1 and s.rejected == 4
    assert "no assistant turn" in reasons[2] and "role must be one of" in reasons[3]
    assert "non-empty list" in reasons[4] and "missing key 'messages'" in reasons[5]


def test_epoch_two_orders_a_source_differently(tmp_path, sample_datasets, science_tokenizer):
    """A source that is not re-sampled: epoch 2's first samples are not epoch 1's, and epoch 2 is
    reproducible (a resumed stage 2 sees the same order)."""
    from scidfm_megatron.data.datasets import build_pretrain_datasets

    recipe = {"name": "epochs", "unit": "tokens", "data_root": sample_datasets["dir"], "sources": [
        {"name": "papers", "domain": "papers", "category": "science", "tokens": 50, "data": "papers_text_document"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    mix = Mixture.load(tmp_path / "r.yaml")

    def first(epoch, n=16):
        train, _, _ = build_pretrain_datasets(mix, epoch, science_tokenizer, seq_length=64, samples=(n, 0, 0),
                                              split="100,0,0")
        return np.stack([np.asarray(train[i]["tokens"]) for i in range(n)])

    e1, e2 = first(1), first(2)
    assert not np.array_equal(e1, e2)
    # not the same windows in the same order
    assert sum(np.array_equal(a, b) for a, b in zip(e1, e2, strict=False)) <= 2
    assert np.array_equal(e2, first(2))


def test_a_longer_plan_keeps_every_sample_of_the_shorter(tmp_path, sample_datasets, science_tokenizer_dir,
                                                         science_tokenizer):
    """Issue 22: lengthening a run (6 -> 8 global batches of 8) keeps the first 48 samples, also when the
    longer plan needs a second epoch of a small source (data/datasets.py: per-epoch shuffles). megatron's
    own GPTDataset reorders that source from its first sample (the test's control); with one epoch planned
    the index is megatron's, array for array. The same plans through the CLI, bitwise, with a resume:
    tests/test_training.py::test_distributed_optimizer_checkpoint_resumes."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from conftest import small_source_mixture
    from scidfm_megatron.data.datasets import build_pretrain_datasets

    mix = Mixture.load(small_source_mixture(science_tokenizer_dir / "tokenizer.model", sample_datasets["dir"],
                                            tmp_path))

    def plan(n, cls=None):
        train, _, _ = build_pretrain_datasets(mix, 1, science_tokenizer, seq_length=64, samples=(n, 0, 0),
                                              split="90,10,0", gpt_class=cls)
        epochs = [len(d.document_index) // len(d.indices) for d in train.datasets]
        return epochs, np.stack([np.asarray(train[i]["tokens"]) for i in range(48)]), train.datasets

    (e6, s6, d6), (e8, s8, _) = plan(48), plan(64)
    assert e6 == [1, 1] and e8 == [1, 2]  # papers within its epoch; the small source gets a second one
    assert np.array_equal(s6, s8)
    (_, m6, g6), (_, m8, _) = plan(48, GPTDataset), plan(64, GPTDataset)
    assert not np.array_equal(m6, m8)  # megatron's index: the small source reordered
    assert np.array_equal(s6, m6)  # one epoch planned: megatron's order
    for ours, theirs in zip(d6, g6, strict=False):
        for name in ("document_index", "sample_index", "shuffle_index"):
            assert np.array_equal(getattr(ours, name), getattr(theirs, name)), name
