"""Build the extended science tokenizer from any Llama-style SentencePiece BPE ``tokenizer.model``.

Added, in this id order after the base pieces: the 4 span markers, the molecule vocabulary, the protein
vocabulary, then the 5 specials (see core.py for how each kind is used).

Molecule vocabulary (pieces ``<m>X``):
* every element symbol (118), in SMILES's bare form (``C``, ``Cl``, ``Zn``): the unit bracket atoms are
  spelled with when a whole bracket atom is not in the vocabulary;
* aromatic atoms ``b c n o p s se as te``;
* SMILES punctuation: branches ``( )``, bonds ``- = # $ : / \\ ~``, ``.``, ``[ ]``, charges ``+``, ring
  digits ``0-9``, ``%``, chirality ``@ @@``, wildcard ``*``, and reaction arrows ``> <``;
* whole bracket atoms (``[C@@H]``, ``[nH]``, ``[O-]``, ``[Na+]``...): every element in brackets plus a
  list of common charged, protonated, chiral and isotopic forms, plus any given with
  ``extra_bracket_atoms`` (``scidfm-build-tokenizer --bracket-atoms-from`` harvests them from SMILES
  files, keeping those seen at least ``--min-count`` times).
Protein vocabulary (pieces ``<p>X``): the 26 letters A-Z (20 standard residues, B/Z/J ambiguity codes,
X unknown, U selenocysteine, O pyrrolysine).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable

from ..utils import atomic_write
from .core import MOL_PREFIX, PROT_PREFIX, SPAN_MARKERS, SPECIALS, ScienceTokenizer, split_smiles

ELEMENTS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr "
    "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb "
    "Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf "
    "Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og").split()
AROMATIC = ("b", "c", "n", "o", "p", "s", "se", "as", "te")
SMILES_SYMBOLS = tuple("()-=#$:/\\~.[]+%@*><") + ("@@",) + tuple("0123456789")
COMMON_BRACKET_ATOMS = (
    "[C@H] [C@@H] [C@] [C@@] [CH] [CH2] [CH-] [CH2-] [C-] [C+] [c-] [cH-] [nH] [nH+] [n+] [n-] [N+] [N-] "
    "[NH+] [NH2+] [NH3+] [NH4+] [NH-] [NH] [NH2] [N@] [N@@] [N@+] [N@@+] [O-] [O+] [OH-] [OH+] [OH] [O] "
    "[o+] [S-] [S+] [s+] [SH] [SH-] [S@] [S@@] [S@+] [S@@+] [P+] [P-] [P@] [P@@] [PH] [PH2] [B-] [BH-] "
    "[BH2-] [BH3-] [BH4-] [Si] [SiH] [SiH2] [SiH3] [SiH4] [se] [Se] [SeH] [F-] [Cl-] [Br-] [I-] [I+] "
    "[Cl+3] [H] [H+] [H-] [2H] [3H] [11C] [13C] [14C] [13CH] [13CH2] [13CH3] [15N] [18O] [18F] [125I] "
    "[Li+] [Na+] [K+] [Rb+] [Cs+] [Ag+] [Cu+] [Cu+2] [Mg+2] [Ca+2] [Sr+2] [Ba+2] [Zn+2] [Mn+2] [Fe+2] "
    "[Fe+3] [Co+2] [Co+3] [Ni+2] [Pt+2] [Pd+2] [Hg+2] [Sn+2] [Pb+2] [Al+3] [Cr+3] [Au+] [Au+3] [Ti+4] "
    "[Gd+3] [Bi+3] [As+] [Sb+3] [Tl+]").split()
PROTEIN_LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def molecule_vocabulary(extra_bracket_atoms: Iterable[str] = ()) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for tok in (*ELEMENTS, *AROMATIC, *SMILES_SYMBOLS, *(f"[{e}]" for e in ELEMENTS), *COMMON_BRACKET_ATOMS,
                *sorted(extra_bracket_atoms)):
        if tok not in seen:
            seen.add(tok)
            out.append(tok)
    return out


def harvest_bracket_atoms(smiles: Iterable[str], min_count: int = 1) -> list[str]:
    """Bracket atoms that occur at least ``min_count`` times in the given SMILES strings."""
    counts = Counter(lex for s in smiles for lex in split_smiles(s) if lex.startswith("[") and lex.endswith("]"))
    return sorted(a for a, n in counts.items() if n >= min_count)


def extend_model(base_model: str | os.PathLike, extra_bracket_atoms: Iterable[str] = ()) -> bytes:
    """The extended ModelProto, serialized. Raises if the base is not a BPE/byte-fallback Llama-style model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(base_model).read_bytes())
    except Exception as exc:  # noqa: BLE001  DecodeError and friends: any means not a model
        raise ValueError(f"{base_model}: not a SentencePiece model ({exc})") from None
    if not proto.pieces:
        raise ValueError(f"{base_model}: SentencePiece model has no pieces")
    existing = {p.piece for p in proto.pieces}
    clash = [s for s in SPAN_MARKERS + SPECIALS if s in existing]
    if clash:
        raise ValueError(f"{base_model}: already contains {clash}; pass the *base* model, not an extended one")
    Type = pb.ModelProto.SentencePiece.Type

    def add(piece: str, type_: int):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, type_

    for s in SPAN_MARKERS:
        add(s, Type.USER_DEFINED)
    for tok in molecule_vocabulary(extra_bracket_atoms):
        add(MOL_PREFIX + tok, Type.UNUSED)
    for tok in PROTEIN_LETTERS:
        add(PROT_PREFIX + tok, Type.UNUSED)
    for s in SPECIALS:
        add(s, Type.CONTROL)
    return proto.SerializeToString()


# Science text that a lossless tokenizer gives back exactly: spans next to spaces, runs of spaces, tabs,
# newlines, leading/trailing whitespace, code indentation, compatibility characters NFKC would fold.
ROUND_TRIP_PROBES = (
    "chloroform [START_I_SMILES]C(Cl)(Cl)Cl[END_I_SMILES] is a solvent.",
    "The kinase [START_AMINO]MKTAYIAKQRQISFVKSHFSRQ[END_AMINO] binds ATP ;  Kd = 3 nM.",
    "Two  spaces,\ttabs\nand\n\nblank lines   kept.", " leading space", "trailing space ", "  ",
    "def f(x):\n    return x  # indented\n        more",
    "ΔG° = −12 kJ/mol at 25 °C; ½ ﬁ ① Å Ω µm ㎖ ＡＢＣ",
    "reaction [START_I_SMILES]CCO.CC(=O)O>>CCOC(C)=O[END_I_SMILES]  (esterification)",
    "mass spectrometry 質量分析 — naïve café",
)


class LossyBaseError(ValueError):
    """The base model's normaliser changes text: encode + decode does not give the text back."""


def round_trip_failures(tok: ScienceTokenizer, texts: Iterable[str]) -> tuple[int, list[tuple[str, str]]]:
    """(texts probed, [(text, what decode(encode(text)) gives)] for those that do not come back)."""
    texts = list(texts)
    return len(texts), [(t, d) for t in texts if (d := tok.decode(tok.encode(t))) != t]


def describe_normaliser(base_model) -> str:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(base_model).read_bytes())
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    kind = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}.get(ts.model_type, str(ts.model_type))
    return (f"{kind}, normaliser {ns.name or 'custom'}" + (", remove_extra_whitespaces" if ns.remove_extra_whitespaces
                                                          else "") + ("" if ts.byte_fallback else ", no byte fallback"))


def check_round_trip(tok: ScienceTokenizer, base_model, probes: Iterable[str] = ROUND_TRIP_PROBES) -> str:
    """A one-line verdict; raises :class:`LossyBaseError` (with the numbers and one example) when any
    probe text does not decode to itself."""
    n, bad = round_trip_failures(tok, probes)
    if not bad:
        return f"round trip: {n} of {n} probe texts decode to themselves"
    text, got = bad[0]
    raise LossyBaseError(
        f"{base_model} ({describe_normaliser(base_model)}) loses text: {len(bad)} of {n} probe texts do not decode "
        f"to themselves (e.g. {text[:60]!r} -> {got[:60]!r}); use a Llama-style byte-fallback BPE with the identity "
        f"normaliser (spm_train --model_type=bpe --normalization_rule_name=identity --remove_extra_whitespaces=false "
        f"--byte_fallback=true), or pass --allow-lossy-base to build it anyway")


def build_tokenizer(base_model: str | os.PathLike, output_dir: str | os.PathLike,
                    extra_bracket_atoms: Iterable[str] = (), probes: Iterable[str] = ROUND_TRIP_PROBES,
                    allow_lossy: bool = False, notes: list | None = None) -> ScienceTokenizer:
    """Write ``tokenizer.model``, ``science_tokens.json`` and the Hugging Face files into ``output_dir``.

    Everything is written into a temporary sibling directory that replaces ``output_dir`` only when
    complete, so a failed or killed build never leaves a half-written tokenizer behind. The built
    tokenizer must give every ``probes`` text back (:func:`check_round_trip`): a base whose normaliser
    loses text raises :class:`LossyBaseError` and nothing is written, unless ``allow_lossy`` (then the
    verdict with its numbers is appended to ``notes``, as is the round-trip line otherwise).
    """
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        extra = sorted(set(extra_bracket_atoms))
        atomic_write(tmp / "tokenizer.model", extend_model(base_model, extra))
        tok = ScienceTokenizer(tmp / "tokenizer.model")
        try:
            verdict = check_round_trip(tok, base_model, probes)
        except LossyBaseError as exc:
            if not allow_lossy:
                raise
            verdict = f"--allow-lossy-base: {exc}".replace(", or pass --allow-lossy-base to build it anyway", "")
        if notes is not None:
            notes.append(verdict)
            if describe_normaliser(base_model).startswith("unigram"):
                notes.append(f"{base_model} is a unigram model; SciDFM's tokenizer extends a BPE (docs/data.md): "
                             f"text outside spans is segmented as this unigram model does")
        inventory = {
            "base_model": str(base_model),
            "base_vocab_size": tok._added_start,
            "vocab_size": tok.vocab_size,
            "span_markers": {s: tok.special_ids[s] for s in SPAN_MARKERS},
            "specials": {s: tok.special_ids[s] for s in SPECIALS},
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "unk_id": tok.unk_id,
            "molecule_tokens": tok.mol_vocab,
            "protein_tokens": tok.prot_vocab,
            "harvested_bracket_atoms": extra,
        }
        atomic_write(tmp / "science_tokens.json", json.dumps(inventory, indent=1, ensure_ascii=False))
        from . import hf

        hf.write_hf_tokenizer_files(tmp, tok)
        if out.exists():
            old = out.with_name(out.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ScienceTokenizer(out / "tokenizer.model")
