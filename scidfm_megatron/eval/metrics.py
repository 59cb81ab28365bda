"""Evaluation metrics used by the SciDFM paper (section 3), as pure functions.

No model code lives here: the harness generates or scores text and hands the strings / numbers to these
functions. Libraries do the heavy lifting: RDKit (SMILES parsing, fingerprints), rapidfuzz (edit distance),
rouge-score (ROUGE-L), scikit-learn (AUC-ROC).

Conventions, and where they come from
-------------------------------------
Molecule generation (Mol-Instructions, whose evaluation scripts are those of MolT5,
``evaluation/molecule/mol_translation_selfies.py`` and ``fingerprint_metrics.py``):

* **exact**: fraction of pairs whose RDKit canonical (isomeric) SMILES are equal. Mol-Instructions compares
  InChI strings instead; the two agree except for rare tautomer / InChI-normalisation cases.
* **levenshtein**: mean edit distance between the raw SMILES strings (not canonicalised), for every pair,
  valid or not, as Mol-Instructions does.
* **validity**: fraction of predictions RDKit can parse (an empty string counts as invalid).
* **rdk_fts / maccs_fts / morgan_fts**: Tanimoto similarities averaged over the pairs whose prediction (and
  reference) parse; invalid predictions are left out of these means, not scored 0, exactly as in
  Mol-Instructions. With no valid pair at all the means are 0.0.
* Fingerprints: ``Chem.RDKFingerprint(mol)`` (path-based, RDKit defaults: paths up to 7 bonds, 2048 bits);
  ``MACCSkeys.GenMACCSKeys(mol)`` (167 bits); Morgan radius 2 as the *unhashed count* fingerprint that
  Mol-Instructions' ``AllChem.GetMorganFingerprint(mol, 2)`` returns, here produced by the equivalent
  ``rdFingerprintGenerator.GetMorganGenerator(radius=2).GetSparseCountFingerprint(mol)`` (same
  identifiers, same similarity; the old function is deprecated). Tanimoto on count vectors is
  ``sum(min(a_i, b_i)) / (sum(a_i) + sum(b_i) - sum(min(a_i, b_i)))``; for bit vectors it is
  ``|A & B| / |A | B|`` over the on-bits.

Protein understanding (Mol-Instructions ``evaluation/protein/eval.py`` uses HF ``evaluate``'s "rouge", i.e.
rouge-score without stemming): :func:`rouge_l` is the F-measure of rouge-score's ``rougeL`` with its default
tokenizer (lower-cases, splits on non-alphanumerics), and :func:`mean_rouge_l` is the plain mean over pairs
(``evaluate`` reports a bootstrap estimate of the same mean).

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
    "rouge_l", "mean_rouge_l", "auc_roc", "extract_gsm8k_answer", "extract_math_answer",
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


def molecule_generation_scores(preds: list[str], refs: list[str]) -> dict:
    """Mol-Instructions molecule-generation metrics for predicted vs reference SMILES.

    Returns ``{"exact", "levenshtein", "rdk_fts", "maccs_fts", "morgan_fts", "validity"}`` (floats):
    exact and validity are fractions over all pairs; levenshtein is the mean raw-string edit distance over
    all pairs (surrounding whitespace stripped); the three FTS values are means over the pairs whose
    prediction and reference both parse (0.0 if there are none). A reference that does not parse is a
    data error but is handled like Mol-Instructions does: that pair counts as not exact and is left out of
    the FTS means. Raises ValueError on empty or mismatched lists.
    """
    from rdkit import Chem

    n = _check_pairs(preds, refs, "molecule_generation_scores")
    exact = valid = 0
    lev_total = 0
    sims = {k: [] for k in FINGERPRINT_KINDS}
    for p, r in zip(preds, refs):
        p = p.strip() if isinstance(p, str) else ""
        r = r.strip() if isinstance(r, str) else ""
        lev_total += levenshtein(p, r)
        mp, mr = _mol(p), _mol(r)
        if mp is None:
            continue
        valid += 1
        if mr is None:
            continue
        if Chem.MolToSmiles(mp) == Chem.MolToSmiles(mr):
            exact += 1
        for k in FINGERPRINT_KINDS:
            sims[k].append(_tanimoto_mols(mp, mr, k))

    def mean(xs):
        return float(sum(xs) / len(xs)) if xs else 0.0

    return {
        "exact": exact / n,
        "levenshtein": lev_total / n,
        "rdk_fts": mean(sims["rdk"]),
        "maccs_fts": mean(sims["maccs"]),
        "morgan_fts": mean(sims["morgan"]),
        "validity": valid / n,
    }


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
