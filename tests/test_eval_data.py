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
    ("sciq", "sciq_test.json", "sciq", ("choices", ["protozoa", "gymnosperms", "viruses", "mesophilic organisms"]),
     "correct_answer"),
    ("arc_challenge", "arc_challenge_test.jsonl", "arc_challenge", ("answer", 2), "answerKey"),
    ("arc_easy", "arc_easy_hf.jsonl", "arc_easy", ("answer", 0), "answerKey"),
    ("medqa", "medqa_us_test.jsonl", "medqa", ("answer", 1), "answer_idx"),
    ("medmcqa", "medmcqa_dev.json", "medmcqa", ("answer", 2), "cop"),
    ("pubmedqa", "pubmedqa_ori_pqal.json", "pubmedqa", ("choices", ["yes", "no", "maybe"]), "final_decision"),
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
    assert {c[0] for c in CASES} | {"arc", "mmlu"} == set(CONVERTERS)  # mmlu: header-less CSVs, tested below


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
    convert("mol_instructions_molecule", OFF / "mol_instructions_forward_reaction_prediction.json",
            tmp_path / "f.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["input"] == "CCO.CC(=O)O"
    # Tox21: one record per tested assay (empty cells skipped), 12 questions
    convert("tox21", OFF / "tox21.csv", tmp_path / "t.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(recs) == 12 - 2 + 12 - 2 and len({r["task"] for r in recs}) == 12
    # SciEval: multiple choice (its trailing "Answer:" dropped), judge with yes/no/maybe; "filling" skipped
    convert("scieval", OFF / "scieval_test.json", tmp_path / "s.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["choices"] for r in recs][1:] == [["yes", "no", "maybe"]] * 2 and len(recs) == 3
    assert recs[0]["question"] == "Which of the following is a noble gas?" and recs[0]["answer"] == 1
    assert [r["answer"] for r in recs[1:]] == [0, 2]  # yes, maybe


def test_an_unexpected_shape_is_one_line(tmp_path, capsys):
    bad = tmp_path / "arc.jsonl"  # a choice without its text
    bad.write_text(json.dumps({"id": "x", "question": {"stem": "q", "choices": [{"label": "A"}]}, "answerKey": "A"}))
    rc, _, err = _cli(capsys, "arc_easy", bad, "-o", tmp_path / "x.jsonl")
    assert rc == 2 and err.strip() == (f"scidfm-eval-data: error: {bad}: not in arc_easy's published format (KeyError: "
                                       "'text'); scidfm-eval-data --help lists the formats (docs/evaluation.md)")


def test_cli_rejects_a_wrong_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scidfm_megatron.cli.eval_data", "sciq", str(OFF / "gsm8k_test.jsonl"),
                        "-o", str(tmp_path / "x.jsonl")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "missing field 'distractor1'" in r.stderr and "SciQ" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.jsonl").exists()


class _PromptRecorder:
    """A stand-in model for the harness: records each prompt text, scores every choice 0."""

    class tokenizer:
        eos_id = 2
        special_ids = {}

        @staticmethod
        def encode(text, **kw):
            return [0]

    def __init__(self):
        self.texts = []

    def encode(self, text, bos=True):
        self.texts.append(text)
        return [1]

    def loglikelihood(self, reqs, batch_size=1):
        return [0.0] * len(reqs)


def _cli(capsys, *args):
    from scidfm_megatron.cli.eval_data import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_scieval_public_file(tmp_path, capsys):
    """SciEval's valid / test-local JSON: a 'maybe' judge answer is kept (the converter used to stop the file),
    the raw prompt says 'Answer:' once, and the fill-in-the-blank item is counted as skipped with its reason."""
    from scidfm_megatron.eval.tasks import run_task

    out = tmp_path / "scieval.jsonl"
    rc, stdout, _ = _cli(capsys, "scieval", OFF / "scieval_test.json", "-o", out)
    assert rc == 0
    assert f"scieval: 4 records read, 3 written -> {out}, 1 skipped" in stdout
    assert "skipped 1: type 'filling': a free-form answer" in stdout
    recs = load_records(out, "multiple_choice")
    assert [r["choices"][r["answer"]] for r in recs] == ["Argon", "yes", "maybe"]
    model = _PromptRecorder()
    run_task(model, TASKS["scieval"], recs, prompt_format="raw", progress=False)
    assert len(model.texts) == 3
    for text in model.texts:
        assert text.startswith("Question: ") and text.endswith("\nAnswer:") and text.count("Answer:") == 1
    assert "\nA. Nitrogen" not in model.texts[0]  # options are scored as choices, not repeated in the question


def test_pubmedqa_test_split(tmp_path, capsys):
    """ori_pqal.json + test_ground_truth.json -> the test split, named in every record and in the results."""
    from scidfm_megatron.eval.harness import evaluate, format_table

    out = tmp_path / "pubmedqa.jsonl"
    rc, stdout, _ = _cli(capsys, "pubmedqa", OFF / "pubmedqa_ori_pqal.json", "--test-ids",
                         OFF / "pubmedqa_test_ground_truth.json", "-o", out)
    assert rc == 0 and "6 records read, 3 written" in stdout and "skipped 3: PMID not in the test split" in stdout
    assert "split: test (3 questions" in stdout
    recs = load_records(out, "multiple_choice")
    truth = json.loads((OFF / "pubmedqa_test_ground_truth.json").read_text())
    assert {r["id"]: r["choices"][r["answer"]] for r in recs} == truth
    assert {r["split"] for r in recs} == {"test"}
    res = evaluate(_PromptRecorder(), [("pubmedqa", str(out))], progress=False)
    assert res["pubmedqa"]["split"] == "test" and res["pubmedqa"]["n"] == 3
    assert "3 (test)" in format_table(res)
    # without --test-ids: all labelled questions, and the output says it is not the test split
    rc, stdout, _ = _cli(capsys, "pubmedqa", OFF / "pubmedqa_ori_pqal.json", "-o", tmp_path / "all.jsonl")
    assert rc == 0 and "6 written" in stdout and "not the paper's 500-question test split" in stdout
    assert {r["split"] for r in load_records(tmp_path / "all.jsonl", "multiple_choice")} == \
        {"all 6 of pubmedqa_ori_pqal.json"}
    # the ground-truth file given as the questions, a test id missing, a label that disagrees: one line each
    rc, _, err = _cli(capsys, "pubmedqa", OFF / "pubmedqa_test_ground_truth.json", "-o", tmp_path / "x.jsonl")
    assert rc == 2 and "holds only answers" in err and "--test-ids" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "truth.json"
    bad.write_text(json.dumps(dict(truth, **{"99999999": "yes"})))
    rc, _, err = _cli(capsys, "pubmedqa", OFF / "pubmedqa_ori_pqal.json", "--test-ids", bad, "-o", tmp_path / "x.jsonl")
    assert rc == 2 and "1 of the 4 test PMIDs" in err and "99999999" in err
    bad.write_text(json.dumps(dict(truth, **{"10000002": "yes"})))
    rc, _, err = _cli(capsys, "pubmedqa", OFF / "pubmedqa_ori_pqal.json", "--test-ids", bad, "-o", tmp_path / "x.jsonl")
    assert rc == 2 and "PMID 10000002: final_decision 'no' differs" in err
    rc, _, err = _cli(capsys, "sciq", OFF / "sciq_test.json", "--test-ids", bad, "-o", tmp_path / "x.jsonl")
    assert rc == 2 and "--test-ids applies to pubmedqa" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_mmlu_original_csvs(tmp_path, capsys):
    """hendrycks/test's header-less per-subject CSVs (question, A, B, C, D, answer letter): a folder or a file."""
    out = tmp_path / "mmlu.jsonl"
    rc, stdout, _ = _cli(capsys, "mmlu", OFF / "mmlu_test", "-o", out)
    assert rc == 0 and "5 records read, 5 written" in stdout
    recs = load_records(out, TASKS["mmlu"].kind)
    assert [r["subject"] for r in recs] == ["astronomy"] * 2 + ["college_chemistry"] * 3
    assert recs[1]["question"] == 'What does the term "light-year" measure?'  # CSV quoting as in the release
    assert recs[2]["question"].endswith("\nAssume 1 atm.") and recs[2]["choices"][recs[2]["answer"]] == "H2O"
    assert [r["answer"] for r in recs] == [0, 1, 2, 3, 1]
    one = tmp_path / "virology_test.csv"
    one.write_text("question,A,B,C,D,answer\n" + (OFF / "mmlu_test" / "astronomy_test.csv").read_text())
    rc, stdout, _ = _cli(capsys, "mmlu", one, "-o", out)
    assert rc == 0 and "3 records read, 2 written" in stdout and "skipped 1: a header row" in stdout
    assert {r["subject"] for r in load_records(out, "multiple_choice")} == {"virology"}
    one.write_text("Which?,one,two,three,four,E\n")
    rc, _, err = _cli(capsys, "mmlu", one, "-o", tmp_path / "x.jsonl")
    assert rc == 2 and err.strip() == (f"scidfm-eval-data: error: {one}:1: answer 'E' is not a letter A-D (expected "
                                       "MMLU (hendrycks/test, data.tar): header-less CSVs <subject>_test.csv, each row "
                                       "question, A, B, C, D, answer letter; a file or a folder of *_test.csv)")
    rc, _, err = _cli(capsys, "mmlu", tmp_path / "nothing_here", "-o", tmp_path / "x.jsonl")
    assert rc == 2 and "no such file" in err


def test_gzip_inputs_are_read(tmp_path, capsys):
    """MoleculeNet publishes tox21.csv.gz: read as the CSV it holds; counts of read / written / skipped."""
    import gzip

    gz = tmp_path / "tox21.csv.gz"
    gz.write_bytes(gzip.compress((OFF / "tox21.csv").read_bytes()))
    rc, stdout, _ = _cli(capsys, "tox21", gz, "-o", tmp_path / "gz.jsonl")
    assert rc == 0
    convert("tox21", OFF / "tox21.csv", tmp_path / "plain.jsonl")
    assert (tmp_path / "gz.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()
    assert "2 records read, 20 written" in stdout and "skipped 4: empty label cell" in stdout
    gz.write_bytes(gzip.compress((OFF / "tox21.csv").read_bytes())[:60])  # a cut download
    rc, _, err = _cli(capsys, "tox21", gz, "-o", tmp_path / "x.jsonl")
    assert rc == 2 and "not a complete gzip file" in err and len(err.strip().splitlines()) == 1
    raw = tmp_path / "tox21.csv"  # compressed bytes under a .csv name
    raw.write_bytes(gzip.compress(b"\xff" * 100))
    rc, _, err = _cli(capsys, "tox21", raw, "-o", tmp_path / "x.jsonl")
    assert rc == 2 and "not UTF-8 text" in err and "Traceback" not in err
