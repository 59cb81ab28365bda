"""Evaluation harness and expert-choice analysis (issue 6): discrimination, megatron == HF, E_T, lm-eval."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch

from conftest import ROOT
from scidfm_megatron.eval.models import LanguageModel
from scidfm_megatron.eval.tasks import TASKS, TaskDataError, load_records, run_task
from scidfm_megatron.testing.distributed import cpu_env
from scidfm_megatron.testing.runs import console_script

DATA = ROOT / "examples" / "eval" / "data"
FIXTURES = {  # task name -> fixture file (one per task kind)
    "sciq": "multiple_choice.jsonl", "gsm8k": "math_generation.jsonl",
    "mol_design": "molecule_generation.jsonl", "protein_function": "protein_understanding.jsonl",
    "bbbp": "moleculenet.jsonl",
}


class _Fake(LanguageModel):
    """Answers from the records themselves (oracle) or nothing at all (constant). It finds the record a
    request belongs to by its text, so it does not depend on how the harness formats prompts."""

    def __init__(self, tokenizer, records, oracle: bool):
        self.tokenizer, self.records, self.oracle = tokenizer, records, oracle

    def _record(self, prompt_ids):
        from scidfm_megatron.tokenizer import wrap_molecule

        text = self.tokenizer.decode(prompt_ids)
        keys = [(str(r.get("question", r.get("input"))), wrap_molecule(r["smiles"]) if "smiles" in r else "")
                for r in self.records]
        hits = [(len(q) + len(m), i) for i, (q, m) in enumerate(keys) if q in text and m in text]
        assert hits, text[:200]
        return self.records[max(hits)[1]]

    def loglikelihood(self, requests, batch_size=8):
        if not self.oracle:
            return [0.0] * len(requests)
        out = []
        for ctx, cont in requests:
            r = self._record(ctx)
            said = self.tokenizer.decode(cont).strip()
            right = r["choices"][r["answer"]] if "choices" in r else ("Yes" if r["label"] == 1 else "No")
            out.append(0.0 if said == str(right) else -10.0)
        return out

    def generate(self, prompts, max_new_tokens, stop_ids=(), batch_size=8):
        if not self.oracle:
            return [[] for _ in prompts]
        out = []
        for p in prompts:
            r = self._record(p)
            if "output" in r and self.tokenizer.decode(p).endswith("[START_I_SMILES]"):
                ids = self.tokenizer.encode(f"[START_I_SMILES]{r['output']}[END_I_SMILES]")[1:-1]
            elif "output" in r:
                ids = self.tokenizer.encode(" " + r["output"], continuation=True)
            else:  # a multi-paragraph solution: the answer comes after a blank line
                ids = self.tokenizer.encode(f" Let me think.\n\nSo the result is \\boxed{{{r['answer']}}}.\n\n"
                                            f"#### {r['answer']}", continuation=True)
            out.append(ids)
        return out


@pytest.mark.parametrize("fmt", ["chat", "raw"])
@pytest.mark.parametrize("oracle", [True, False], ids=["oracle", "constant"])
def test_scoring_path_discriminates(science_tokenizer, oracle, fmt):
    """Given the answers, every metric is perfect; a constant model gets chance (and nothing right), in
    both prompt formats and for every task kind (GSM8K and MATH scored separately)."""
    runs = [(n, DATA / f, None) for n, f in FIXTURES.items()]
    runs.append(("math", DATA / "math_generation.jsonl", "minerva"))
    for name, path, only in runs:
        task = TASKS[name]
        recs = load_records(path, task.kind)
        if task.kind == "math":
            recs = [r for r in recs if ("minerva" in r["source"]) == (only == "minerva")]
        m, _ = run_task(_Fake(science_tokenizer, recs, oracle), task, recs, progress=False, prompt_format=fmt)
        if task.kind == "multiple_choice":
            first = 100 * np.mean([r["answer"] == 0 for r in recs])  # ties go to the first choice
            assert m["acc"] == (100.0 if oracle else pytest.approx(first)) and 0 < first < 100
        elif task.kind == "math" and name == "gsm8k":
            assert m["strict_match"] == m["flexible_extract"] == (100.0 if oracle else 0.0)
        elif task.kind == "math":
            assert m["acc"] == (100.0 if oracle else 0.0) and len(recs) == 4
        elif task.kind == "molecule_generation":
            want = dict(exact=1.0, levenshtein=0.0, rdk_fts=1.0, maccs_fts=1.0, morgan_fts=1.0, validity=1.0) \
                if oracle else dict(exact=0.0, validity=0.0, levenshtein=None, morgan_fts=0.0)
            assert {k: pytest.approx(v) if v is not None else None for k, v in want.items()} == {k: m[k] for k in want}
        elif task.kind == "protein_understanding":
            assert m["rouge_l"] == pytest.approx(1.0 if oracle else 0.0)
        else:
            assert m["auc_roc"] == pytest.approx(100.0 if oracle else 50.0)
            assert len(m["auc_per_task"]) == 2  # the fixture's two questions are two tasks


def test_chat_prompt_is_the_sft_template(science_tokenizer):
    """--prompt-format chat scores exactly the tokens SFT trains on: the prompt is the conversation up to
    the assistant's answer (tokenizer.core.encode_chat, what preprocess.py writes) and the scored answer is
    the assistant's content; raw is plain text with " " + answer."""
    from scidfm_megatron.eval.tasks import Prompter
    from scidfm_megatron.tokenizer.core import encode_chat

    class _M:
        tokenizer = science_tokenizer

        def encode(self, text, bos=False):
            return science_tokenizer.encode(text, allow_special=True, bos=bos)

    text = "Question: Is [START_I_SMILES]CCO[END_I_SMILES] an alcohol?"
    ids, mask = encode_chat(science_tokenizer,
                            [{"role": "user", "content": text}, {"role": "assistant", "content": "Yes"}])
    k = mask.index(1)
    chat = Prompter(_M(), "chat")
    assert chat.prompt(text) == ids[:k]
    target = [i for i, m in zip(ids, mask, strict=False) if m]  # the assistant's content, then </s>
    assert chat.continuation("Yes") == target[:-1] and target[-1] == science_tokenizer.eos_id
    assert science_tokenizer.decode(chat.prompt(text)).endswith("<|assistant|>")
    raw = Prompter(_M(), "raw")
    assert raw.prompt(text, raw_suffix="\nAnswer:") == science_tokenizer.encode(text + "\nAnswer:", allow_special=True,
                                                                                bos=True)
    assert raw.continuation("Yes") == science_tokenizer.encode(" Yes", continuation=True) != chat.continuation("Yes")
    with pytest.raises(TaskDataError, match="prompt format must be one of"):
        Prompter(_M(), "alpaca")


def test_bad_task_file_names_the_line(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q2", "choices": ["a"]}\n')
    rejected = []
    assert len(load_records(bad, "multiple_choice", rejected=rejected)) == 1  # the good line is kept
    assert rejected == [f"{bad}:2: missing field(s) ['answer']; a multiple_choice task needs "
                        f"['question', 'choices', 'answer']"]
    with pytest.raises(TaskDataError, match=r"mc.jsonl:2: missing field\(s\) \['answer'\]"):
        load_records(bad, "multiple_choice", strict=True)
    r = subprocess.run([*console_script("scidfm-evaluate"), "--model", str(tmp_path), "--task", f"sciq={bad}",
                        "--strict"], capture_output=True, text=True, env=cpu_env(), cwd=ROOT)
    assert r.returncode == 2 and "mc.jsonl:2" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def both_models(trained_tiny, hf_tiny):
    from scidfm_megatron.eval.models import HFModel, MegatronModel

    mg = MegatronModel(trained_tiny)
    yield mg, HFModel(hf_tiny)
    mg.close()


def test_megatron_checkpoint_and_its_conversion_score_the_same(both_models):
    from scidfm_megatron.eval.harness import evaluate, format_table

    tasks = [(n, DATA / f) for n, f in FIXTURES.items()]
    mg, hf = (evaluate(m, tasks, limit=8, max_new_tokens=8, progress=False) for m in both_models)
    for name in FIXTURES:
        a, b = mg[name], hf[name]
        assert a["n"] == b["n"] == 8
        for k, v in a["metrics"].items():
            w = b["metrics"][k]
            assert (v == pytest.approx(w, abs=1e-6)) if isinstance(v, (int, float)) else \
                ({**v} == pytest.approx(w, abs=1e-6) if isinstance(v, dict) else v == w), (name, k)
        for sa, sb in zip(a["samples"], b["samples"], strict=False):
            if "loglik" in sa:
                np.testing.assert_allclose(sa["loglik"], sb["loglik"], atol=1e-4)
                assert sa["pred"] == sb["pred"]
            else:
                assert {k: v for k, v in sa.items() if k != "p_yes"} == {k: v for k, v in sb.items() if k != "p_yes"}
    table = format_table(hf)
    for t in ("Table 4", "Table 7", "Table 8", "Table 9"):  # the paper's layout, its SciDFM row beside ours
        assert t in table
    assert table.count("SciDFM (paper)") == 4 and "88.00" in table and "0.704" in table and "0.60" in table
    assert hf["gsm8k"]["prompt_format"] == "chat"


def test_expert_choice_analysis(both_models, tmp_path):
    """E_T: one block of num_experts per layer, each a distribution; captured by the megatron router hook
    and by transformers' router logits alike; PNGs and the separation score are written."""
    from scidfm_megatron.eval.experts import analyze, domain_texts, expert_choice_vector

    mg, hf = both_models
    groups = domain_texts(ROOT / "examples" / "sample_corpus", per_domain=6)
    assert {"molecules", "proteins", "papers: chemistry", "papers: math"} <= set(groups)
    summary = analyze(mg, groups, tmp_path / "experts", max_tokens=64, progress=False)
    data = np.load(tmp_path / "experts" / "expert_choice.npz")
    E = data["E_T"]
    n = sum(len(v) for v in groups.values())
    assert E.shape == (n, 4 * 8) and data["tsne"].shape == (n, 3)
    np.testing.assert_allclose(E.reshape(n, 4, 8).sum(-1), 1.0, atol=1e-9)
    assert (E > 0).all() and E.std(0).max() > 1e-3  # texts differ in their expert choice
    assert -1 <= summary["silhouette_et"] <= 1 and summary["num_layers"] == 4
    for png in ("expert_choice_tsne.png", "expert_usage_heatmaps.png"):
        assert (tmp_path / "experts" / png).read_bytes()[:4] == b"\x89PNG"
    text = groups["proteins"][0]
    np.testing.assert_allclose(expert_choice_vector(mg, text, 64), expert_choice_vector(hf, text, 64), atol=1e-5)
    # E_T follows its definition: softmax over experts of the summed gate logits, per layer
    from scidfm_megatron.eval.experts import gate_logit_sums

    ids = mg.encode(text, bos=True)[:64]
    g = gate_logit_sums(hf, ids)
    want = torch.exp(g.double() - torch.logsumexp(g.double(), -1, keepdim=True)).reshape(-1).numpy()
    np.testing.assert_allclose(expert_choice_vector(hf, text, 64), want, atol=1e-12)


def test_lm_eval_runs_offline_on_the_converted_model(hf_tiny, both_models):
    """lm-eval (hf model, local task) on the converted tiny model: a score, and the same per-choice
    log-likelihoods and accuracy as this project's harness on the same questions."""
    from scidfm_megatron.eval.lm_eval_local import run_lm_eval

    res = run_lm_eval(str(hf_tiny), str(DATA / "multiple_choice.jsonl"), limit=8, batch_size=4)
    assert res["n"] == 8 and 0.0 <= res["acc"] <= 1.0
    recs = load_records(DATA / "multiple_choice.jsonl", "multiple_choice", 8)
    m, samples = run_task(both_models[1], TASKS["sciq"], recs, progress=False, prompt_format="raw")
    for ours, theirs in zip(samples, res["samples"], strict=False):
        np.testing.assert_allclose(ours["loglik"], theirs["loglikelihoods"], atol=1e-4)
    assert m["acc"] == pytest.approx(100 * res["acc"])
    assert math.isfinite(res["acc_norm"])


def test_suite_paper_cli(hf_tiny, tmp_path, capsys):
    """--suite paper finds <task>.jsonl files, prints the paper's tables beside SciDFM's row and records
    the prompt format in the results JSON; an empty folder is an error (exit 2)."""
    from scidfm_megatron.cli.evaluate import main

    d = tmp_path / "tasks"
    d.mkdir()
    for name, f in (("sciq", "multiple_choice.jsonl"), ("bbbp", "moleculenet.jsonl")):
        (d / f"{name}.jsonl").write_text((DATA / f).read_text())
    out = tmp_path / "r.json"
    assert main(["--model", str(hf_tiny), "--suite", "paper", "--data-dir", str(d), "--limit", "4",
                 "--prompt-format", "raw", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Table 4" in printed and "Table 7" in printed and "88.00" in printed and "64.8" in printed
    res = json.loads(out.read_text())
    assert res["prompt_format"] == "raw" and set(res["results"]) == {"sciq", "bbbp"}
    assert res["results"]["sciq"]["prompt_format"] == "raw"
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(hf_tiny), "--suite", "paper", "--data-dir", str(tmp_path / "empty")]) == 2
    assert "no task files" in capsys.readouterr().err
