"""``scidfm-eval-data``: public benchmark files -> the harness's task files (JSONL, ``eval/tasks.py``).

    scidfm-eval-data sciq path/to/sciq/test.json -o tasks/sciq.jsonl
    scidfm-eval-data tox21 tox21.csv -o tasks/tox21.jsonl
    scidfm-eval-data mol_instructions_molecule retrosynthesis.json -o tasks/retrosynthesis.jsonl

The benchmarks are downloaded elsewhere (nothing is fetched here). Each converter reads the format its
benchmark is published in (its docstring-level ``fmt`` string, repeated in every error), rejects a file
that lacks a field naming the file, record and field (exit 2), and writes atomically. Name the output
``<task>.jsonl`` inside one folder and ``scidfm-evaluate --suite paper --data-dir`` finds it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Callable, Iterable


class ConvertError(ValueError):
    pass


# ----------------------------------------------------------------------------------------- reading
def _read_json_records(path: Path) -> list:
    """A JSON array / object, or JSON Lines (one object a line)."""
    text = path.read_text(encoding="utf-8")
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
def sciq(path: Path) -> list[dict]:
    fmt = "SciQ (allenai/sciq) JSON: question, distractor1-3, correct_answer, support"
    out = []
    for i, r in enumerate(_read_json_records(path)):
        _need(r, ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
              f"{path}: record {i}", fmt)
        # lm-eval's sciq: choices [d1, d2, d3, correct], answer 3, the support paragraph as context
        out.append(dict(question=r["question"], context=r["support"].lstrip(),
                        choices=[r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]],
                        answer=3))
    return out


def arc(path: Path) -> list[dict]:
    fmt = ("ARC (allenai/ai2_arc) JSONL: id, question {stem, choices [{text, label}]}, answerKey "
           "(the original release) or question (str), choices {text, label}, answerKey (the HF export)")
    out = []
    for i, r in enumerate(_read_json_records(path)):
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


def medqa(path: Path) -> list[dict]:
    fmt = "MedQA (jind11/MedQA, US 4_options) JSONL: question, options {A: .., B: ..}, answer_idx"
    out = []
    for i, r in enumerate(_read_json_records(path)):
        _need(r, ("question", "options", "answer_idx"), f"{path}: record {i}", fmt)
        keys = sorted(r["options"])
        if r["answer_idx"] not in keys:
            raise ConvertError(f"{path}: record {i}: answer_idx {r['answer_idx']!r} is not an option key {keys}")
        out.append(dict(question=r["question"], choices=[r["options"][k] for k in keys],
                        answer=keys.index(r["answer_idx"])))
    return out


def medmcqa(path: Path) -> list[dict]:
    fmt = "MedMCQA (medmcqa/medmcqa release, dev.json) JSONL: question, opa, opb, opc, opd, cop (1-4)"
    out = []
    for i, r in enumerate(_read_json_records(path)):
        _need(r, ("question", "opa", "opb", "opc", "opd", "cop"), f"{path}: record {i}", fmt)
        if r["cop"] not in (1, 2, 3, 4):
            raise ConvertError(f"{path}: record {i}: cop must be 1-4 (the release's numbering), got {r['cop']!r}")
        out.append(dict(question=r["question"], choices=[r["opa"], r["opb"], r["opc"], r["opd"]],
                        answer=r["cop"] - 1, subject=r.get("subject_name")))
    return out


def pubmedqa(path: Path) -> list[dict]:
    fmt = ("PubMedQA (pubmedqa/pubmedqa, ori_pqal.json / test_set.json) JSON: "
           "{PMID: {QUESTION, CONTEXTS, final_decision}}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected an object keyed by PMID ({fmt})")
    out = []
    for pmid, r in data.items():
        _need(r, ("QUESTION", "CONTEXTS", "final_decision"), f"{path}: PMID {pmid}", fmt)
        choices = ["yes", "no", "maybe"]
        if r["final_decision"] not in choices:
            raise ConvertError(f"{path}: PMID {pmid}: final_decision must be yes/no/maybe, got {r['final_decision']!r}")
        # lm-eval's pubmedqa: "Abstract: {context}\nQuestion: {question}\nAnswer:", choices yes/no/maybe
        out.append(dict(question=r["QUESTION"], context="Abstract: " + " ".join(r["CONTEXTS"]), choices=choices,
                        answer=choices.index(r["final_decision"]), id=pmid))
    return out


_SCIEVAL_OPTION = re.compile(r"^\s*([A-J])[.)]\s*(.*\S)\s*$")


def scieval(path: Path) -> list[dict]:
    fmt = ("SciEval (OpenDFM/SciEval) JSON: question, answer [..], type (multiple-choice | judge | filling); "
           "multiple-choice questions list their options as lines 'A. ...'")
    out = []
    for i, r in enumerate(_read_json_records(path)):
        where = f"{path}: record {i}"
        _need(r, ("question", "answer", "type"), where, fmt)
        ans = r["answer"][0] if isinstance(r["answer"], list) and r["answer"] else r["answer"]
        if r["type"] == "multiple-choice":
            lines = r["question"].splitlines()
            opts = [(m.group(1), m.group(2)) for m in map(_SCIEVAL_OPTION.match, lines) if m]
            stem = "\n".join(ln for ln in lines if not _SCIEVAL_OPTION.match(ln)).strip()
            labels = [k for k, _ in opts]
            if len(opts) < 2 or str(ans).strip() not in labels:
                raise ConvertError(f"{where}: a multiple-choice question needs option lines 'A. ...' and an answer "
                                   f"among their letters (got answer {ans!r}, options {labels})")
            out.append(dict(question=stem, choices=[t for _, t in opts], answer=labels.index(str(ans).strip()),
                            category=r.get("category")))
        elif r["type"] == "judge":
            choices = ["yes", "no"]
            a = str(ans).strip().lower()
            a = {"true": "yes", "false": "no"}.get(a, a)
            if a not in choices:
                raise ConvertError(f"{where}: a judge question's answer must be yes/no or true/false, got {ans!r}")
            out.append(dict(question=r["question"], choices=choices, answer=choices.index(a),
                            category=r.get("category")))
        # "filling" questions are free-form: not a multiple-choice task, skipped (counted by the CLI)
    return out


# ------------------------------------------------------------------------------------------- math
def gsm8k(path: Path) -> list[dict]:
    fmt = "GSM8K (openai/grade-school-math, test.jsonl) JSONL: question, answer (a solution ending '#### N')"
    out = []
    for i, r in enumerate(_read_json_records(path)):
        _need(r, ("question", "answer"), f"{path}: record {i}", fmt)
        if "####" not in r["answer"]:
            raise ConvertError(f"{path}: record {i}: answer has no '#### N' final answer ({fmt})")
        out.append(dict(question=r["question"], answer=r["answer"]))
    return out


def math_dataset(path: Path) -> list[dict]:
    fmt = ("MATH (hendrycks/math) problems: a folder of <n>.json files (test/<subject>/), one such JSON file, or "
           "JSONL, each {problem, solution (with \\boxed{answer}), level, type}")
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    out = []
    for f in files:
        for i, r in enumerate(_read_json_records(f)):
            _need(r, ("problem", "solution"), f"{f}: record {i}", fmt)
            if "\\boxed" not in r["solution"] and "\\fbox" not in r["solution"]:
                raise ConvertError(f"{f}: record {i}: solution has no \\boxed{{}} answer ({fmt})")
            out.append(dict(question=r["problem"], answer=r["solution"], level=r.get("level"), type=r.get("type")))
    if not out:
        raise ConvertError(f"{path}: no MATH problems found ({fmt})")
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


def mol_instructions_molecule(path: Path, split: str = "test") -> list[dict]:
    fmt = ("Mol-Instructions Molecule-oriented_Instructions/<task>.json: [{instruction, input, output, "
           "metadata: {split}}], molecules in SELFIES")
    out = []
    for i, r in enumerate(_read_json_records(path)):
        where = f"{path}: record {i}"
        _need(r, ("instruction", "input", "output"), where, fmt)
        if split and (r.get("metadata") or {}).get("split", split) != split:
            continue
        if not _is_selfies(r["output"]):
            raise ConvertError(f"{where}: output is not SELFIES ({fmt}); molecule understanding tasks "
                               "(text output) are not molecule generation")
        inp = _selfies_to_smiles(r["input"], where + " input") if _is_selfies(r["input"]) else r["input"]
        out.append(dict(instruction=r["instruction"], input=inp,
                        output=_selfies_to_smiles(r["output"], where + " output"), output_selfies=r["output"]))
    return out


def mol_instructions_protein(path: Path, split: str = "test") -> list[dict]:
    fmt = ("Mol-Instructions Protein-oriented_Instructions/<task>.json: [{instruction, input (sequence, may be "
           "fenced in ```), output, metadata: {split}}]")
    out = []
    for i, r in enumerate(_read_json_records(path)):
        where = f"{path}: record {i}"
        _need(r, ("instruction", "input", "output"), where, fmt)
        if split and (r.get("metadata") or {}).get("split", split) != split:
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


def _moleculenet(name: str) -> Callable[[Path], list[dict]]:
    smiles_col, tasks = _MOLECULENET[name]

    def convert(path: Path) -> list[dict]:
        fmt = f"MoleculeNet {name} CSV with columns {smiles_col}, {', '.join(tasks)}"
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in [smiles_col, *tasks] if c not in cols]
            if missing:
                raise ConvertError(f"{path}: missing column {missing[0]!r} (expected {fmt})")
            out = []
            for no, row in enumerate(reader, 2):
                for t, question in tasks.items():
                    v = (row[t] or "").strip()
                    if v == "":  # Tox21 leaves untested assays empty
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


CONVERTERS: dict[str, Callable[[Path], list[dict]]] = {
    "sciq": sciq, "arc": arc, "arc_easy": arc, "arc_challenge": arc, "medqa": medqa, "medmcqa": medmcqa,
    "pubmedqa": pubmedqa, "scieval": scieval, "gsm8k": gsm8k, "math": math_dataset,
    "mol_instructions_molecule": mol_instructions_molecule, "mol_instructions_protein": mol_instructions_protein,
    **{n: _moleculenet(n) for n in _MOLECULENET},
}


def convert(benchmark: str, src: str | Path, dst: str | Path) -> int:
    """Convert ``src`` (the benchmark's public file) into the task file ``dst``; returns the record count."""
    from ..utils import atomic_write

    if benchmark not in CONVERTERS:
        raise ConvertError(f"unknown benchmark {benchmark!r}; choose one of {sorted(CONVERTERS)}")
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file")
    recs = CONVERTERS[benchmark](src)
    if not recs:
        raise ConvertError(f"{src}: no records to write (wrong split or file?)")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(dst), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return len(recs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scidfm-eval-data", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("benchmark", choices=sorted(CONVERTERS), help="which benchmark's public file format")
    ap.add_argument("src", help="the benchmark's public file (or MATH's folder)")
    ap.add_argument("-o", "--output", required=True, help="task file to write (<task>.jsonl)")
    a = ap.parse_args(argv)
    try:
        n = convert(a.benchmark, a.src, a.output)
    except (ConvertError, OSError) as exc:
        print(f"scidfm-eval-data: error: {exc}", file=sys.stderr)
        return 2
    print(f"[scidfm] {a.benchmark}: {n} records -> {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
