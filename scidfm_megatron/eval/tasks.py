"""Zero-shot tasks of the SciDFM paper (Tables 4-9) over local JSONL files.

Each task has a *kind* (how it is prompted and scored) and reads one JSONL file whose fields the kind
defines (the benchmarks cannot be downloaded here; convert yours to these fields):

====================  ===========================================================  =========================
kind                  fields                                                       metrics
====================  ===========================================================  =========================
multiple_choice       question, choices [str], answer (index), optional context    acc, acc_norm (%)
math                  question, answer (final answer: GSM8K number / MATH latex)   acc (%)
molecule_generation   instruction, input, output (SMILES)                          exact, levenshtein, rdk /
                                                                                   maccs / morgan FTS, validity
protein_understanding instruction, input (sequence), output (text)                 rouge_l
moleculenet           smiles, question, label (0/1)                                auc_roc (%)
====================  ===========================================================  =========================

Prompts (zero-shot, plain text; molecules and proteins inside the tokenizer's span markers, as in
pretraining):

* multiple choice: ``[context\\n]Question: {question}\\nAnswer:`` scored on ``" " + choice`` by summed
  log-likelihood (``acc``) and per-character log-likelihood (``acc_norm``), lm-eval's conventions.
* math: ``Question: {question}\\nAnswer:``, greedy up to ``max_new_tokens`` until a blank line or EOS;
  GSM8K answers by the number after ``####`` or the last number, MATH by the last ``\\boxed{}``.
* molecule generation: ``{instruction}\\n{input}\\nAnswer: [START_I_SMILES]``; the prediction is the
  greedy text up to ``[END_I_SMILES]`` (scored like Mol-Instructions).
* protein understanding: ``{instruction}\\n[START_AMINO]{input}[END_AMINO]\\nAnswer:``, greedy to the
  end of the line; ROUGE-L against the reference.
* MoleculeNet: ``[START_I_SMILES]{smiles}[END_I_SMILES]\\nQuestion: {question}\\nAnswer:``; the score is
  P(" Yes") / (P(" Yes") + P(" No")), AUC-ROC over the file (the paper's yes/no probabilities).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import metrics
from ..tokenizer.core import wrap_molecule, wrap_protein

KIND_FIELDS = {
    "multiple_choice": ("question", "choices", "answer"),
    "math": ("question", "answer"),
    "molecule_generation": ("instruction", "input", "output"),
    "protein_understanding": ("instruction", "input", "output"),
    "moleculenet": ("smiles", "question", "label"),
}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    paper_table: str
    answer_style: str = "gsm8k"  # math only: gsm8k | math


TASKS = {t.name: t for t in [
    *(Task(n, "multiple_choice", "Table 4") for n in
      ("sciq", "arc_easy", "arc_challenge", "medmcqa", "medqa", "pubmedqa", "scieval", "mmlu", "multiple_choice")),
    Task("gsm8k", "math", "Table 4", "gsm8k"),
    Task("math", "math", "Table 4", "math"),
    Task("mol_instructions_molecule", "molecule_generation", "Table 8"),
    Task("mol_instructions_protein", "protein_understanding", "Table 9"),
    *(Task(n, "moleculenet", "Table 6") for n in ("bace", "bbbp", "clintox", "hiv", "tox21", "moleculenet")),
]}


class TaskDataError(ValueError):
    pass


def load_records(path: str | Path, kind: str, limit: Optional[int] = None) -> list[dict]:
    """Records of a task file, checked: a missing field or wrong type names the file and line."""
    p = Path(path)
    if not p.exists():
        raise TaskDataError(f"{p}: no such data file")
    out = []
    with open(p, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise TaskDataError(f"{p}:{no}: not JSON ({exc})") from None
            missing = [k for k in KIND_FIELDS[kind] if k not in rec]
            if missing:
                raise TaskDataError(f"{p}:{no}: missing field(s) {missing}; a {kind} task needs "
                                    f"{list(KIND_FIELDS[kind])}")
            if kind == "multiple_choice" and not (isinstance(rec["choices"], list) and len(rec["choices"]) > 1
                                                  and isinstance(rec["answer"], int)
                                                  and 0 <= rec["answer"] < len(rec["choices"])):
                raise TaskDataError(f"{p}:{no}: 'choices' must be a list of >= 2 strings and 'answer' an index into it")
            if kind == "moleculenet" and rec["label"] not in (0, 1):
                raise TaskDataError(f"{p}:{no}: 'label' must be 0 or 1, got {rec['label']!r}")
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise TaskDataError(f"{p}: no records")
    return out


# ---------------------------------------------------------------------------------------- scoring
def _mc(model, recs, bs, progress):
    reqs, owner = [], []
    for i, r in enumerate(recs):
        ctx = model.encode((r["context"] + "\n" if r.get("context") else "") + f"Question: {r['question']}\nAnswer:",
                           bos=True)
        for c in r["choices"]:
            reqs.append((ctx, model.tokenizer.encode(" " + str(c), allow_special=True, continuation=True)))
            owner.append(i)
    ll = _batched(model.loglikelihood, reqs, bs, progress, "choices")
    preds, norm_preds, k = [], [], 0
    samples = []
    for r in recs:
        n = len(r["choices"])
        scores = ll[k:k + n]
        k += n
        normed = [s / max(1, len(" " + str(c))) for s, c in zip(scores, r["choices"])]
        preds.append(max(range(n), key=lambda j: scores[j]))
        norm_preds.append(max(range(n), key=lambda j: normed[j]))
        samples.append(dict(answer=r["answer"], pred=preds[-1], pred_norm=norm_preds[-1], loglik=scores))
    golds = [r["answer"] for r in recs]
    return dict(acc=100 * metrics.accuracy(preds, golds), acc_norm=100 * metrics.accuracy(norm_preds, golds)), samples


def _generate(model, prompts, max_new, stop, bs, progress):
    return _batched(lambda p, batch_size: model.generate(p, max_new, stop, batch_size=batch_size), prompts, bs,
                    progress, "generations")


def _math(model, recs, bs, progress, style, max_new):
    tok = model.tokenizer
    prompts = [model.encode(f"Question: {r['question']}\nAnswer:", bos=True) for r in recs]
    outs = _generate(model, prompts, max_new, [tok.eos_id, tok.special_ids.get("<|eod|>", tok.eos_id)], bs, progress)
    preds, samples = [], []
    for r, o in zip(recs, outs):
        text = tok.decode(o).split("\n\n")[0]
        pred = _extract_answer(text, style)
        gold = str(r["answer"])
        if "####" in gold:  # a full GSM8K solution: its final answer
            gold = metrics.extract_gsm8k_answer(gold) or gold
        ok = pred is not None and metrics.math_answers_equal(pred, gold)
        preds.append(ok)
        samples.append(dict(generation=text, pred=pred, gold=gold, correct=ok))
    return dict(acc=100 * sum(preds) / len(preds)), samples


def _extract_answer(text: str, style: str) -> Optional[str]:
    """The final answer of a generation: a ``\\boxed{}`` (MATH style) wins, then what follows ``####``
    (GSM8K style; a number is cleaned), then the task's own convention (last number / "The answer is")."""
    if "\\boxed" in text:
        return metrics.extract_math_answer(text)
    if "####" in text:
        tail = text.split("####")[-1].strip().split("\n")[0].strip()
        return metrics.extract_gsm8k_answer(text) if re.fullmatch(r"[-+$\d,.\s]+", tail) else tail
    return (metrics.extract_gsm8k_answer if style == "gsm8k" else metrics.extract_math_answer)(text)


def _molgen(model, recs, bs, progress, max_new):
    tok = model.tokenizer
    end = tok.special_ids["[END_I_SMILES]"]
    prompts = [model.encode(f"{r['instruction']}\n{r['input']}\nAnswer: [START_I_SMILES]", bos=True) for r in recs]
    outs = _generate(model, prompts, max_new, [end, tok.eos_id], bs, progress)
    preds = [tok.decode(o, skip_special=True).strip() for o in outs]
    refs = [r["output"] for r in recs]
    scores = metrics.molecule_generation_scores(preds, refs)
    return scores, [dict(pred=p, ref=r) for p, r in zip(preds, refs)]


def _protein(model, recs, bs, progress, max_new):
    tok = model.tokenizer
    prompts = [model.encode(f"{r['instruction']}\n{wrap_protein(r['input'])}\nAnswer:", bos=True) for r in recs]
    outs = _generate(model, prompts, max_new, [tok.eos_id], bs, progress)
    preds = [tok.decode(o, skip_special=True).split("\n")[0].strip() for o in outs]
    refs = [r["output"] for r in recs]
    return dict(rouge_l=metrics.mean_rouge_l(preds, refs)), [dict(pred=p, ref=r) for p, r in zip(preds, refs)]


def _moleculenet(model, recs, bs, progress):
    reqs = []
    for r in recs:
        ctx = model.encode(f"{wrap_molecule(r['smiles'])}\nQuestion: {r['question']}\nAnswer:", bos=True)
        for word in (" Yes", " No"):
            reqs.append((ctx, model.tokenizer.encode(word, allow_special=True, continuation=True)))
    ll = _batched(model.loglikelihood, reqs, bs, progress, "yes/no")
    scores = []
    for i in range(len(recs)):
        y, n = ll[2 * i], ll[2 * i + 1]
        m = max(y, n)
        scores.append(math.exp(y - m) / (math.exp(y - m) + math.exp(n - m)))
    labels = [int(r["label"]) for r in recs]
    return (dict(auc_roc=100 * metrics.auc_roc(labels, scores)),
            [dict(label=l_, p_yes=s) for l_, s in zip(labels, scores)])


def _batched(fn: Callable, items: list, bs: int, progress: bool, what: str) -> list:
    """Call ``fn(chunk, batch_size=bs)`` over chunks of items with a progress bar."""
    from tqdm import tqdm

    out = []
    step = max(bs * 4, 1)
    with tqdm(total=len(items), desc=what, unit="req", disable=not progress, leave=False) as bar:
        for s in range(0, len(items), step):
            out.extend(fn(items[s:s + step], batch_size=bs))
            bar.update(min(step, len(items) - s))
    return out


def run_task(model, task: Task, records: list[dict], *, batch_size: int = 8, progress: bool = True,
             max_new_tokens: Optional[int] = None) -> tuple[dict, list[dict]]:
    """(metrics, per-sample details) of ``model`` on ``records``."""
    if task.kind == "multiple_choice":
        return _mc(model, records, batch_size, progress)
    if task.kind == "math":
        return _math(model, records, batch_size, progress, task.answer_style, max_new_tokens or 256)
    if task.kind == "molecule_generation":
        return _molgen(model, records, batch_size, progress, max_new_tokens or 128)
    if task.kind == "protein_understanding":
        return _protein(model, records, batch_size, progress, max_new_tokens or 64)
    if task.kind == "moleculenet":
        return _moleculenet(model, records, batch_size, progress)
    raise ValueError(f"unknown task kind {task.kind!r}")
