"""scidfm-eval-data: every converter on a small file in its benchmark's official schema
(tests/data/eval_official/), the task file the harness loads, and a clear error for a wrong file."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from scidfm_megatron.eval.converters import CONVERTERS, ConvertError, convert
from scidfm_megatron.eval.tasks import TASKS, load_records

OFF = ROOT / "tests" / "data" / "eval_official"

# benchmark, official file, harness task, (field checked, expected value) of the first record,
# a field the official schema requires (removed to make a wrong file)
CASES = [
    ("sciq", "sciq_test.json", "sciq", ("choices", ["protozoa", "gymnosperms", "viruses", "mesophilic organisms"]), "correct_answer"),
    ("arc_challenge", "arc_challenge_test.jsonl", "arc_challenge", ("answer", 2), "answerKey"),
    ("arc_easy", "arc_easy_hf.jsonl", "arc_easy", ("answer", 0), "answerKey"),
    ("medqa", "medqa_us_test.jsonl", "medqa", ("answer", 1), "answer_idx"),
    ("medmcqa", "medmcqa_dev.json", "medmcqa", ("answer", 2), "cop"),
    ("pubmedqa", "pubmedqa_test_set.json", "pubmedqa", ("choices", ["yes", "no", "maybe"]), "final_decision"),
    ("scieval", "scieval_test.json", "scieval", ("choices", ["Nitrogen", "Argon", "Oxygen", "Hydrogen"]), "type"),
    ("gsm8k", "gsm8k_test.jsonl", "gsm8k", ("answer", "She fills 24 / 6 = <<24/6=4>>4 boxes.\n#### 4"), "answer"),
    ("math", "math_test", "math", ("question", "What is the value of $x$ if $2x + 3 = 11$?"), "solution"),
    ("mol_instructions_molecule", "mol_instructions_forward_reaction_prediction.json", "forward_reaction_prediction",
     ("output", "CCOC(=O)C"), "output"),
    ("mol_instructions_protein", "mol_instructions_protein_function.json", "protein_function",
     ("input", "MKTAYIAKQRQISFVKSHFSRQ"), "input"),
    ("bbbp", "bbbp.csv", "bbbp", ("label", 1), "p_np"),
    ("bace", "bace.csv", "bace", ("smiles", "O1CC[C@@H](NC(=O)[C@@H](Cc2cc3cc(ccc3nc2N)-c2ccccc2C)C)CC1(C)C"), "Class"),
    ("clintox", "clintox.csv", "clintox", ("task", "FDA_APPROVED"), "CT_TOX"),
    ("hiv", "hiv.csv", "hiv", ("label", 0), "HIV_active"),
    ("tox21", "tox21.csv", "tox21", ("task", "NR-AR"), "SR-p53"),
]


def test_every_converter_has_a_case():
    assert {c[0] for c in CASES} | {"arc"} == set(CONVERTERS)


def _without(src, dst, field):
    """A copy of an official file with ``field`` removed (JSON key or CSV column)."""
    if src.is_dir():  # MATH: one problem file
        src = next(src.rglob("*.json"))
        dst = dst.with_suffix(".json")
    if src.suffix == ".csv":
        lines = src.read_text().splitlines()
        head = lines[0].split(",")
        k = head.index(field)
        dst.write_text("\n".join(",".join(x for j, x in enumerate(ln.split(",")) if j != k) for ln in lines) + "\n")
        return dst
    text = src.read_text()
    try:
        data = json.loads(text)
        docs, jsonl = [data], False
    except ValueError:
        docs, jsonl = [json.loads(ln) for ln in text.splitlines() if ln.strip()], True

    def drop(x):
        if isinstance(x, dict):
            return {k: drop(v) for k, v in x.items() if k != field}
        if isinstance(x, list):
            return [drop(v) for v in x]
        return x
    docs = [drop(d) for d in docs]
    dst.write_text("\n".join(json.dumps(d) for d in docs) + "\n" if jsonl else json.dumps(docs[0]))
    return dst


@pytest.mark.parametrize("bench,src,task,check,required", CASES, ids=[c[0] for c in CASES])
def test_converter_official_schema(tmp_path, bench, src, task, check, required):
    out = tmp_path / "tasks" / f"{task}.jsonl"  # the folder is created
    n = convert(bench, OFF / src, out)
    recs = load_records(out, TASKS[task].kind)  # the harness accepts the file
    assert len(recs) == n >= 1
    field, want = check
    assert recs[0][field] == want
    bad = _without(OFF / src, tmp_path / ("wrong" + (OFF / src).suffix), required)
    with pytest.raises(ConvertError, match=f"missing (field|column) '{required}'"):
        convert(bench, bad, tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_converter_details(tmp_path):
    # Mol-Instructions: SELFIES decoded to SMILES (reactants too), only the test split kept
    convert("mol_instructions_molecule", OFF / "mol_instructions_forward_reaction_prediction.json", tmp_path / "f.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["input"] == "CCO.CC(=O)O"
    # Tox21: one record per tested assay (empty cells skipped), 12 questions
    convert("tox21", OFF / "tox21.csv", tmp_path / "t.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(recs) == 12 - 2 + 12 - 2 and len({r["task"] for r in recs}) == 12
    # SciEval: the free-form "filling" question is not multiple choice; the judge question is yes/no
    convert("scieval", OFF / "scieval_test.json", tmp_path / "s.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["choices"] for r in recs][1] == ["yes", "no"] and len(recs) == 2
    assert recs[0]["question"] == "Which of the following is a noble gas?" and recs[0]["answer"] == 1


def test_cli_rejects_a_wrong_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scidfm_megatron.eval.converters", "sciq", str(OFF / "gsm8k_test.jsonl"),
                        "-o", str(tmp_path / "x.jsonl")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "missing field 'distractor1'" in r.stderr and "SciQ" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.jsonl").exists()
