"""Evaluation metrics (scidfm_megatron.eval.metrics) against hand-computed values, and the task fixtures.

Every expected number below is worked out by hand in a comment, so a metric that drifts (wrong
fingerprint, wrong mean, wrong tokenisation, ...) fails.
"""

import json
from fractions import Fraction
from pathlib import Path

import pytest

from scidfm_megatron.eval import metrics as M

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "eval" / "data"


# --------------------------------------------------------------------------------- edit distance
@pytest.mark.parametrize("a,b,d", [
    ("kitten", "sitting", 3),   # k->s, e->i, +g
    ("flaw", "lawn", 2),        # -f, +n
    ("", "abc", 3),
    ("CCO", "CCO", 0),
    ("CCO", "OCC", 2),          # C->O at the start, O->C at the end
])
def test_levenshtein(a, b, d):
    assert M.levenshtein(a, b) == d
    assert M.levenshtein(b, a) == d


# ------------------------------------------------------------------------------------ SMILES
def test_canonical_smiles_and_validity(capfd):
    assert M.canonical_smiles("OCC") == M.canonical_smiles("CCO") == "CCO"
    assert M.canonical_smiles("c1ccccc1O") == M.canonical_smiles("Oc1ccccc1")
    assert M.canonical_smiles(" CCO\n") == "CCO"
    for bad in ("C1CC", "Xx", "", "   ", None, "C(C"):
        assert M.canonical_smiles(bad) is None
        assert not M.is_valid_smiles(bad)
    assert M.is_valid_smiles("CCO")
    out, err = capfd.readouterr()
    assert "SMILES Parse Error" not in out + err  # RDKit's log is silenced while parsing


def _count_tanimoto(a: dict, b: dict) -> float:
    """Tanimoto of two count vectors: sum(min) / (sum(a) + sum(b) - sum(min))."""
    inter = sum(min(a[k], b[k]) for k in a.keys() & b.keys())
    return inter / (sum(a.values()) + sum(b.values()) - inter)


def _morgan_counts(smi):
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2)
    return gen.GetSparseCountFingerprint(Chem.MolFromSmiles(smi)).GetNonzeroElements()


def test_morgan_tanimoto_by_hand():
    # Ethanol CCO: radius 0 gives 3 atom environments (CH3, CH2, OH), radius 1 three more; every radius-2
    # environment covers both bonds, like CH2's radius-1 one, so it is dropped as a duplicate -> 6 ids.
    # Methanol CO: C and O at radius 0, one radius-1 environment (the O's is the same bond) -> 3 ids.
    # CH3 (1 heavy neighbour, 3 H) and OH (1 heavy neighbour, 1 H) have the same radius-0 invariants in
    # both molecules -> 2 shared ids. Tanimoto = 2 / (6 + 3 - 2) = 2/7.
    a, b = _morgan_counts("CCO"), _morgan_counts("CO")
    assert (len(a), len(b), len(a.keys() & b.keys())) == (6, 3, 2)
    assert _count_tanimoto(a, b) == pytest.approx(2 / 7)
    assert M.fingerprint_tanimoto("CCO", "CO", "morgan") == pytest.approx(2 / 7)
    assert M.fingerprint_tanimoto("OCC", "CCO", "morgan") == 1.0


def test_morgan_is_count_based():
    # Hexane vs propane: Mol-Instructions' GetMorganFingerprint is a *count* fingerprint, so multiplicities
    # matter. Hexane has 7 distinct ids with counts summing to 16 (the CH2 radius-0 id occurs 4 times),
    # propane 4 ids summing to 6; 3 ids are shared with min-counts 1 + 2 + 2 = 5 -> 5 / (16 + 6 - 5) = 5/17,
    # whereas the set-based (bit) Tanimoto would be 3/8.
    a, b = _morgan_counts("CCCCCC"), _morgan_counts("CCC")
    assert (len(a), sum(a.values()), len(b), sum(b.values())) == (7, 16, 4, 6)
    assert sorted(min(a[k], b[k]) for k in a.keys() & b.keys()) == [1, 2, 2]
    assert _count_tanimoto(a, b) == pytest.approx(5 / 17)
    assert len(a.keys() & b.keys()) / len(a.keys() | b.keys()) == pytest.approx(3 / 8)
    assert M.fingerprint_tanimoto("CCCCCC", "CCC", "morgan") == pytest.approx(5 / 17)


@pytest.mark.parametrize("kind", ["rdk", "maccs"])
def test_bit_fingerprint_tanimoto_from_on_bits(kind):
    from rdkit import Chem
    from rdkit.Chem import MACCSkeys

    make = Chem.RDKFingerprint if kind == "rdk" else MACCSkeys.GenMACCSKeys
    for p, r in (("CCO", "CO"), ("c1ccccc1O", "c1ccccc1N"), ("CC(=O)Oc1ccccc1C(=O)O", "OC(=O)c1ccccc1O")):
        on_p = set(make(Chem.MolFromSmiles(p)).GetOnBits())
        on_r = set(make(Chem.MolFromSmiles(r)).GetOnBits())
        assert M.fingerprint_tanimoto(p, r, kind) == pytest.approx(len(on_p & on_r) / len(on_p | on_r))
    assert M.fingerprint_tanimoto("CCO", "OCC", kind) == 1.0


def test_fingerprint_tanimoto_known_values_and_invalid():
    # values checked against the on-bit computation above with RDKit 2026.9.1
    assert M.fingerprint_tanimoto("CCO", "CO", "maccs") == pytest.approx(0.4)      # 2 of 5 MACCS keys
    assert M.fingerprint_tanimoto("CCO", "CO", "rdk") == pytest.approx(1 / 3)
    for kind in M.FINGERPRINT_KINDS:
        assert M.fingerprint_tanimoto("CCO", "CCO", kind) == 1.0
        assert M.fingerprint_tanimoto("C1CC", "CCO", kind) is None
        assert M.fingerprint_tanimoto("CCO", "Xx", kind) is None
    with pytest.raises(ValueError, match="unknown fingerprint kind 'ecfp'"):
        M.fingerprint_tanimoto("CCO", "CCO", "ecfp")


REF = Path(__file__).resolve().parent / "data" / "eval_reference"


def test_molt5_convention_hand_computed():
    preds = ["OCC", "CO", "C1CC", "Xx"]
    refs = ["CCO", "CCO", "CCC", "CC"]
    s = M.molecule_generation_scores(preds, refs, convention="molt5")
    assert set(s) == {"exact", "levenshtein", "rdk_fts", "maccs_fts", "morgan_fts", "validity", "n"}
    assert s["validity"] == pytest.approx(2 / 4)          # OCC, CO parse; C1CC (unclosed ring), Xx do not
    assert s["exact"] == pytest.approx(1 / 4)             # only OCC == CCO (same InChI)
    # raw strings: OCC/CCO 2, CO/CCO 1, C1CC/CCC 1, Xx/CC 2
    assert s["levenshtein"] == pytest.approx((2 + 1 + 1 + 2) / 4)
    # FTS means over the 2 valid predictions only (invalid ones excluded, not scored 0):
    assert s["morgan_fts"] == pytest.approx((1 + 2 / 7) / 2)
    assert s["maccs_fts"] == pytest.approx((1 + 0.4) / 2)
    assert s["rdk_fts"] == pytest.approx((1 + 1 / 3) / 2)


def test_mol_instructions_convention_hand_computed():
    # the same pairs under Mol-Instructions' pipeline: the two invalid predictions are dropped, so every
    # metric is over OCC/CCO and CO/CCO; Levenshtein on canonical strings: CCO/CCO 0, CO/CCO 1
    s = M.molecule_generation_scores(["OCC", "CO", "C1CC", "Xx"], ["CCO", "CCO", "CCC", "CC"])
    assert (s["n"], s["n_scored"], s["validity"], s["exact"]) == (4, 2, 0.5, 0.5)
    assert s["levenshtein"] == pytest.approx(0.5)
    assert s["morgan_fts"] == pytest.approx((1 + 2 / 7) / 2) and s["maccs_fts"] == pytest.approx(0.7)
    # stereo and isotopes are removed before scoring: D- vs L-alanine and 13C-ethanol vs ethanol are exact
    s = M.molecule_generation_scores(["C[C@H](N)C(=O)O", "[13CH3]CO"], ["C[C@@H](N)C(=O)O", "CCO"])
    assert s["exact"] == 1.0 and s["levenshtein"] == 0.0 and s["morgan_fts"] == 1.0
    assert M.molecule_generation_scores(["C[C@H](N)C(=O)O"], ["C[C@@H](N)C(=O)O"], convention="molt5")["exact"] == 0


def test_molecule_generation_scores_edge_cases():
    s = M.molecule_generation_scores(["Xx", ""], ["CCO", "CC"])
    assert s["validity"] == 0 and s["exact"] == 0 and s["n_scored"] == 0 and s["levenshtein"] is None
    assert s["rdk_fts"] == s["maccs_fts"] == s["morgan_fts"] == 0.0   # no valid prediction at all
    s = M.molecule_generation_scores(["Xx", ""], ["CCO", "CC"], convention="molt5")
    assert s["levenshtein"] == pytest.approx((3 + 2) / 2)
    # surrounding whitespace of generated text is ignored
    assert M.molecule_generation_scores([" CCO\n"], ["CCO"])["levenshtein"] == 0
    assert M.molecule_generation_scores([" CCO\n"], ["CCO"], convention="molt5")["levenshtein"] == 0
    with pytest.raises(ValueError, match="empty"):
        M.molecule_generation_scores([], [])
    with pytest.raises(ValueError, match="2.*3"):
        M.molecule_generation_scores(["C", "CC"], ["C", "CC", "CCC"])
    with pytest.raises(ValueError, match="unknown molecule scoring convention 'x'"):
        M.molecule_generation_scores(["C"], ["C"], convention="x")


def _close(got: dict, want: dict):
    for k in ("exact", "levenshtein", "rdk_fts", "maccs_fts", "morgan_fts", "validity"):
        assert abs(got[k] - want[k]) <= 1e-6, (k, got[k], want[k])


def test_molecule_scores_equal_mol_instructions_own_code():
    """Expected numbers: zjunlp/Mol-Instructions' evaluate.py -> mol_translation_selfies.py /
    fingerprint_metrics.py, run unmodified outside the project (commit and versions in the file)."""
    ref = json.loads((REF / "mol_instructions_molgen.json").read_text())
    assert ref["source"]["commit"] == "d08a15f88e0c1b5e6d1e08330f570983885ddee1"
    sm = ref["smiles_predictions"]
    pairs, want = sm["pairs"], sm["expected"]
    notes = " ".join(p["note"] for p in pairs)
    for case in ("stereo", "isotope", "tautomers", "salt", "invalid", "empty"):
        assert case in notes
    got = M.molecule_generation_scores([p["pred"] for p in pairs], [p["ref"] for p in pairs])
    _close(got, want)
    assert (got["n"], got["n_scored"]) == (want["rows_read"], want["rows_scored"])
    # the same molecules written as SELFIES (what Mol-Instructions' own models emit) score the same
    _close(M.mol_instructions_scores([p["pred_selfies"] for p in pairs], [p["ref_selfies"] for p in pairs],
                                     representation="selfies"), want)
    # SELFIES quirks of evaluate.py: text after the last "]" cut, undecodable / empty generations dropped,
    # prose that decodes to an empty molecule kept (scored 0)
    sf = ref["selfies_predictions"]
    got = M.mol_instructions_scores([p["pred_selfies"] for p in sf["pairs"]], [p["ref_selfies"] for p in sf["pairs"]],
                                    representation="selfies")
    _close(got, sf["expected"])
    assert got["n_scored"] == sf["expected"]["rows_scored"]
    # the MolT5 convention equals MolT5's scripts on the raw strings
    _close(M.molecule_generation_scores([p["pred"] for p in pairs], [p["ref"] for p in pairs], convention="molt5"),
           ref["molt5_convention"]["expected"])


# ------------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_hand_computed():
    # pred 6 tokens, ref 6 tokens, LCS "the cat on the mat" = 5 -> P = R = F = 5/6
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # pred "protein kinase activity" (3), ref "serine threonine protein kinase" (4; '/' splits, case folded),
    # LCS "protein kinase" = 2: P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert M.rouge_l("protein kinase activity", "Serine/threonine protein kinase") == pytest.approx(4 / 7)
    assert M.rouge_l("Acyl-CoA reductase", "acyl coa reductase") == 1.0
    assert M.rouge_l("alpha beta", "gamma delta") == 0.0
    assert M.mean_rouge_l(["the cat sat on the mat", "protein kinase activity"],
                          ["the cat is on the mat", "Serine/threonine protein kinase"]) \
        == pytest.approx((5 / 6 + 4 / 7) / 2)
    with pytest.raises(ValueError, match="1.*2"):
        M.mean_rouge_l(["a"], ["a", "b"])


def test_protein_rouge_l_equals_mol_instructions_eval():
    """Mol-Instructions protein/eval.py (HF evaluate "rouge", seed 0) run outside the project: the
    bootstrap median and the per-pair F-measures equal ours."""
    ref = json.loads((REF / "mol_instructions_protein_rouge.json").read_text())
    preds = [p["response"] for p in ref["pairs"]]
    refs = [p["target"] for p in ref["pairs"]]
    got = M.mol_instructions_rouge_l(preds, refs, seed=ref["expected"]["seed"])
    assert abs(got["rouge_l"] - ref["expected"]["aggregated"]["rougeL"]) <= 1e-12
    per = ref["expected"]["per_pair_rougeL"]
    assert [M.rouge_l(p, r) for p, r in zip(preds, refs, strict=False)] == pytest.approx(per, abs=1e-12)
    assert got["rouge_l_mean"] == pytest.approx(sum(per) / len(per))
    assert abs(got["rouge_l"] - got["rouge_l_mean"]) > 1e-3  # the bootstrap median is not the mean


# ---------------------------------------------------------------------------------------- AUC
def test_auc_roc_hand_computed():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4; lost 0.35<0.4 -> 3/4
    assert M.auc_roc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.auc_roc([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert M.auc_roc([1, 0], [0.5, 0.5]) == 0.5               # a tie counts half
    assert M.auc_roc([True, False, False], [0.2, 0.3, 0.1]) == pytest.approx(0.5)  # 1 won, 1 lost of 2 pairs


def test_auc_roc_errors():
    with pytest.raises(ValueError, match="only one class"):
        M.auc_roc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        M.auc_roc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        M.auc_roc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="3.*2"):
        M.auc_roc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        M.auc_roc([0, 1], [0.1, float("nan")])


# ------------------------------------------------------------------------------- GSM8K / MATH
@pytest.mark.parametrize("text,answer", [
    ("so 1,000 + 234 = 1,234.\n#### 1,234", "1234"),
    ("#### 42\nLater the text mentions 7.", "42"),              # "####" wins over the last number
    ("Olivia has $23 - $15 = $8 left. The answer is $8.", "8"),
    ("It costs $1,234.50.", "1234.50"),
    ("The temperature fell to -7", "-7"),
    ("She had 5-3 = 2 apples left", "2"),                        # "-3" is a subtraction, not a negative
    ("no numbers here", None),
    ("", None),
])
def test_extract_gsm8k_answer(text, answer):
    assert M.extract_gsm8k_answer(text) == answer


@pytest.mark.parametrize("text,answer", [
    (r"Hence $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),       # nested braces kept
    (r"\boxed{1} first, then \boxed{a^{2}+\sqrt{b}}", r"a^{2}+\sqrt{b}"),  # the last box
    (r"so the result is \boxed 5", "5"),
    ("The answer is 12.", "12"),
    ("Final Answer: The final answer is $[2,5)$. I hope it is correct.", "[2,5)"),
    ("the answer is $0.25$", "0.25"),
    (r"unbalanced \boxed{1", None),
    ("no final answer", None),
])
def test_extract_math_answer(text, answer):
    assert M.extract_math_answer(text) == answer


@pytest.mark.parametrize("raw,norm", [
    ("2.0", "2"), ("1,000", "1000"), ("0.50", "0.5"), (".5", "0.5"), ("-3.", "-3"),
    (r"$\dfrac{1}{2}$", r"\frac{1}{2}"), (r"\tfrac52", r"\frac{5}{2}"),
    (r"\left( 3, 4 \right)", "(3,4)"), (r"1\!000", "1000"), ("(1,2)", "(1,2)"),
    (r"0.25\text{ cm}", "0.25"), (r"90^\circ", "90"), (None, ""),
])
def test_normalize_math_answer(raw, norm):
    assert M.normalize_math_answer(raw) == norm


def test_math_answers_equal():
    assert M.math_answers_equal("2.0", "2")
    assert M.math_answers_equal("1,000", "1000")
    assert M.math_answers_equal(r"\dfrac{1}{2}", "0.5")
    assert M.math_answers_equal("-2/3", r"-\frac{2}{3}")
    assert M.math_answers_equal(r"$\left(3, 4\right)$", "(3,4)")
    assert M.math_answers_equal(M.extract_gsm8k_answer("#### 18.00"), "18")
    assert not M.math_answers_equal(r"\frac{1}{3}", "0.33")
    assert not M.math_answers_equal("3", "4")
    assert not M.math_answers_equal(None, "4")
    assert not M.math_answers_equal("", "")


def test_accuracy():
    assert M.accuracy([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert M.accuracy(["A"], ["A"]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        M.accuracy([], [])
    with pytest.raises(ValueError, match="2.*1"):
        M.accuracy([1, 2], [1])


# ---------------------------------------------------------------------------------- fixtures
def _rows(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_fixtures_schema_and_size():
    total = 0
    for name in ("multiple_choice.jsonl", "math_generation.jsonl", "molecule_generation.jsonl",
                 "protein_understanding.jsonl", "moleculenet.jsonl"):
        rows = _rows(name)
        assert 10 <= len(rows) <= 40, name
        total += (DATA / name).stat().st_size
    assert total < 200_000
    assert "## Licenses" in (ROOT / "examples" / "eval" / "SOURCES.md").read_text()

    for r in _rows("multiple_choice.jsonl"):
        assert isinstance(r["question"], str) and r["question"]
        assert len(r["choices"]) >= 2 and all(isinstance(c, str) and c for c in r["choices"])
        assert isinstance(r["answer"], int) and 0 <= r["answer"] < len(r["choices"])
    for r in _rows("math_generation.jsonl"):
        assert r["question"] and M.normalize_math_answer(r["answer"])
    gsm = [r for r in _rows("math_generation.jsonl") if "gsm8k" in r["source"]]
    assert gsm and all(Fraction(r["answer"]).denominator == 1 for r in gsm)
    for r in _rows("molecule_generation.jsonl"):
        assert r["instruction"] and r["input"]
        assert M.canonical_smiles(r["output"]) == r["output"]   # valid and stored canonical
    for r in _rows("protein_understanding.jsonl"):
        assert r["instruction"] and r["output"]
        assert set(r["input"]) <= set("ACDEFGHIKLMNPQRSTVWYXBZUO")
    rows = _rows("moleculenet.jsonl")
    assert {r["label"] for r in rows} == {0, 1}
    for q in {r["question"] for r in rows}:
        assert {r["label"] for r in rows if r["question"] == q} == {0, 1}  # AUC defined per question
    assert all(M.is_valid_smiles(r["smiles"]) and r["question"] for r in rows)


def test_fixture_lipinski_labels_match_rdkit():
    """The computed Lipinski labels agree with an independent rule-of-five count."""
    from rdkit import Chem
    from rdkit.Chem import Crippen, Descriptors, Lipinski

    rows = [r for r in _rows("moleculenet.jsonl") if "Lipinski" in r["question"]]
    assert rows
    for r in rows:
        m = Chem.MolFromSmiles(r["smiles"])
        ok = (Descriptors.MolWt(m) <= 500 and Crippen.MolLogP(m) <= 5 and Lipinski.NumHDonors(m) <= 5
              and Lipinski.NumHAcceptors(m) <= 10)
        assert r["label"] == int(ok), r["smiles"]


# ------------------------------------------------------------------------ GSM8K as lm-eval scores it
# Realistic completions: (completion, gold solution as GSM8K writes it, strict correct, flexible correct)
GSM8K_CASES = [
    ("Janet's ducks lay 16 eggs. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 eggs are left.\n"
     "She sells them for $2 each: 9 * 2 = $18.\n#### 18", "She has 16 - 3 - 4 = <<16-3-4=9>>9 left.\n#### 18",
     True, True),
    ("Tom is 3 years older than Ann, who is 5.\n#### 8 years", "Ann is 5, Tom 5 + 3 = 8.\n#### 8", True, True),  # units
    ("The farm sells 1,250 kg in all.\n#### 1,250", "#### 1250", True, True),  # thousands
    ("She earns 40 * 27 = $1,080 a month.\n\nThe answer is $1,080.", "#### 1080", False, True),  # "$", no ####
    ("It was 3 degrees and fell by 8, so 3 - 8 = -5.\n#### -5", "#### -5", True, True),  # negative
    ("First, each box holds 12 * 4 = 48 pencils.\n\nThen two boxes hold 96.\n\nFinally 96 + 4 = 100.\n#### 100",
     "#### 100", True, True),  # paragraphs
    ("Each costs 2.50, so four cost 10.00.\n#### 10.00", "#### 10", False, False),  # lm-eval compares strings
    ("3 boxes of 4 make 12, and 2 more boxes make 20 in all.", "#### 20", False, True),  # last number
    ("He pays 5 + 3 = 8 dollars.\n#### 7", "#### 8", False, False),  # wrong
    ("I am not sure.", "#### 3", False, False),
]


def _lm_eval_gsm8k_task_scores(completions, golds):
    """lm-eval's own gsm8k task (its YAML, ConfigurableTask, apply_filters, process_results), offline:
    the dataset is built in memory instead of downloaded."""
    import datasets
    import lm_eval
    import yaml
    from lm_eval.api.task import ConfigurableTask

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    for k in ("dataset_path", "dataset_name", "training_split", "fewshot_split"):
        cfg.pop(k)
    docs = [{"question": f"q{i}", "answer": g} for i, g in enumerate(golds)]
    cfg.update(num_fewshot=0,
               custom_dataset=lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)}))
    task = ConfigurableTask(config=cfg)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    for inst in task.instances:
        inst.resps = [completions[inst.doc_id]]
    task.apply_filters()
    out = {}
    for inst in task.instances:
        for name, resp in inst.filtered_resps.items():
            out[(inst.doc_id, name)] = (resp, float(task.process_results(inst.doc, [resp])["exact_match"]))
    return out


def test_gsm8k_scores_equal_lm_eval_gsm8k_task():
    comps, golds = [c[0] for c in GSM8K_CASES], [c[1] for c in GSM8K_CASES]
    scores, per = M.gsm8k_scores(comps, golds)
    for (c, _g, strict, flexible), p in zip(GSM8K_CASES, per, strict=False):  # hand-labelled
        assert (p["strict_match"]["correct"], p["flexible_extract"]["correct"]) == (strict, flexible), c
    assert scores["strict_match"] == pytest.approx(100 * sum(c[2] for c in GSM8K_CASES) / len(GSM8K_CASES))
    assert scores["flexible_extract"] == pytest.approx(100 * sum(c[3] for c in GSM8K_CASES) / len(GSM8K_CASES))
    theirs = _lm_eval_gsm8k_task_scores(comps, golds)
    for i, p in enumerate(per):
        for name in ("strict-match", "flexible-extract"):
            mine = p[name.replace("-", "_")]
            assert (mine["extracted"], float(mine["correct"])) == theirs[(i, name)], (i, name)
    assert M.gsm8k_config()["until"] == ["Question:", "</s>", "<|im_end|>"]


def test_stop_sequences_not_blank_lines():
    text = "Step 1: 6 * 7 = 42.\n\nSo the answer is 42.\n#### 42\n\nQuestion: A farmer has 7 cows"
    cut = M.cut_at_stop_sequences(text, M.gsm8k_config()["until"])
    assert cut == "Step 1: 6 * 7 = 42.\n\nSo the answer is 42.\n#### 42\n\n"
    assert M.gsm8k_scores([cut], ["#### 42"])[0] == {"strict_match": 100.0, "flexible_extract": 100.0}
    assert M.gsm8k_scores([text], ["#### 42"])[0]["flexible_extract"] == 0.0  # uncut: the 7 cows win


# Realistic MATH completions: (completion, gold solution or answer, correct)
MATH_CASES = [
    ("The domain needs $x-2\\ge0$ and $5-x>0$, so it is $\\boxed{[2,5)}$.", "so the domain is $\\boxed{[2,5)}$.", True),
    ("Adding the fractions gives $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", True),              # dfrac == frac
    ("So $x = \\boxed{0.5}$.", "\\frac12", True),                                               # 0.5 and \frac12
    ("The side is $\\boxed{5 \\text{ cm}}$.", "5", True),                                      # units dropped
    ("Hence $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("First $\\boxed{2}$, but correcting the sign, $\\boxed{-2}$.", "-2", True),               # the last box
    ("The answer is -2.", "-2", False),                                                         # no box
    ("$\\boxed{\\frac{2}{3}}$", "-\\frac{2}{3}", False),
]


def test_math_scores_math_convention():
    scores, per = M.math_scores([c[0] for c in MATH_CASES], [c[1] for c in MATH_CASES])
    assert [p["correct"] for p in per] == [c[2] for c in MATH_CASES]
    assert scores["acc"] == pytest.approx(100 * 6 / 8)
    assert per[0]["gold"] == "[2,5)" and per[5]["extracted"] == "-2"


# ------------------------------------------------------------------------------ MoleculeNet AUC
def test_moleculenet_per_task_auc_equals_sklearn():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    tasks, labels, scores = [], [], []
    for t, n in (("NR-AR", 40), ("SR-p53", 25), ("NR-AhR", 33)):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        tasks += [t] * n
        labels += y.tolist()
        scores += (0.3 * y + rng.random(n)).tolist()
    tasks += ["SR-MMP"] * 5  # only negatives: no AUC, skipped as MoleculeNet does
    labels += [0] * 5
    scores += [0.5] * 5
    res = M.moleculenet_auc(labels, scores, tasks)
    want = {}
    for t in ("NR-AR", "SR-p53", "NR-AhR"):
        idx = [i for i, x in enumerate(tasks) if x == t]
        want[t] = 100 * roc_auc_score([labels[i] for i in idx], [scores[i] for i in idx])
    assert res["auc_per_task"] == pytest.approx(want, abs=1e-12)
    assert res["auc_roc"] == pytest.approx(sum(want.values()) / 3, abs=1e-12)
    assert res["skipped_tasks"] == ["SR-MMP"]
    pooled = 100 * roc_auc_score(labels, scores)
    assert abs(pooled - res["auc_roc"]) > 0.1  # the mean of per-task AUCs is not one pooled AUC
    with pytest.raises(ValueError, match="no task has both"):
        M.moleculenet_auc([0, 0, 1], [0.1, 0.2, 0.3], ["a", "a", "b"])
