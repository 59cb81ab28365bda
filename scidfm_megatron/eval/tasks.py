"""Zero-shot tasks of the SciDFM paper (Tables 4, 7, 8, 9) over local JSONL files: each task kind's fields,
prompts and scoring (docs/evaluation.md, "Task files and converters" and "Prompt formats")."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import TaskDataError  # re-export: defined in scidfm_megatron/errors.py
from ..tokenizer.core import chat_segments, wrap_molecule, wrap_protein
from . import metrics

KIND_FIELDS = {
    "multiple_choice": ("question", "choices", "answer"),
    "math": ("question", "answer"),
    "molecule_generation": ("instruction", "input", "output"),
    "protein_understanding": ("instruction", "input", "output"),
    "moleculenet": ("smiles", "question", "label"),
}
PROMPT_FORMATS = ("chat", "raw")


@dataclass(frozen=True)
class Task:
    """A benchmark of the paper: its kind (how it is prompted and scored) and where it is reported."""
    name: str
    kind: str
    paper_table: str
    answer_style: str = "gsm8k"  # math only: gsm8k | math
    paper_name: str = ""  # the column / row name in the paper's table


TASKS = {t.name: t for t in [
    *(Task(n, "multiple_choice", "Table 4", paper_name=p) for n, p in
      (("scieval", "SciEval"), ("sciq", "SciQ"), ("arc_challenge", "ARC-C"), ("arc_easy", "ARC-E"),
       ("medqa", "MedQA"), ("medmcqa", "MedMCQA"), ("pubmedqa", "PubMedQA"), ("mmlu", ""),
       ("multiple_choice", ""))),
    Task("gsm8k", "math", "Table 4", "gsm8k", "GSM8K"),
    Task("math", "math", "Table 4", "math", "MATH"),
    *(Task(n, "moleculenet", "Table 7", paper_name=p) for n, p in
      (("bace", "BACE"), ("bbbp", "BBBP"), ("clintox", "ClinTox"), ("hiv", "HIV"), ("tox21", "Tox21"),
       ("moleculenet", ""))),
    *(Task(n, "molecule_generation", "Table 8", paper_name=p) for n, p in
      (("mol_design", "description-guided molecule design"), ("reagent_prediction", "reagent prediction"),
       ("retrosynthesis", "retrosynthesis"), ("forward_reaction_prediction", "forward reaction prediction"),
       ("mol_instructions_molecule", ""))),
    *(Task(n, "protein_understanding", "Table 9", paper_name=p) for n, p in
      (("protein_function", "protein function"), ("functional_description", "functional description"),
       ("catalytic_activity", "catalytic activity"), ("domain_motif", "domain/motif"),
       ("mol_instructions_protein", ""))),
]}


def _record_problem(rec, kind: str) -> Optional[str]:
    from ..utils import lone_surrogate

    if not isinstance(rec, dict):
        return "expected a JSON object per line"
    missing = [k for k in KIND_FIELDS[kind] if k not in rec]
    if missing:
        return f"missing field(s) {missing}; a {kind} task needs {list(KIND_FIELDS[kind])}"
    if kind == "multiple_choice" and not (isinstance(rec["choices"], list) and len(rec["choices"]) > 1
                                          and isinstance(rec["answer"], int)
                                          and 0 <= rec["answer"] < len(rec["choices"])):
        return "'choices' must be a list of >= 2 strings and 'answer' an index into it"
    if kind == "moleculenet" and rec["label"] not in (0, 1):
        return f"'label' must be 0 or 1, got {rec['label']!r}"
    bad = lone_surrogate(rec)
    if bad:
        return bad + " (not valid Unicode: an emoji or character cut in half?)"
    return None


def load_records(path: str | Path, kind: str, limit: Optional[int] = None, strict: bool = False,
                 rejected: Optional[list] = None) -> list[dict]:
    """Records of a task file, checked. A bad line (not JSON, not an object, a missing field or wrong type,
    text holding a lone surrogate) is skipped and reported as ``file:line: reason`` in ``rejected``
    (every good line is kept); ``strict`` raises TaskDataError at the first one instead."""
    from ..utils import decode_line

    p = Path(path)
    if not p.exists():
        raise TaskDataError(f"{p}: no such data file")
    out: list[dict] = []
    with open(p, "rb") as f:
        for no, raw in enumerate(f, 1):
            rec: Any = None  # parsed JSON, checked by _record_problem before it is kept
            line, reason = decode_line(raw)
            if line is not None and not line.strip():
                continue
            if reason is None:
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    reason = f"not JSON ({exc})"
            if reason is None:
                reason = _record_problem(rec, kind)
            if reason:
                if strict:
                    raise TaskDataError(f"{p}:{no}: {reason}")
                if rejected is not None:
                    rejected.append(f"{p}:{no}: {reason}")
                continue
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise TaskDataError(f"{p}: no records")
    return out


class Prompter:
    """Token ids of a task's prompt in the chosen format (see the module docstring)."""

    def __init__(self, model, prompt_format: str = "chat"):
        if prompt_format not in PROMPT_FORMATS:
            raise TaskDataError(f"prompt format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.model, self.tok, self.format = model, model.tokenizer, prompt_format
        if prompt_format == "chat" and getattr(self.tok, "kind", "science") == "plain":
            raise TaskDataError(f"--prompt-format chat needs the chat markers of a science tokenizer; this model's "
                                f"tokenizer ({self.tok.model_file}) is a plain SentencePiece model: "
                                f"use --prompt-format raw")

    def prompt(self, text: str, raw_suffix: str = "", answer_prefix: str = "") -> list[int]:
        """raw: ``<s>{text}{raw_suffix}{answer_prefix}``; chat: the user turn ``text`` then ``<|assistant|>``
        and ``answer_prefix`` (the start of the assistant's answer)."""
        if self.format == "raw":
            return self.model.encode(text + raw_suffix + answer_prefix, bos=True)
        rendered = "".join(t for t, _ in chat_segments([{"role": "user", "content": text}], add_generation_prompt=True))
        ids = self.tok.encode(rendered, allow_special=True)
        if answer_prefix:
            ids += self.tok.encode(answer_prefix, allow_special=True, continuation=True)
        return ids

    def continuation(self, answer: str) -> list[int]:
        """Ids of a scored answer: ``" " + answer`` after raw text, ``answer`` as the assistant's text."""
        if self.format == "raw":
            return self.tok.encode(" " + str(answer), allow_special=True, continuation=True)
        return self.tok.encode(str(answer), allow_special=True, continuation=True)

    def stop_ids(self) -> list[int]:
        ids = [self.tok.eos_id, self.tok.special_ids.get("<|eod|>", self.tok.eos_id)]
        if self.format == "chat":
            ids.append(self.tok.special_ids.get("<|user|>", self.tok.eos_id))
        return ids


# ---------------------------------------------------------------------------------------- scoring
def _mc(pr: Prompter, recs, bs, progress):
    reqs = []
    for r in recs:
        ctx = pr.prompt((r["context"] + "\n" if r.get("context") else "") + f"Question: {r['question']}",
                        raw_suffix="\nAnswer:")
        for c in r["choices"]:
            reqs.append((ctx, pr.continuation(c)))
    ll = _batched(pr.model.loglikelihood, reqs, bs, progress, "choices")
    preds, norm_preds, k = [], [], 0
    samples = []
    for r in recs:
        n = len(r["choices"])
        scores = ll[k:k + n]
        k += n
        width = 1 if pr.format == "raw" else 0  # the leading space is part of the scored text in raw
        normed = [s / max(1, len(str(c)) + width) for s, c in zip(scores, r["choices"], strict=False)]
        preds.append(max(range(n), key=lambda j: scores[j]))
        norm_preds.append(max(range(n), key=lambda j: normed[j]))
        samples.append(dict(answer=r["answer"], pred=preds[-1], pred_norm=norm_preds[-1], loglik=scores))
    golds = [r["answer"] for r in recs]
    return dict(acc=100 * metrics.accuracy(preds, golds), acc_norm=100 * metrics.accuracy(norm_preds, golds)), samples


def _generate(model, prompts, max_new, stop, bs, progress):
    return _batched(lambda p, batch_size: model.generate(p, max_new, stop, batch_size=batch_size), prompts, bs,
                    progress, "generations")


def _math(pr: Prompter, recs, bs, progress, style, max_new):
    until = metrics.gsm8k_config()["until"]
    prompts = [pr.prompt(r["question"] if pr.format == "chat" else f"Question: {r['question']}",
                         raw_suffix="\nAnswer:") for r in recs]
    outs = _generate(pr.model, prompts, max_new, pr.stop_ids(), bs, progress)
    texts = [metrics.cut_at_stop_sequences(pr.tok.decode(o), until) for o in outs]
    golds = [str(r["answer"]) for r in recs]
    if style == "gsm8k":
        scores, per = metrics.gsm8k_scores(texts, golds)
        scores["acc"] = scores["strict_match"]
    else:
        scores, per = metrics.math_scores(texts, golds)
    return scores, [dict(generation=t, **dict(dict(gold=g), **d)) for t, g, d in zip(texts, golds, per, strict=False)]


def _molgen(pr: Prompter, recs, bs, progress, max_new, convention="mol_instructions"):
    tok = pr.tok
    end = tok.special_ids.get("[END_I_SMILES]")  # a plain tokenizer has no span tokens: cut at the text below
    prompts = [pr.prompt(f"{r['instruction']}\n{r['input']}", raw_suffix="\nAnswer: ",
                         answer_prefix="[START_I_SMILES]") for r in recs]
    outs = _generate(pr.model, prompts, max_new, ([end] if end is not None else []) + pr.stop_ids(), bs, progress)
    preds = [tok.decode(o, skip_special=True).split("[END_I_SMILES]")[0].strip() for o in outs]
    refs = [r["output"] for r in recs]
    scores = metrics.molecule_generation_scores(preds, refs, convention=convention)
    scores["convention"] = convention
    return scores, [dict(pred=p, ref=r) for p, r in zip(preds, refs, strict=False)]


def _protein(pr: Prompter, recs, bs, progress, max_new):
    prompts = [pr.prompt(f"{r['instruction']}\n{wrap_protein(r['input'])}", raw_suffix="\nAnswer:") for r in recs]
    outs = _generate(pr.model, prompts, max_new, pr.stop_ids(), bs, progress)
    texts = [pr.tok.decode(o, skip_special=True) for o in outs]
    preds = [(t.split("\n")[0] if pr.format == "raw" else t).strip() for t in texts]
    refs = [r["output"] for r in recs]
    scores = metrics.mol_instructions_rouge_l(preds, refs)
    return scores, [dict(pred=p, ref=r, rouge_l=metrics.rouge_l(p, r)) for p, r in zip(preds, refs, strict=False)]


def _moleculenet(pr: Prompter, recs, bs, progress):
    reqs = []
    for r in recs:
        ctx = pr.prompt(f"{wrap_molecule(r['smiles'])}\nQuestion: {r['question']}", raw_suffix="\nAnswer:")
        for word in ("Yes", "No"):
            reqs.append((ctx, pr.continuation(word)))
    ll = _batched(pr.model.loglikelihood, reqs, bs, progress, "yes/no")
    scores = []
    for i in range(len(recs)):
        y, n = ll[2 * i], ll[2 * i + 1]
        m = max(y, n)
        scores.append(math.exp(y - m) / (math.exp(y - m) + math.exp(n - m)))
    labels = [int(r["label"]) for r in recs]
    groups = [str(r.get("task", r["question"])) for r in recs]  # no task field: one task per question
    res = metrics.moleculenet_auc(labels, scores, groups)
    return res, [dict(label=l_, p_yes=s, task=g) for l_, s, g in zip(labels, scores, groups, strict=False)]


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
             max_new_tokens: Optional[int] = None, molecule_convention: str = "mol_instructions",
             prompt_format: str = "chat") -> tuple[dict, list[dict]]:
    """(metrics, per-sample details) of ``model`` on ``records``. ``molecule_convention``: how molecule
    generation is scored, ``"mol_instructions"`` (Table 8's pipeline) or ``"molt5"`` (docs/evaluation.md,
    "Metric conventions"); ``prompt_format``: ``"chat"`` (the SFT chat template) or ``"raw"`` (base models)."""
    pr = Prompter(model, prompt_format)
    if task.kind == "multiple_choice":
        return _mc(pr, records, batch_size, progress)
    if task.kind == "math":
        return _math(pr, records, batch_size, progress, task.answer_style, max_new_tokens or 256)
    if task.kind == "molecule_generation":
        return _molgen(pr, records, batch_size, progress, max_new_tokens or 128, molecule_convention)
    if task.kind == "protein_understanding":
        return _protein(pr, records, batch_size, progress, max_new_tokens or 64)
    if task.kind == "moleculenet":
        return _moleculenet(pr, records, batch_size, progress)
    raise ValueError(f"unknown task kind {task.kind!r}")
