"""Evaluation metrics used by the SciDFM paper (section 3), as pure functions.

No model code lives here: the harness generates or scores text and hands the strings / numbers to these
functions. Libraries do the heavy lifting: RDKit (SMILES parsing, fingerprints), rapidfuzz (edit distance),
rouge-score (ROUGE-L), scikit-learn (AUC-ROC).

Conventions, and where they come from
-------------------------------------
Molecule generation: two conventions (:func:`molecule_generation_scores`, ``convention=``).

``"mol_instructions"`` (default; :func:`mol_instructions_scores`) is zjunlp/Mol-Instructions' pipeline, whose
numbers the SciDFM paper's Table 8 reports: ``evaluation/molecule/evaluate.py`` (``task='mol_gen'``), then
``mol_translation_selfies.py`` and ``fingerprint_metrics.py`` (tested equal to 1e-6 against that code, run
unmodified at commit d08a15f, on tests/data/eval_reference/mol_instructions_molgen.json):

* a prediction is *dropped* (from every metric but validity) when it is empty, or does not parse
  (SMILES: RDKit; SELFIES: ``selfies.decoder`` after cutting the text after the last ``]``, as
  evaluate.py does); a pair whose reference does not parse is dropped too;
* both sides become RDKit canonical **non-isomeric** SMILES (``isomericSmiles=False``: stereo and isotope
  labels removed), and every metric reads those strings;
* **exact**: InChI of the two canonical molecules equal, over the scored pairs;
* **levenshtein**: mean edit distance between the canonical strings, over the scored pairs;
* **rdk_fts / maccs_fts / morgan_fts**: mean Tanimoto over the scored pairs;
* **validity**: scored pairs / all pairs (evaluate.py's ``all_data``; the scripts' own "validity" is
  printed on the already-filtered file and is 1.0 by construction);
* ``n`` and ``n_scored`` are returned too. With nothing scored, exact and the FTS are 0.0 and
  levenshtein is None (undefined).

``"molt5"`` (:func:`molt5_scores`): MolT5's own two scripts (blender-nlp/MolT5, copied unchanged into
Mol-Instructions) on the raw strings, no canonicalisation or filtering: exact = InChI equal over all pairs
(isomeric, as parsed), levenshtein on the raw strings over all pairs, validity = 1 - (pairs whose InChI
step fails) / all, FTS over the pairs whose prediction parses (RDKit parses an empty string as an empty
molecule, so MolT5 counts it valid with similarity 0). Numbers from it are not comparable with Table 8.

Fingerprints (both conventions): ``Chem.RDKFingerprint(mol)``; ``MACCSkeys.GenMACCSKeys(mol)``; Morgan
radius 2 as the *unhashed count* fingerprint that ``AllChem.GetMorganFingerprint(mol, 2)`` returns, here
from the equivalent ``rdFingerprintGenerator.GetMorganGenerator(radius=2).GetSparseCountFingerprint``.
Tanimoto on count vectors is ``sum(min) / (sum(a) + sum(b) - sum(min))``; on bit vectors ``|A&B| / |A|B|``.

Protein understanding: :func:`mol_instructions_rouge_l` is Mol-Instructions' ``evaluation/protein/eval.py``
exactly: Hugging Face ``evaluate``'s "rouge" (package rouge-score 0.1.2, variant ``rougeL``: sentence-level
LCS F-measure, no stemming, default tokenizer that lower-cases and splits on non-alphanumerics; not
``rougeLsum``), aggregated by rouge-score's ``BootstrapAggregator`` median, seeded. :func:`rouge_l` is one
pair's F-measure and :func:`mean_rouge_l` the plain mean.

MoleculeNet: AUC-ROC of the model's score for the positive answer (:func:`auc_roc`).

GSM8K / MATH: final-answer extraction (:func:`extract_gsm8k_answer`, :func:`extract_math_answer`), then
:func:`math_answers_equal` (string equality after :func:`normalize_math_answer`, plus exact rational
equality for plain numbers and simple fractions); :func:`accuracy` averages.

Errors: empty inputs and mismatched list lengths raise ``ValueError`` (the message names both lengths).
RDKit, rouge-score and scikit-learn are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from fractions import Fraction
from typing import Sequence

__all__ = [
    "canonical_smiles", "is_valid_smiles", "fingerprint_tanimoto", "levenshtein", "molecule_generation_scores",
    "mol_instructions_scores", "molt5_scores", "MOLECULE_CONVENTIONS",
    "rouge_l", "mean_rouge_l", "mol_instructions_rouge_l", "auc_roc", "moleculenet_auc", "gsm8k_scores", "math_scores",
    "extract_gsm8k_answer", "extract_math_answer",
    "normalize_math_answer", "math_answers_equal", "accuracy", "FINGERPRINT_KINDS",
]

FINGERPRINT_KINDS = ("rdk", "maccs", "morgan")


# ------------------------------------------------------------------------------------- helpers
def _check_pairs(a: Sequence, b: Sequence, what: str, names: tuple[str, str] = ("preds", "refs")) -> int:
    if len(a) != len(b):
        raise ValueError(f"{what}: {names[0]} has {len(a)} items but {names[1]} has {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{what}: empty inputs ({names[0]} and {names[1]} have 0 items)")
    return len(a)


@contextmanager
def _rdkit_quiet():
    """Silence RDKit's log while parsing model output (parse failures are expected there).

    Uses ``rdBase.BlockLogs``, which restores the previous log state on exit (unlike a bare
    ``RDLogger.DisableLog`` / ``EnableLog`` pair, which would re-enable logs a caller had disabled).
    """
    from rdkit import rdBase

    block = rdBase.BlockLogs()
    try:
        yield
    finally:
        del block


def _mol(s):
    """RDKit molecule for a SMILES string, or None (unparseable, empty, non-string, or zero atoms)."""
    if not isinstance(s, str) or not s.strip():
        return None
    from rdkit import Chem

    with _rdkit_quiet():
        try:
            mol = Chem.MolFromSmiles(s.strip())
        except Exception:  # noqa: BLE001 - RDKit can raise on pathological input; treat as invalid
            return None
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return mol


# ------------------------------------------------------------------------------------ chemistry
def canonical_smiles(s: str) -> str | None:
    """RDKit canonical isomeric SMILES of ``s`` (surrounding whitespace ignored), or None if it does not parse.

    ``canonical_smiles("OCC") == canonical_smiles("CCO") == "CCO"``; ``canonical_smiles("C1CC") is None``.
    """
    mol = _mol(s)
    if mol is None:
        return None
    from rdkit import Chem

    return Chem.MolToSmiles(mol)


def is_valid_smiles(s) -> bool:
    """True when RDKit parses ``s`` into a molecule with at least one atom."""
    return _mol(s) is not None


def _fingerprint(mol, kind: str):
    from rdkit import Chem
    from rdkit.Chem import MACCSkeys, rdFingerprintGenerator

    if kind == "rdk":
        return Chem.RDKFingerprint(mol)
    if kind == "maccs":
        return MACCSkeys.GenMACCSKeys(mol)
    if kind == "morgan":
        return rdFingerprintGenerator.GetMorganGenerator(radius=2).GetSparseCountFingerprint(mol)
    raise ValueError(f"unknown fingerprint kind {kind!r}; expected one of {FINGERPRINT_KINDS}")


def _tanimoto_mols(m1, m2, kind: str) -> float:
    from rdkit import DataStructs

    return float(DataStructs.TanimotoSimilarity(_fingerprint(m1, kind), _fingerprint(m2, kind)))


def fingerprint_tanimoto(pred: str, ref: str, kind: str) -> float | None:
    """Tanimoto similarity of the ``kind`` fingerprints ("rdk", "maccs" or "morgan") of two SMILES.

    Returns None when either SMILES is invalid. See the module docstring for the exact fingerprints
    (Mol-Instructions conventions; Morgan is the radius-2 count fingerprint).
    """
    if kind not in FINGERPRINT_KINDS:
        raise ValueError(f"unknown fingerprint kind {kind!r}; expected one of {FINGERPRINT_KINDS}")
    m1, m2 = _mol(pred), _mol(ref)
    if m1 is None or m2 is None:
        return None
    return _tanimoto_mols(m1, m2, kind)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two strings."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


MOLECULE_CONVENTIONS = ("mol_instructions", "molt5")

# Strings pandas.read_table reads as missing (its default na_values): Mol-Instructions' evaluate.py reads
# the generations with it and drops rows holding one, so such a generation is dropped here too.
_PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def _mol_quiet(smiles: str):
    """``Chem.MolFromSmiles`` with RDKit's log silenced (None when it does not parse)."""
    from rdkit import Chem

    with _rdkit_quiet():
        try:
            return Chem.MolFromSmiles(smiles)
        except Exception:  # noqa: BLE001 - RDKit can raise on pathological input; it does not parse
            return None


def _inchi(mol) -> str:
    from rdkit import Chem

    with _rdkit_quiet():
        return Chem.MolToInchi(mol)


def _decode_selfies(text: str):
    """evaluate.py's ``sf_encode``: the text up to its last ``]`` decoded with ``selfies``; None if that fails."""
    import selfies as sf

    text = text.rsplit("]", 1)[0] + "]"
    try:
        return sf.decoder(text)
    except Exception:  # noqa: BLE001 - evaluate.py drops any decoding failure
        return None


def _mi_canonical(text, representation: str):
    """Mol-Instructions' canonical non-isomeric SMILES of one side, or None when the pair is dropped."""
    from rdkit import Chem

    if not isinstance(text, str) or text.strip() in _PANDAS_NA:
        return None
    smiles = _decode_selfies(text) if representation == "selfies" else text.strip()
    if smiles is None:
        return None
    mol = _mol_quiet(smiles)
    return None if mol is None else Chem.MolToSmiles(mol, isomericSmiles=False, canonical=True)


def mol_instructions_scores(preds: list[str], refs: list[str], representation: str = "smiles") -> dict:
    """Molecule-generation metrics exactly as zjunlp/Mol-Instructions computes them (module docstring).

    ``representation``: what ``preds`` and ``refs`` are written in: ``"smiles"`` (this project's models
    write SMILES; surrounding whitespace ignored) or ``"selfies"`` (Mol-Instructions' own data and models).
    Returns ``{"exact", "levenshtein", "rdk_fts", "maccs_fts", "morgan_fts", "validity", "n", "n_scored"}``.
    """
    if representation not in ("smiles", "selfies"):
        raise ValueError(f"representation must be 'smiles' or 'selfies', got {representation!r}")
    n = _check_pairs(preds, refs, "mol_instructions_scores")
    scored = []
    for p, r in zip(preds, refs):
        cp = _mi_canonical(p, representation)
        if cp is None:
            continue
        cr = _mi_canonical(r, representation)
        if cr is not None:
            scored.append((cp, cr))
    exact, levs, sims = 0, [], {k: [] for k in FINGERPRINT_KINDS}
    for cp, cr in scored:  # mol_translation_selfies.py then fingerprint_metrics.py, on the canonical strings
        mp, mr = _mol_quiet(cp), _mol_quiet(cr)
        try:
            exact += int(_inchi(mp) == _inchi(mr))
        except Exception:  # noqa: BLE001 - the script counts the pair as not exact
            pass
        levs.append(levenshtein(cp, cr))
        if mp is not None and mr is not None:
            for k in FINGERPRINT_KINDS:
                sims[k].append(_tanimoto_mols(mr, mp, k))
    m = len(scored)

    def mean(xs):
        return float(sum(xs) / len(xs)) if xs else 0.0

    return {
        "exact": exact / m if m else 0.0,
        "levenshtein": float(sum(levs) / m) if m else None,
        "rdk_fts": mean(sims["rdk"]),
        "maccs_fts": mean(sims["maccs"]),
        "morgan_fts": mean(sims["morgan"]),
        "validity": m / n,
        "n": n,
        "n_scored": m,
    }


def molt5_scores(preds: list[str], refs: list[str]) -> dict:
    """MolT5's scripts on raw SMILES strings, every pair counted (module docstring, ``"molt5"``)."""
    n = _check_pairs(preds, refs, "molt5_scores")
    exact = bad = 0
    lev_total = 0
    sims = {k: [] for k in FINGERPRINT_KINDS}
    for p, r in zip(preds, refs):
        p = p.strip() if isinstance(p, str) else ""
        r = r.strip() if isinstance(r, str) else ""
        mp, mr = _mol_quiet(p), _mol_quiet(r)
        try:
            exact += int(_inchi(mp) == _inchi(mr))
        except Exception:  # noqa: BLE001 - MolT5: a failure here is a "bad molecule"
            bad += 1
        lev_total += levenshtein(p, r)
        if mp is not None and mr is not None:
            for k in FINGERPRINT_KINDS:
                sims[k].append(_tanimoto_mols(mr, mp, k))

    def mean(xs):
        return float(sum(xs) / len(xs)) if xs else 0.0

    return {"exact": exact / n, "levenshtein": lev_total / n, "rdk_fts": mean(sims["rdk"]),
            "maccs_fts": mean(sims["maccs"]), "morgan_fts": mean(sims["morgan"]), "validity": 1 - bad / n, "n": n}


def molecule_generation_scores(preds: list[str], refs: list[str], convention: str = "mol_instructions",
                               representation: str = "smiles") -> dict:
    """Molecule-generation metrics under ``convention`` (``"mol_instructions"``, the default and what the
    paper's Table 8 uses, or ``"molt5"``). ValueError on empty or mismatched lists or an unknown name."""
    if convention == "mol_instructions":
        return mol_instructions_scores(preds, refs, representation)
    if convention == "molt5":
        if representation != "smiles":
            raise ValueError("the molt5 convention scores SMILES strings only")
        return molt5_scores(preds, refs)
    raise ValueError(f"unknown molecule scoring convention {convention!r}; choose one of {MOLECULE_CONVENTIONS}")


# ------------------------------------------------------------------------------------- ROUGE-L
_ROUGE = None


def _rouge_scorer():
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (LCS of tokens; P = LCS/len(pred), R = LCS/len(ref), F = 2PR/(P+R)).

    Tokenisation is rouge-score's default: lower-case, non-alphanumerics are separators, no stemming.
    """
    pred = pred if isinstance(pred, str) else ""  # e.g. a missing generation scores 0
    ref = ref if isinstance(ref, str) else ""
    return float(_rouge_scorer().score(ref, pred)["rougeL"].fmeasure)


def mean_rouge_l(preds: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F-measure over pairs (ValueError on empty or mismatched lists)."""
    n = _check_pairs(preds, refs, "mean_rouge_l")
    return sum(rouge_l(p, r) for p, r in zip(preds, refs)) / n


def mol_instructions_rouge_l(preds: list[str], refs: list[str], seed: int = 0) -> dict:
    """ROUGE-L of Mol-Instructions' ``evaluation/protein/eval.py``, which calls Hugging Face ``evaluate``'s
    "rouge" metric with its defaults: rouge-score's ``RougeScorer(["rouge1", "rouge2", "rougeL",
    "rougeLsum"], use_stemmer=False)`` (default tokenizer), per-pair F-measures aggregated by rouge-score's
    ``BootstrapAggregator`` (1000 resamples of the pairs; the reported value is the *median* of the
    resample means, ``.mid.fmeasure``), numpy seeded with ``seed`` as ``evaluate.load("rouge",
    seed=seed)`` does (the caller's numpy random state is restored afterwards).

    Returns ``{"rouge_l": that value (Table 9's ROUGE-L), "rouge_l_mean": the plain mean of the per-pair
    F-measures}``. Equal to ``evaluate`` on tests/data/eval_reference/mol_instructions_protein_rouge.json.
    """
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    n = _check_pairs(preds, refs, "mol_instructions_rouge_l")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    agg = scoring.BootstrapAggregator()
    per = []
    for p, r in zip(preds, refs):
        sc = scorer.score(r if isinstance(r, str) else "", p if isinstance(p, str) else "")
        agg.add_scores(sc)
        per.append(sc["rougeL"].fmeasure)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        result = agg.aggregate()  # resamples rouge1, rouge2, rougeL, rougeLsum in that order, as evaluate does
    finally:
        np.random.set_state(state)
    return {"rouge_l": float(result["rougeL"].mid.fmeasure), "rouge_l_mean": float(sum(per) / n)}


# ------------------------------------------------------------------------------------------ AUC
def auc_roc(labels: list[int], scores: list[float]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive), ties counted half.

    Raises ValueError for mismatched lengths, labels other than 0/1, non-finite scores, or when only one
    class is present (AUC is undefined then).
    """
    _check_pairs(labels, scores, "auc_roc", ("labels", "scores"))
    ys = []
    for y in labels:
        if y not in (0, 1):  # also accepts True/False and 0.0/1.0
            raise ValueError(f"auc_roc: labels must be 0 or 1, got {y!r}")
        ys.append(int(y))
    xs = [float(s) for s in scores]
    if not all(math.isfinite(x) for x in xs):
        raise ValueError("auc_roc: scores must be finite numbers (got NaN or inf)")
    present = set(ys)
    if len(present) < 2:
        only = "positive (1)" if present == {1} else "negative (0)"
        raise ValueError(f"auc_roc: only one class present in labels (all {len(ys)} are {only}); "
                         "AUC-ROC needs both positives and negatives")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(ys, xs))


def moleculenet_auc(labels: list[int], scores: list[float], tasks: list[str]) -> dict:
    """MoleculeNet's multi-task AUC-ROC: one AUC per task (``tasks[i]`` names the task of example i, e.g.
    Tox21's "NR-AR"; a single-task dataset has one task), the dataset's figure their mean (Wu et al. 2018,
    MoleculeNet; as in DeepChem / chemprop, a task whose examples are all of one class has no AUC and is
    left out, listed under ``skipped_tasks``). Returns ``{"auc_roc": mean %, "auc_per_task": {task: %},
    "skipped_tasks": [...]}``; ValueError when no task has both classes."""
    _check_pairs(labels, scores, "moleculenet_auc", ("labels", "scores"))
    _check_pairs(labels, tasks, "moleculenet_auc", ("labels", "tasks"))
    by: dict = {}
    for y, x, t in zip(labels, scores, tasks):
        by.setdefault(t, ([], []))
        by[t][0].append(y)
        by[t][1].append(x)
    per, skipped = {}, []
    for t, (ys, xs) in by.items():
        if len(set(int(y) for y in ys)) < 2:
            skipped.append(t)
            continue
        per[t] = 100 * auc_roc(ys, xs)
    if not per:
        raise ValueError(f"moleculenet_auc: no task has both positive and negative examples "
                         f"(tasks: {sorted(by)}); AUC-ROC is undefined")
    return {"auc_roc": sum(per.values()) / len(per), "auc_per_task": per, "skipped_tasks": skipped}


# ------------------------------------------------------------------------------- math answers
# A number: optional minus (not a subtraction sign such as the one in "5-3"), digits with optional
# thousands commas, optional decimals; or a bare decimal such as ".5".
_NUMBER = r"(?:(?<![\w)])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"


def _clean_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").strip()
    return s.rstrip(".")


def extract_gsm8k_answer(text: str) -> str | None:
    """GSM8K final answer: the number after the last "####" if there is one, else the last number in text.

    Commas, "$" and a trailing "." are removed: ``"#### 1,234"`` -> ``"1234"``, ``"costs $5."`` -> ``"5"``.
    Returns None when no number is found. Compare answers with :func:`math_answers_equal`
    (so "18.00" matches "18").
    """
    if not isinstance(text, str):
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1].replace("$", "")
        m = re.search(_NUMBER, tail)
        if m:
            return _clean_number(m.group(0))
    found = re.findall(_NUMBER, text.replace("$", ""))
    return _clean_number(found[-1]) if found else None


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces (or ``\\boxed x``)."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text)]
    for m in reversed(starts):
        if m.group(1) is None:  # "\boxed 5": the token after the space
            tok = re.match(r"\s*([^\s$]+)", text[m.end():])
            if tok:
                return tok.group(1)
            continue
        depth, i = 1, m.end()
        while i < len(text):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[m.end():i]
            i += 1
        # unbalanced: try an earlier \boxed
    return None


def extract_math_answer(text: str) -> str | None:
    """MATH final answer: content of the last ``\\boxed{...}`` (nested braces kept, e.g. ``\\frac{1}{2}``),
    else the text after the last "The answer is" / "The final answer is" (to the end of its sentence or
    line, surrounding ``$`` and a trailing "." removed), else None.
    """
    if not isinstance(text, str):
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hits = list(re.finditer(r"the (?:final )?answer is\s*:?", text, flags=re.IGNORECASE))
    if not hits:
        return None
    rest = text[hits[-1].end():].strip().split("\n", 1)[0]
    rest = re.split(r"\.\s", rest, maxsplit=1)[0].strip()  # "$24$. I hope it is correct." -> "$24$"
    rest = rest.rstrip(".").strip().strip("$").strip().rstrip(".")
    return rest or None


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{2}`` -> ``\frac{1}{2}`` (MATH's shorthand)."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return s


def normalize_math_answer(s: str) -> str:
    r"""Canonical string form of a final answer, for comparison.

    Removes surrounding ``$``, all whitespace, ``\left`` / ``\right``, ``\!``, ``\,``, ``\;``, ``\$``,
    ``\%`` / ``%``, degree marks, a trailing unit written ``\text{ unit}`` (leading space inside, as MATH
    writes units), and a trailing "."; ``\dfrac`` / ``\tfrac`` -> ``\frac``; ``\frac12`` -> ``\frac{1}{2}``.
    Plain numbers are rewritten canonically: ``"2.0"`` -> ``"2"``, ``"1,000"`` -> ``"1000"``,
    ``"0.50"`` -> ``"0.5"``, ``".5"`` -> ``"0.5"``. ``None`` -> ``""``.
    """
    if s is None:
        return ""
    s = str(s).strip()
    unit = re.search(r"\\text\{\s+[^{}]*\}\s*$", s)  # "0.25\text{ cm}" -> "0.25"
    if unit and s[:unit.start()].strip():
        s = s[:unit.start()].strip()
    while len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s[1:-1].strip()
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\$", ""),
                     ("\\%", ""), ("%", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = _fix_fracs(s)
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|-?\.\d+", s):
        s = _canonical_number(s.replace(",", ""))
    return s


def _canonical_number(s: str) -> str:
    frac = Fraction(s)
    if frac.denominator == 1:
        return str(frac.numerator)
    text = s.lstrip("-")
    if text.startswith("."):
        text = "0" + text
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return ("-" if frac < 0 else "") + text


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a normalised plain number, ``a/b`` or ``\\frac{a}{b}`` (optionally negated)."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", s)
    try:
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        if re.fullmatch(r"-?\d+(?:\.\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_answers_equal(a, b) -> bool:
    """True when two final answers agree after :func:`normalize_math_answer`, or denote the same rational
    number (``"0.5"`` == ``"\\frac{1}{2}"`` == ``"1/2"``). None or empty answers never match.
    """
    if a is None or b is None:
        return False
    na, nb = normalize_math_answer(a), normalize_math_answer(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    fa, fb = _as_fraction(na), _as_fraction(nb)
    return fa is not None and fb is not None and fa == fb


def accuracy(preds: list, golds: list) -> float:
    """Fraction of positions where ``preds[i] == golds[i]`` (ValueError on empty or mismatched lists)."""
    n = _check_pairs(preds, golds, "accuracy", ("preds", "golds"))
    return sum(1 for p, g in zip(preds, golds) if p == g) / n


# ------------------------------------------------------------------ GSM8K / MATH as lm-eval scores them
def _lm_eval_task_yaml(rel: str) -> dict:
    """A task YAML shipped inside the installed lm-eval (lm_eval/tasks/<rel>), parsed."""
    import lm_eval
    import yaml
    from pathlib import Path

    path = Path(lm_eval.__file__).parent / "tasks" / rel
    return yaml.safe_load(path.read_text())


_GSM8K = None


def gsm8k_config() -> dict:
    """lm-eval's own GSM8K task (``lm_eval/tasks/gsm8k/gsm8k.yaml`` of the installed lm-eval 0.4.13):
    ``until`` (its stop sequences), ``filters`` ({name: lm-eval FilterEnsemble}) and ``metric`` (the
    ``exact_match`` options: ignore_case, regexes_to_ignore, ...)."""
    global _GSM8K
    if _GSM8K is None:
        from lm_eval.filters import build_filter_ensemble

        cfg = _lm_eval_task_yaml("gsm8k/gsm8k.yaml")
        filters = {f["name"]: build_filter_ensemble(f["name"], [(c["function"], {k: v for k, v in c.items()
                                                                                 if k != "function"} or None)
                                                                for c in f["filter"]])
                   for f in cfg["filter_list"]}
        metric = {k: v for k, v in cfg["metric_list"][0].items() if k not in ("metric", "aggregation",
                                                                               "higher_is_better")}
        _GSM8K = dict(until=list(cfg["generation_kwargs"]["until"]), filters=filters, metric=metric)
    return _GSM8K


def gsm8k_scores(completions: list[str], golds: list[str]) -> tuple[dict, list[dict]]:
    """GSM8K accuracy exactly as lm-eval's ``gsm8k`` task computes it: each completion goes through its
    two filters (``strict-match``: the number after ``#### ``; ``flexible-extract``: the last number-like
    match), then lm-eval's ``exact_match`` against the gold answer (a full GSM8K solution ending
    ``#### N`` or just ``N``) with the task's options (case-insensitive; ``,``, ``$``, everything up to
    ``#### `` and a final ``.`` removed from both sides). lm-eval's own filter and metric functions are
    called. Returns ``({"strict_match": %, "flexible_extract": %}, per-sample extractions)``."""
    from lm_eval.api.metrics import exact_match_hf_evaluate

    _check_pairs(completions, golds, "gsm8k_scores", ("completions", "golds"))
    cfg = gsm8k_config()
    golds = [str(g) for g in golds]
    from lm_eval.api.instance import Instance

    out, per = {}, [dict() for _ in completions]
    for name, ensemble in cfg["filters"].items():
        insts = [Instance(request_type="generate_until", doc={"answer": g}, arguments=("", {}), idx=0)
                 for g in golds]
        for inst, c in zip(insts, completions):
            inst.resps = [c if isinstance(c, str) else ""]
        ensemble.apply(insts)  # lm-eval's filter pipeline (regex, take_first)
        extracted = [inst.filtered_resps[name] for inst in insts]
        hits = [float(exact_match_hf_evaluate([e], [g], **cfg["metric"])["exact_match"])
                for e, g in zip(extracted, golds)]
        key = name.replace("-", "_")
        out[key] = 100 * sum(hits) / len(hits)
        for d, e, h in zip(per, extracted, hits):
            d[key] = dict(extracted=e, correct=bool(h))
    return out, per


def cut_at_stop_sequences(text: str, stops) -> str:
    """``text`` up to the first occurrence of any stop sequence (lm-eval's ``until`` semantics)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def math_scores(completions: list[str], golds: list[str]) -> tuple[dict, list[dict]]:
    """MATH accuracy in the MATH benchmark's own convention (Hendrycks et al. 2021, "Measuring Mathematical
    Problem Solving With the MATH Dataset", repository hendrycks/math ``math_equivalence.py``), through
    lm-eval 0.4.13's copy of it (``lm_eval/tasks/hendrycks_math/utils.py``): the prediction is the
    content of the completion's last ``\\boxed{}`` / ``\\fbox{}`` (``last_boxed_only_string`` +
    ``remove_boxed``); the gold is the last ``\\boxed{}`` of a full solution, or the answer as given; they
    agree when ``is_equiv`` (``strip_string`` normalisation: units, ``\\left``/``\\right``, ``dfrac``,
    ``0.5`` -> ``\\frac{1}{2}``, spaces, ...) says so. A completion without a box is wrong."""
    from lm_eval.tasks.hendrycks_math.utils import is_equiv, last_boxed_only_string, remove_boxed

    def boxed(text):
        if not isinstance(text, str):
            return None
        b = last_boxed_only_string(text)
        if b is None:
            return None
        try:
            return remove_boxed(b)
        except AssertionError:  # "\fbox{...}" or an unbalanced box: not a MATH answer
            return None

    n = _check_pairs(completions, golds, "math_scores", ("completions", "golds"))
    per, right = [], 0
    for c, g in zip(completions, golds):
        g = str(g)
        gold = boxed(g) if "\\boxed" in g else g
        pred = boxed(c)
        ok = pred is not None and bool(is_equiv(pred, gold))
        right += ok
        per.append(dict(extracted=pred, gold=gold, correct=ok))
    return {"acc": 100 * right / n}, per
