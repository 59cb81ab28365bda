"""``scidfm-eval-data``: public benchmark files -> the harness's task files (JSONL, ``eval/tasks.py``).

    scidfm-eval-data sciq path/to/sciq/test.json -o tasks/sciq.jsonl
    scidfm-eval-data tox21 tox21.csv -o tasks/tox21.jsonl
    scidfm-eval-data mol_instructions_molecule retrosynthesis.json -o tasks/retrosynthesis.jsonl
    scidfm-eval-data pubmedqa ori_pqal.json --test-ids test_ground_truth.json -o tasks/pubmedqa.jsonl
    scidfm-eval-data mmlu data/test/ -o tasks/mmlu.jsonl

The benchmarks are downloaded elsewhere (nothing is fetched here). Each converter reads the format its
benchmark is published in (its docstring-level ``fmt`` string, repeated in every error), rejects a file
that lacks a field naming the file, record and field (exit 2), and writes atomically. Inputs may be
gzip-compressed (``.gz``, e.g. MoleculeNet's ``tox21.csv.gz``). Every conversion prints the records read,
written and skipped, with the reasons counted. Name the output ``<task>.jsonl`` inside one folder and
``scidfm-evaluate --suite paper --data-dir`` finds it.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..errors import ConvertError  # re-export: defined in scidfm_megatron/errors.py


class Report:
    """What a conversion read, wrote and skipped (with the reasons counted); printed by the CLI."""

    def __init__(self):
        self.read = 0
        self.written = 0
        self.skipped: collections.Counter = collections.Counter()
        self.notes: list[str] = []

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def render(self, benchmark: str, dst) -> str:
        lines = [f"[scidfm] {benchmark}: {self.read:,} records read, {self.written:,} written -> {dst}, "
                 f"{sum(self.skipped.values()):,} skipped"]
        lines += [f"[scidfm]   skipped {n:,}: {why}" for why, n in self.skipped.most_common()]
        lines += [f"[scidfm]   {note}" for note in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- reading
def _open_text(path: Path):
    """A text stream of a plain or gzip-compressed (``.gz``) file; bad bytes raise ConvertError."""
    raw = gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ConvertError(f"{path}: not UTF-8 text (byte {exc.start}); is it the benchmark's file?") from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise ConvertError(f"{path}: not a complete gzip file ({exc}); download it again") from None


def _read_json_records(path: Path) -> list:
    """A JSON array / object, or JSON Lines (one object a line)."""
    text = _read_text(path)
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except ValueError:
        pass
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise ConvertError(f"{path}:{no}: neither a JSON document nor JSON Lines ({exc})") from None
    return out


def _need(rec, fields: Iterable[str], where: str, fmt: str):
    if not isinstance(rec, dict):
        raise ConvertError(f"{where}: expected an object ({fmt})")
    missing = [f for f in fields if f not in rec]
    if missing:
        raise ConvertError(f"{where}: missing field {missing[0]!r} (expected {fmt})")


# --------------------------------------------------------------------------------- multiple choice
def sciq(path: Path, rep: Report) -> list[dict]:
    fmt = "SciQ (allenai/sciq) JSON: question, distractor1-3, correct_answer, support"
    out = []
    recs = _read_json_records(path)
    rep.read += len(recs)
    for i, r in enumerate(recs):
        _need(r, ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
              f"{path}: record {i}", fmt)
        # lm-eval's sciq: choices [d1, d2, d3, correct], answer 3, the support paragraph as context
        out.append(dict(question=r["question"], context=r["support"].lstrip(),
                        choices=[r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]],
                        answer=3))
    return out


def arc(path: Path, rep: Report) -> list[dict]:
    fmt = ("ARC (allenai/ai2_arc) JSONL: id, question {stem, choices [{text, label}]}, answerKey "
           "(the original release) or question (str), choices {text, label}, answerKey (the HF export)")
    out = []
    recs = _read_json_records(path)
    rep.read += len(recs)
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        _need(r, ("question", "answerKey"), where, fmt)
        q = r["question"]
        if isinstance(q, dict):
            _need(q, ("stem", "choices"), where + " question", fmt)
            texts = [c["text"] for c in q["choices"]]
            labels = [c["label"] for c in q["choices"]]
            stem = q["stem"]
        else:
            _need(r, ("choices",), where, fmt)
            texts, labels, stem = list(r["choices"]["text"]), list(r["choices"]["label"]), q
        if r["answerKey"] not in labels:
            raise ConvertError(f"{where}: answerKey {r['answerKey']!r} is not one of the labels {labels}")
        out.append(dict(question=stem, choices=texts, answer=labels.index(r["answerKey"]), id=r.get("id")))
    return out


def medqa(path: Path, rep: Report) -> list[dict]:
    fmt = "MedQA (jind11/MedQA, US 4_options) JSONL: question, options {A: .., B: ..}, answer_idx"
    out = []
    recs = _read_json_records(path)
    rep.read += len(recs)
    for i, r in enumerate(recs):
        _need(r, ("question", "options", "answer_idx"), f"{path}: record {i}", fmt)
        keys = sorted(r["options"])
        if r["answer_idx"] not in keys:
            raise ConvertError(f"{path}: record {i}: answer_idx {r['answer_idx']!r} is not an option key {keys}")
        out.append(dict(question=r["question"], choices=[r["options"][k] for k in keys],
                        answer=keys.index(r["answer_idx"])))
    return out


def medmcqa(path: Path, rep: Report) -> list[dict]:
    fmt = "MedMCQA (medmcqa/medmcqa release, dev.json) JSONL: question, opa, opb, opc, opd, cop (1-4)"
    out = []
    recs = _read_json_records(path)
    rep.read += len(recs)
    for i, r in enumerate(recs):
        _need(r, ("question", "opa", "opb", "opc", "opd", "cop"), f"{path}: record {i}", fmt)
        if r["cop"] not in (1, 2, 3, 4):
            raise ConvertError(f"{path}: record {i}: cop must be 1-4 (the release's numbering), got {r['cop']!r}")
        out.append(dict(question=r["question"], choices=[r["opa"], r["opb"], r["opc"], r["opd"]],
                        answer=r["cop"] - 1, subject=r.get("subject_name")))
    return out


PUBMEDQA_CHOICES = ["yes", "no", "maybe"]


def _pubmedqa_test_ids(path: Path) -> dict:
    fmt = "PubMedQA's test_ground_truth.json: {PMID: yes|no|maybe} (the 500 test questions)"
    try:
        data = json.loads(_read_text(path))
    except ValueError as exc:
        raise ConvertError(f"--test-ids {path}: not JSON ({exc}); expected {fmt}") from None
    if not isinstance(data, dict) or not data:
        raise ConvertError(f"--test-ids {path}: expected a non-empty object ({fmt})")
    for pmid, label in data.items():
        if label not in PUBMEDQA_CHOICES:
            raise ConvertError(f"--test-ids {path}: PMID {pmid}: expected yes/no/maybe, got {label!r} ({fmt})")
    return data


def pubmedqa(path: Path, rep: Report, test_ids: Optional[Path] = None) -> list[dict]:
    fmt = ("PubMedQA (pubmedqa/pubmedqa, ori_pqal.json / test_set.json) JSON: "
           "{PMID: {QUESTION, CONTEXTS, final_decision}}")
    try:
        data = json.loads(_read_text(path))
    except ValueError as exc:
        raise ConvertError(f"{path}: not JSON ({exc}); expected {fmt}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected an object keyed by PMID ({fmt})")
    if data and all(v in PUBMEDQA_CHOICES for v in data.values()):
        raise ConvertError(f"{path} holds only answers (PMID -> yes/no/maybe: test_ground_truth.json); convert "
                           f"the questions with it: scidfm-eval-data pubmedqa ori_pqal.json --test-ids {path}")
    rep.read += len(data)
    keep = None
    if test_ids is not None:
        keep = _pubmedqa_test_ids(Path(test_ids))
        missing = [p for p in keep if p not in data]
        if missing:
            raise ConvertError(f"{path}: {len(missing)} of the {len(keep)} test PMIDs of {test_ids} are not in it "
                               f"(first: {missing[0]}); give ori_pqal.json, which holds all 1000 labelled questions")
    out = []
    for pmid, r in data.items():
        if keep is not None and pmid not in keep:
            rep.skip(f"PMID not in the test split ({test_ids})")
            continue
        _need(r, ("QUESTION", "CONTEXTS", "final_decision"), f"{path}: PMID {pmid}", fmt)
        if r["final_decision"] not in PUBMEDQA_CHOICES:
            raise ConvertError(f"{path}: PMID {pmid}: final_decision must be yes/no/maybe, got {r['final_decision']!r}")
        if keep is not None and keep[pmid] != r["final_decision"]:
            raise ConvertError(f"{path}: PMID {pmid}: final_decision {r['final_decision']!r} differs from "
                               f"{test_ids}'s {keep[pmid]!r}; are they from the same release?")
        # lm-eval's pubmedqa: "Abstract: {context}\nQuestion: {question}\nAnswer:", choices yes/no/maybe
        out.append(dict(question=r["QUESTION"], context="Abstract: " + " ".join(r["CONTEXTS"]),
                        choices=PUBMEDQA_CHOICES, answer=PUBMEDQA_CHOICES.index(r["final_decision"]), id=pmid,
                        split="test" if keep is not None else f"all {len(data)} of {Path(path).name}"))
    if keep is not None:
        rep.notes.append(f"split: test ({len(out)} questions of {test_ids}); each record's 'split' field says so")
    else:
        rep.notes.append(f"split: all {len(out)} labelled questions of {Path(path).name}, not the paper's 500-question "
                         f"test split (add --test-ids test_ground_truth.json); each record's 'split' field says so")
    return out


_SCIEVAL_OPTION = re.compile(r"^\s*([A-J])[.)]\s*(.*\S)\s*$")
_ANSWER_CUE = re.compile(r"\s*Answer:\s*$")


def scieval(path: Path, rep: Report) -> list[dict]:
    fmt = ("SciEval (OpenDFM/SciEval: scieval-valid.json, scieval-test-local.json; scieval-test.json has no "
           "answers) JSON: question (ending 'Answer:'), answer [..], type (multiple-choice | judge | filling); "
           "multiple-choice questions list their options as lines 'A. ...'")
    out = []
    recs = _read_json_records(path)
    rep.read += len(recs)
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        _need(r, ("question", "answer", "type"), where, fmt)
        ans = r["answer"][0] if isinstance(r["answer"], list) and r["answer"] else r["answer"]
        # the harness adds its own "Question: ...\nAnswer:" cue: drop the one SciEval's questions end with
        question = _ANSWER_CUE.sub("", str(r["question"])).rstrip()
        if r["type"] == "multiple-choice":
            lines = question.splitlines()
            opts = [(m.group(1), m.group(2)) for m in map(_SCIEVAL_OPTION.match, lines) if m]
            stem = "\n".join(ln for ln in lines if not _SCIEVAL_OPTION.match(ln)).strip()
            labels = [k for k, _ in opts]
            if len(opts) < 2 or str(ans).strip() not in labels:
                rep.skip("multiple-choice without option lines 'A. ...' or with an answer not among their letters")
                continue
            out.append(dict(question=stem, choices=[t for _, t in opts], answer=labels.index(str(ans).strip()),
                            category=r.get("category"), id=r.get("id")))
        elif r["type"] == "judge":
            a = str(ans).strip().lower()
            a = {"true": "yes", "false": "no"}.get(a, a)
            # SciEval's judge items are yes/no, or yes/no/maybe where its prompt offers "maybe" (PubMedQA items)
            offers_maybe = a == "maybe" or "maybe" in str(r.get("prompt", "")).lower()
            choices = ["yes", "no", "maybe"] if offers_maybe else ["yes", "no"]
            if a not in choices:
                rep.skip("judge answer not yes/no/maybe (or true/false)")
                continue
            out.append(dict(question=question, choices=choices, answer=choices.index(a),
                            category=r.get("category"), id=r.get("id")))
        elif r["type"] == "filling":
            rep.skip("type 'filling': a free-form answer (SciEval scores it by substring match); the harness "
                     "scores SciEval as multiple choice and yes/no")
        else:
            rep.skip(f"type {r['type']!r}: not multiple-choice, judge or filling")
    return out


# ------------------------------------------------------------------------------------------- math
def gsm8k(path: Path, rep: Report) -> list[dict]:
    fmt = "GSM8K (openai/grade-school-math, test.jsonl) JSONL: question, answer (a solution ending '#### N')"
    out = []
    recs = _read_json_records(path)
    rep.read += len(recs)
    for i, r in enumerate(recs):
        _need(r, ("question", "answer"), f"{path}: record {i}", fmt)
        if "####" not in r["answer"]:
            raise ConvertError(f"{path}: record {i}: answer has no '#### N' final answer ({fmt})")
        out.append(dict(question=r["question"], answer=r["answer"]))
    return out


def math_dataset(path: Path, rep: Report) -> list[dict]:
    fmt = ("MATH (hendrycks/math) problems: a folder of <n>.json files (test/<subject>/), one such JSON file, or "
           "JSONL, each {problem, solution (with \\boxed{answer}), level, type}")
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    out = []
    for f in files:
        recs = _read_json_records(f)
        rep.read += len(recs)
        for i, r in enumerate(recs):
            _need(r, ("problem", "solution"), f"{f}: record {i}", fmt)
            if "\\boxed" not in r["solution"] and "\\fbox" not in r["solution"]:
                raise ConvertError(f"{f}: record {i}: solution has no \\boxed{{}} answer ({fmt})")
            out.append(dict(question=r["problem"], answer=r["solution"], level=r.get("level"), type=r.get("type")))
    if not out:
        raise ConvertError(f"{path}: no MATH problems found ({fmt})")
    return out


# ------------------------------------------------------------------------------------------- MMLU
def mmlu(path: Path, rep: Report) -> list[dict]:
    fmt = ("MMLU (hendrycks/test, data.tar): header-less CSVs <subject>_test.csv, each row question, A, B, C, D, "
           "answer letter; a file or a folder of *_test.csv")
    if path.is_dir():
        files = sorted(path.rglob("*_test.csv")) + sorted(path.rglob("*_test.csv.gz"))
        if not files:
            raise ConvertError(f"{path}: no *_test.csv files (expected {fmt}: the release's data/test/ folder)")
    else:
        files = [path]
    out = []
    for f in files:
        subject = re.sub(r"(_(test|val|dev))?\.csv(\.gz)?$", "", f.name)
        try:
            rows = list(csv.reader(io.StringIO(_read_text(f), newline="")))
        except csv.Error as exc:
            raise ConvertError(f"{f}: not CSV ({exc}); expected {fmt}") from None
        for no, row in enumerate(rows, 1):
            if not row:
                continue
            rep.read += 1
            if len(row) != 6:
                raise ConvertError(f"{f}:{no}: {len(row)} columns, expected 6 (question, A, B, C, D, answer letter; "
                                   f"{fmt})")
            letter = row[5].strip().upper()
            if letter not in "ABCD" or len(letter) != 1:
                if no == 1 and [x.strip() for x in row[1:5]] == ["A", "B", "C", "D"]:
                    rep.skip("a header row (the original release has none)")
                    continue
                raise ConvertError(f"{f}:{no}: answer {row[5]!r} is not a letter A-D (expected {fmt})")
            out.append(dict(question=row[0], choices=row[1:5], answer="ABCD".index(letter), subject=subject))
    return out


# -------------------------------------------------------------------------------- Mol-Instructions
def _selfies_to_smiles(s: str, where: str) -> str:
    """SELFIES -> SMILES with the ``selfies`` package, as Mol-Instructions' evaluate.py does; reactions
    ``A>>B`` part by part."""
    import selfies as sf

    parts = []
    for part in s.strip().split(">>"):
        try:
            parts.append(sf.decoder(part))
        except Exception as exc:  # noqa: BLE001 - selfies raises DecoderError and friends
            raise ConvertError(f"{where}: not a SELFIES string ({exc.__class__.__name__}: {part[:60]!r})") from None
    return ">>".join(parts)


def _is_selfies(s: str) -> bool:
    return bool(re.fullmatch(r"(\[[^\[\]\s]+\]|\.|>>)+", s.strip()))


def mol_instructions_molecule(path: Path, rep: Report, split: str = "test") -> list[dict]:
    fmt = ("Mol-Instructions Molecule-oriented_Instructions/<task>.json: [{instruction, input, output, "
           "metadata: {split}}], molecules in SELFIES")
    out = []
    recs = _read_json_records(path)
    rep.read += len(recs)
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        _need(r, ("instruction", "input", "output"), where, fmt)
        got = (r.get("metadata") or {}).get("split", split)
        if split and got != split:
            rep.skip(f"metadata.split is {got!r} (kept: {split!r})")
            continue
        if not _is_selfies(r["output"]):
            raise ConvertError(f"{where}: output is not SELFIES ({fmt}); molecule understanding tasks "
                               "(text output) are not molecule generation")
        inp = _selfies_to_smiles(r["input"], where + " input") if _is_selfies(r["input"]) else r["input"]
        out.append(dict(instruction=r["instruction"], input=inp,
                        output=_selfies_to_smiles(r["output"], where + " output"), output_selfies=r["output"]))
    return out


def mol_instructions_protein(path: Path, rep: Report, split: str = "test") -> list[dict]:
    fmt = ("Mol-Instructions Protein-oriented_Instructions/<task>.json: [{instruction, input (sequence, may be "
           "fenced in ```), output, metadata: {split}}]")
    out = []
    recs = _read_json_records(path)
    rep.read += len(recs)
    for i, r in enumerate(recs):
        where = f"{path}: record {i}"
        _need(r, ("instruction", "input", "output"), where, fmt)
        got = (r.get("metadata") or {}).get("split", split)
        if split and got != split:
            rep.skip(f"metadata.split is {got!r} (kept: {split!r})")
            continue
        seq = re.sub(r"\s+", "", r["input"].replace("```", ""))
        if not re.fullmatch(r"[A-Za-z]+", seq):
            raise ConvertError(f"{where}: input is not a protein sequence (one-letter codes) after removing ``` fences")
        out.append(dict(instruction=r["instruction"], input=seq.upper(), output=r["output"]))
    return out


# -------------------------------------------------------------------------------------- MoleculeNet
# MoleculeNet CSVs (deepchem / MoleculeNet downloads): SMILES column and label column(s) per dataset.
_MOLECULENET = {
    "bace": ("mol", {"Class": "Does this molecule inhibit human beta-secretase 1 (BACE-1)?"}),
    "bbbp": ("smiles", {"p_np": "Can this molecule penetrate the blood-brain barrier?"}),
    "clintox": ("smiles", {"FDA_APPROVED": "Is this molecule an FDA-approved drug?",
                           "CT_TOX": "Did this molecule fail clinical trials for toxicity reasons?"}),
    "hiv": ("smiles", {"HIV_active": "Does this molecule inhibit HIV replication?"}),
    "tox21": ("smiles", {t: f"Is this molecule active in the Tox21 {t} assay ({d})?" for t, d in [
        ("NR-AR", "androgen receptor"), ("NR-AR-LBD", "androgen receptor ligand-binding domain"),
        ("NR-AhR", "aryl hydrocarbon receptor"), ("NR-Aromatase", "aromatase inhibition"),
        ("NR-ER", "estrogen receptor alpha"), ("NR-ER-LBD", "estrogen receptor ligand-binding domain"),
        ("NR-PPAR-gamma", "PPAR-gamma agonism"), ("SR-ARE", "antioxidant response element"),
        ("SR-ATAD5", "ATAD5 genotoxicity"), ("SR-HSE", "heat shock factor response element"),
        ("SR-MMP", "mitochondrial membrane potential"), ("SR-p53", "p53 response")]}),
}


def _moleculenet(name: str) -> Callable[[Path, Report], list[dict]]:
    smiles_col, tasks = _MOLECULENET[name]

    def convert(path: Path, rep: Report) -> list[dict]:
        fmt = f"MoleculeNet {name} CSV (or .csv.gz) with columns {smiles_col}, {', '.join(tasks)}"
        try:
            reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
            cols = reader.fieldnames or []
        except csv.Error as exc:
            raise ConvertError(f"{path}: not CSV ({exc}); expected {fmt}") from None
        missing = [c for c in [smiles_col, *tasks] if c not in cols]
        if missing:
            raise ConvertError(f"{path}: missing column {missing[0]!r} (expected {fmt})")
        out = []
        for no, row in enumerate(reader, 2):
            rep.read += 1
            for t, question in tasks.items():
                v = (row[t] or "").strip()
                if v == "":  # Tox21 leaves untested assays empty
                    rep.skip("empty label cell (assay not tested for that molecule), one per molecule and task")
                    continue
                try:
                    label = int(float(v))
                except ValueError:
                    raise ConvertError(f"{path}:{no}: column {t!r} must be 0/1 or empty, got {v!r}") from None
                if label not in (0, 1):
                    raise ConvertError(f"{path}:{no}: column {t!r} must be 0/1 or empty, got {v!r}")
                out.append(dict(smiles=row[smiles_col], question=question, label=label, task=t))
        return out

    convert.__doc__ = f"MoleculeNet {name}"
    return convert


CONVERTERS: dict[str, Callable[..., list[dict]]] = {
    "sciq": sciq, "arc": arc, "arc_easy": arc, "arc_challenge": arc, "medqa": medqa, "medmcqa": medmcqa,
    "pubmedqa": pubmedqa, "scieval": scieval, "mmlu": mmlu, "gsm8k": gsm8k, "math": math_dataset,
    "mol_instructions_molecule": mol_instructions_molecule, "mol_instructions_protein": mol_instructions_protein,
    **{n: _moleculenet(n) for n in _MOLECULENET},
}


def convert(benchmark: str, src: str | Path, dst: str | Path, *, test_ids: Optional[str | Path] = None,
            report: Optional[Report] = None) -> int:
    """Convert ``src`` (the benchmark's public file) into the task file ``dst``; returns the record count.
    ``report`` (a :class:`Report`) is filled with the records read, written and skipped (with reasons);
    ``test_ids``: PubMedQA's test_ground_truth.json, to keep the 500-question test split."""
    from ..utils import atomic_write

    if benchmark not in CONVERTERS:
        raise ConvertError(f"unknown benchmark {benchmark!r}; choose one of {sorted(CONVERTERS)}")
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file")
    rep = report if report is not None else Report()
    kw = {}
    if test_ids is not None:
        if benchmark != "pubmedqa":
            raise ConvertError(f"--test-ids applies to pubmedqa (its test_ground_truth.json), not {benchmark}")
        if not Path(test_ids).exists():
            raise ConvertError(f"--test-ids {test_ids}: no such file")
        kw["test_ids"] = Path(test_ids)
    try:
        recs = CONVERTERS[benchmark](src, rep, **kw)
    except ConvertError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:  # a shape no check above names
        raise ConvertError(f"{src}: not in {benchmark}'s published format ({type(exc).__name__}: {exc}); "
                           f"scidfm-eval-data --help lists the formats (docs/evaluation.md)") from None
    if not recs:
        why = "; ".join(f"{n} {r}" for r, n in rep.skipped.most_common()) or "the file holds none"
        raise ConvertError(f"{src}: no records to write ({rep.read} read, all skipped: {why}); wrong split or file?")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(dst), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    rep.written = len(recs)
    return len(recs)
