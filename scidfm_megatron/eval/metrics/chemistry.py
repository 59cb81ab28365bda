"""Molecule metrics: SMILES validity and canonical form, fingerprint Tanimoto, edit distance, and the
Mol-Instructions / MolT5 molecule-generation scores (SciDFM Table 8). Conventions: docs/evaluation.md,
"Metric conventions". RDKit, rapidfuzz and selfies are imported inside the functions that need them.
"""

from __future__ import annotations

from contextlib import contextmanager

from ._common import _check_pairs

FINGERPRINT_KINDS = ("rdk", "maccs", "morgan")


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
    from rdkit.Chem import rdFingerprintGenerator, rdMolDescriptors

    if kind == "rdk":
        return Chem.RDKFingerprint(mol)
    if kind == "maccs":
        return rdMolDescriptors.GetMACCSKeysFingerprint(mol)  # what MACCSkeys.GenMACCSKeys is bound to
    if kind == "morgan":
        return rdFingerprintGenerator.GetMorganGenerator(radius=2).GetSparseCountFingerprint(mol)
    raise ValueError(f"unknown fingerprint kind {kind!r}; expected one of {FINGERPRINT_KINDS}")


def _tanimoto_mols(m1, m2, kind: str) -> float:
    from rdkit import DataStructs

    return float(DataStructs.TanimotoSimilarity(_fingerprint(m1, kind), _fingerprint(m2, kind)))


def fingerprint_tanimoto(pred: str, ref: str, kind: str) -> float | None:
    """Tanimoto similarity of the ``kind`` fingerprints ("rdk", "maccs" or "morgan") of two SMILES.

    Returns None when either SMILES is invalid. The exact fingerprints are in docs/evaluation.md, "Metric
    conventions" (Mol-Instructions conventions; Morgan is the radius-2 count fingerprint).
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
    """Molecule-generation metrics exactly as zjunlp/Mol-Instructions computes them (docs/evaluation.md).

    ``representation``: what ``preds`` and ``refs`` are written in: ``"smiles"`` (this project's models
    write SMILES; surrounding whitespace ignored) or ``"selfies"`` (Mol-Instructions' own data and models).
    Returns ``{"exact", "levenshtein", "rdk_fts", "maccs_fts", "morgan_fts", "validity", "n", "n_scored"}``.
    """
    if representation not in ("smiles", "selfies"):
        raise ValueError(f"representation must be 'smiles' or 'selfies', got {representation!r}")
    n = _check_pairs(preds, refs, "mol_instructions_scores")
    scored = []
    for p, r in zip(preds, refs, strict=True):
        cp = _mi_canonical(p, representation)
        if cp is None:
            continue
        cr = _mi_canonical(r, representation)
        if cr is not None:
            scored.append((cp, cr))
    exact, levs = 0, []
    sims: dict[str, list[float]] = {k: [] for k in FINGERPRINT_KINDS}
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
    """MolT5's scripts on raw SMILES strings, every pair counted (docs/evaluation.md, ``"molt5"``)."""
    n = _check_pairs(preds, refs, "molt5_scores")
    exact = bad = 0
    lev_total = 0
    sims: dict[str, list[float]] = {k: [] for k in FINGERPRINT_KINDS}
    for p, r in zip(preds, refs, strict=True):
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
