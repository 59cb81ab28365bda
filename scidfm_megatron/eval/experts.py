"""Expert-choice analysis of SciDFM (paper section 3.3) for any checkpoint this project trains or converts.

For layer i with gate weight W_g and router input h_i (l tokens x d): g_i = h_i W_g, summed over the
text's tokens and softmaxed: e_i = softmax(sum_t g_i[t]) in R^e; E_T = concat(e_1..e_N) in R^(N*e).

Router logits are captured, not re-implemented:
* megatron checkpoints: :class:`scidfm_megatron.model.routing.RouterRecorder` (a forward hook on
  megatron's ``TopKRouter`` that recomputes ``h W_g`` from the router's input and weight, per sequence);
* Hugging Face folders: transformers' own ``output_router_logits=True`` (per-token gate logits per layer).

Then t-SNE to 3-D, a PNG coloured by domain, the silhouette score of the domains (in E_T space, the
number that says how well they separate; also in the t-SNE space) and per-layer heat maps of expert
usage per domain.

    scidfm-analyze-experts --model hf/tiny --corpus examples/sample_corpus --out runs/experts
    scidfm-analyze-experts --model hf/tiny --corpus my_domains/ --out runs/experts   # chem.jsonl, bio.txt, ...
    scidfm-analyze-experts --model hf/tiny --corpus mixed.jsonl --domain-key field --out runs/experts
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import CorpusError  # re-export: defined in scidfm_megatron/errors.py

CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
MIN_TEXTS = 3  # a domain with fewer texts is left out (and said so)


def _corpus_files(corpus: Path) -> list[Path]:
    if corpus.is_file():
        return [corpus]
    if not corpus.is_dir():
        raise CorpusError(f"--corpus {corpus}: no such folder or file")
    files = sorted(p for p in corpus.iterdir() if p.is_file() and p.name.endswith(CORPUS_SUFFIXES))
    if not files:
        raise CorpusError(f"--corpus {corpus}: no *.jsonl or *.txt files in it; put one file per domain there "
                          f"(the domain is the file name), or one jsonl with a domain field (--domain-key)")
    return files


def _stem(p: Path) -> str:
    name = p.name
    for suf in CORPUS_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return p.stem


def domain_texts(corpus: str | Path, per_domain: int = 30, min_chars: int = 20, *, text_key: str = "text",
                 domain_key: str = "domain", log=None) -> "OrderedDict[str, list[str]]":
    """Texts of a corpus by domain, the first ``per_domain`` of each (``min_chars`` or longer).

    ``corpus`` is a folder of ``*.jsonl`` / ``*.txt`` files (``.gz`` too) or one such file. The domain is
    the file's name without its suffix; a jsonl record holding ``domain_key`` is grouped by
    ``"<file>: <value>"`` (by the value alone when the corpus is one file or the value is the file's
    name). A jsonl record's text is its ``text_key`` value; a record without one but with ``smiles`` /
    ``sequence`` (the sample corpus's molecules and proteins) is wrapped in the molecule / protein span
    markers, as in pretraining. A
    ``.txt`` file holds one text per line. Domains with fewer than 3 texts, and files whose records hold
    no text (e.g. SFT conversations), are left out and logged; fewer than 2 usable domains raise
    :class:`CorpusError` naming the file, line and fix (the first file left out, if any)."""
    import gzip

    from ..tokenizer.core import wrap_molecule, wrap_protein

    log = log or (lambda msg: print(msg, file=sys.stderr))
    root = Path(corpus)
    files = _corpus_files(root)
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    seen: dict[str, int] = {}
    problems: list[str] = []

    def add(domain, text):
        seen[domain] = seen.get(domain, 0) + 1
        if len(text) >= min_chars and len(groups.setdefault(domain, [])) < per_domain:
            groups[domain].append(text)

    for f in files:
        stem = _stem(f)
        found, bad = 0, 0
        first_bad: tuple[int, str] | None = None  # (line, reason) of the first skipped line
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
            for no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if ".txt" in f.name:
                    add(stem, line.rstrip("\n"))
                    found += 1
                    continue
                try:
                    r = json.loads(line)
                except ValueError:
                    r = None
                if not isinstance(r, dict):
                    bad += 1
                    first_bad = first_bad or (no, "not a JSON object")
                    continue
                if isinstance(r.get(text_key), str):
                    text = r[text_key]
                elif isinstance(r.get("smiles"), str):
                    text = wrap_molecule(r["smiles"])
                elif isinstance(r.get("sequence"), str):
                    text = wrap_protein(r["sequence"])
                else:
                    bad += 1
                    first_bad = first_bad or (no, f"no string {text_key!r} key (keys: {sorted(r)[:8]})")
                    continue
                dom = r.get(domain_key)
                if dom is None or str(dom) == stem:
                    domain = stem
                else:
                    domain = str(dom) if len(files) == 1 else f"{stem}: {dom}"
                add(domain, text)
                found += 1
                if all(len(v) >= per_domain for v in groups.values()) and len(groups) and domain_key not in r:
                    break  # one domain per file, and it is full: the rest of a large file is not needed
        if not found and first_bad:
            problem = (f"{f}:{first_bad[0]}: {first_bad[1]}; name the text field with --text-key "
                       f"(a record may instead hold 'smiles' or 'sequence')")
            if len(files) == 1:
                raise CorpusError(problem)
            problems.append(problem)
            log(f"[scidfm] {problem}: file left out")
        elif first_bad:  # set with the first skipped line, so exactly when bad > 0
            log(f"[scidfm] {f}: {bad} line(s) skipped, the first at line {first_bad[0]}: {first_bad[1]}")
    kept = OrderedDict((k, v) for k, v in groups.items() if len(v) >= MIN_TEXTS)
    for k, v in groups.items():
        if k not in kept:
            log(f"[scidfm] domain {k!r}: {len(v)} text(s) of >= {min_chars} characters, fewer than {MIN_TEXTS}: "
                f"left out")
    if len(kept) < 2 and problems:
        raise CorpusError(problems[0])
    if len(kept) < 2:
        raise CorpusError(f"--corpus {root}: {len(kept)} domain(s) with >= {MIN_TEXTS} texts of >= {min_chars} "
                          f"characters ({dict((k, len(v)) for k, v in groups.items()) or 'none'}); the analysis "
                          f"compares domains: give at least 2 (one file each, or a --domain-key field)")
    return kept


@torch.no_grad()
def gate_logit_sums(model, ids: list[int]) -> torch.Tensor:
    """[num_layers, num_experts]: per layer, the sum over the text's tokens of the gate logits."""
    from .models import HFModel

    x = torch.tensor([ids])
    if isinstance(model, HFModel):
        out = model.model(x.to(model.device), output_router_logits=True)
        return torch.stack([g.float().reshape(-1, g.shape[-1]).sum(0).cpu() for g in out.router_logits])
    from ..model.routing import RouterRecorder

    with RouterRecorder(model.model, keep_logits=True) as rec:
        model._logits(x)
    calls = sorted(rec.calls, key=lambda c: c.layer)
    return torch.stack([c.logits_sum[0] for c in calls])


def expert_choice_vector(model, text: str, max_tokens: int = 256) -> np.ndarray:
    """E_T of one text: per-layer softmax of the summed gate logits, concatenated (N*e values)."""
    ids = model.encode(text, bos=True)[:max_tokens]
    return torch.softmax(gate_logit_sums(model, ids).double(), dim=-1).reshape(-1).numpy()


def analyze(model, groups: "OrderedDict[str, list[str]]", out_dir: str | Path, *, max_tokens: int = 256,
            seed: int = 0, progress: bool = True) -> dict:
    """E_T for every text, t-SNE 3-D plot, silhouette scores and per-layer heat maps under ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = [(d, t) for d, ts in groups.items() for t in ts]
    E = np.stack([expert_choice_vector(model, t, max_tokens) for _, t in tqdm(texts, desc="E_T", disable=not progress)])
    labels = np.array([d for d, _ in texts])
    domains = list(groups)
    n_exp = _num_experts(model)
    n_layers = E.shape[1] // n_exp
    perplexity = float(min(30.0, max(2.0, (len(texts) - 1) / 3)))
    Y = TSNE(n_components=3, perplexity=perplexity, init="pca", random_state=seed).fit_transform(E)
    sil = float(silhouette_score(E, labels))
    sil_tsne = float(silhouette_score(Y, labels))

    fig = plt.figure(figsize=(8, 7))
    ax = fig.add_subplot(projection="3d")
    cmap = plt.get_cmap("tab10")
    for k, d in enumerate(domains):
        m = labels == d
        ax.scatter(Y[m, 0], Y[m, 1], Y[m, 2], s=18, color=cmap(k % 10), label=f"{d} ({m.sum()})")
    ax.set_title(f"Expert choice E_T, t-SNE 3-D (silhouette: E_T {sil:.3f}, t-SNE {sil_tsne:.3f})")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "expert_choice_tsne.png", dpi=120)
    plt.close(fig)

    usage = np.stack([E[labels == d].reshape(-1, n_layers, n_exp).mean(0) for d in domains])  # [D, L, e]
    cols = min(4, n_layers)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.35 * len(domains) * rows + 1.5), squeeze=False)
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= n_layers:
            ax.axis("off")
            continue
        im = ax.imshow(usage[:, layer, :], aspect="auto", cmap="viridis", vmin=0, vmax=float(usage.max()))
        ax.set_title(f"layer {layer + 1}", fontsize=9)
        ax.set_xticks(range(n_exp))
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if layer % cols == 0 else [], fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean e_i")
    fig.savefig(out / "expert_usage_heatmaps.png", dpi=120)
    plt.close(fig)

    summary = dict(n_texts=len(texts), domains={d: int((labels == d).sum()) for d in domains}, num_layers=n_layers,
                   num_experts=n_exp, silhouette_et=sil, silhouette_tsne=sil_tsne, tsne_perplexity=perplexity,
                   files=["expert_choice_tsne.png", "expert_usage_heatmaps.png", "expert_choice.npz"])
    np.savez(out / "expert_choice.npz", E_T=E, tsne=Y, labels=labels)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _num_experts(model) -> int:
    from .models import HFModel

    if isinstance(model, HFModel):
        return int(model.model.config.num_local_experts)
    return int(model.lm.config.num_experts)
