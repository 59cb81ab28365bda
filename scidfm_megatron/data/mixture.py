"""Corpus mixtures: which sources, how many tokens each, per epoch -> megatron blend weights.

A recipe (YAML) lists sources with their domain, category (science / general) and token count, and
where their Megatron datasets live. A source may differ per epoch (``epochs: {2: {data: ...}}``): that
is how SciDFM's second-epoch re-sampling of SlimPajama's C4, CommonCrawl and GitHub subsets is written
(a fresh sample of the same size, stored under another prefix). ``tokens: auto`` reads the count from
the dataset's ``.idx`` (small corpora).

Blend weights are token shares: megatron draws fixed-length samples, so sampling each dataset in
proportion to its tokens reproduces the recipe's token proportions (and, with as many samples as the
mixture has tokens / sequence length, one pass over every source per epoch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, cast

import numpy as np

from ..config import ConfigError, check_choices, from_dict, load_yaml


@dataclass
class EpochOverride:
    """A source's data prefix and/or token count for one mixture epoch, where it differs from the default."""
    data: Optional[str] = None
    tokens: Optional[float] = None


@dataclass
class Source:
    """One row of the mixture table: a corpus, its Table-2 grouping and how many tokens of it an epoch takes."""
    name: str
    domain: str
    category: Literal["science", "general"]  # as Table 2 groups them
    tokens: Optional[float] = None  # in the recipe's unit; None ("auto") = read from the .idx
    data: Optional[str] = None  # Megatron dataset prefix (<dir>/<name>_text_document), relative to data_root
    group: str = ""  # the Table-2 row a subset belongs to (SlimPajama's subsets)
    epochs: dict[int, EpochOverride] = field(default_factory=dict)

    def for_epoch(self, epoch: int) -> tuple[Optional[str], Optional[float]]:
        o = self.epochs.get(epoch)
        return ((o.data if o and o.data else self.data), (o.tokens if o and o.tokens is not None else self.tokens))


@dataclass
class Mixture:
    """A pretraining mixture (a recipe's ``mixture:`` file): the sources and the unit their token counts are in;
    turned into megatron's blend weights per epoch."""
    name: str
    unit: Literal["B", "tokens"] = "B"  # billions, as in the paper, or tokens
    data_root: str = "."
    sources: list[Source] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike, data_root: Optional[str] = None) -> "Mixture":
        raw = load_yaml(path)
        for s in raw.get("sources", []):
            if s.get("tokens") == "auto":
                s["tokens"] = None
            s["epochs"] = {int(k): v for k, v in (s.get("epochs") or {}).items()}
        try:
            mix = from_dict(cls, raw, "mixture")
        except ConfigError as exc:  # name the file: a run reads the mixture the recipe points at
            raise ConfigError(f"{path}: {exc}") from None
        base = Path(path).resolve().parent
        root = data_root or os.environ.get("SCIDFM_DATA_ROOT") or mix.data_root
        mix.data_root = str(root if os.path.isabs(root) else (base / root).resolve())
        mix.validate(str(path))
        return mix

    def validate(self, where: str = "mixture") -> None:
        check_choices(self, f"{where}: mixture")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{where}: duplicate source names {dup}")
        for i, s in enumerate(self.sources):
            check_choices(s, f"{where}: mixture.sources[{i}]")
            if s.tokens is not None and s.tokens < 0:
                raise ConfigError(f"{where}: source {s.name!r}: tokens must be >= 0")

    def path(self, prefix: str) -> str:
        return prefix if os.path.isabs(prefix) else os.path.join(self.data_root, prefix)

    def tokens(self, epoch: int = 1) -> dict[str, float]:
        """Tokens of every source in this epoch, in the recipe's unit (``auto`` ones read from disk)."""
        out = {}
        for s in self.sources:
            prefix, tok = s.for_epoch(epoch)
            if tok is None:
                if prefix is None:
                    raise ConfigError(f"source {s.name!r}: tokens: auto needs a data prefix")
                tok = count_tokens(self.path(prefix)) / (1e9 if self.unit == "B" else 1)
            out[s.name] = float(tok)
        return out

    def blend(self, epoch: int = 1) -> tuple[list[str], list[float]]:
        """(prefixes, weights) for megatron's ``blend``; weights sum to 1. Sources with no data are an error."""
        toks = self.tokens(epoch)
        missing = [s.name for s in self.sources if s.for_epoch(epoch)[0] is None]
        if missing:
            raise ConfigError(f"mixture {self.name!r} epoch {epoch}: sources without a data prefix: {missing}")
        total = sum(toks.values())
        return ([self.path(cast(str, s.for_epoch(epoch)[0])) for s in self.sources],  # None: rejected above
                [toks[s.name] / total for s in self.sources])

    def report(self, epoch: int = 1) -> str:
        toks = self.tokens(epoch)
        total = sum(toks.values())
        u = self.unit
        f = ",.2f" if u == "B" else ",.0f"
        lines = [f"mixture {self.name!r}, epoch {epoch}: {total:{f}}{'B' if u == 'B' else ''} tokens", "",
                 f"{'category / domain / source':<52}{'tokens' + (' (B)' if u == 'B' else ''):>14}{'share':>9}  data"]
        for cat in ("science", "general"):
            cat_sources = [s for s in self.sources if s.category == cat]
            if not cat_sources:
                continue
            ct = sum(toks[s.name] for s in cat_sources)
            lines.append(f"{cat.upper():<52}{ct:>14{f}}{ct / total:>9.1%}")
            for dom in dict.fromkeys(s.domain for s in cat_sources):
                ds = [s for s in cat_sources if s.domain == dom]
                dt = sum(toks[s.name] for s in ds)
                lines.append(f"  {dom:<50}{dt:>14{f}}{dt / total:>9.1%}")
                for s in ds:
                    prefix = s.for_epoch(epoch)[0]
                    tag = " (re-sampled)" if epoch in s.epochs and s.epochs[epoch].data else ""
                    label = f"{s.name}" + (f" [{s.group}]" if s.group else "")
                    lines.append(f"    {label:<48}{toks[s.name]:>14{f}}{toks[s.name] / total:>9.2%}  "
                                 f"{prefix or '-'}{tag}")
        return "\n".join(lines)


def count_tokens(prefix: str) -> int:
    """Total tokens of a Megatron dataset, read from its .idx length table (no torch)."""
    from .indexed import read_sequence_lengths

    try:
        lengths = read_sequence_lengths(prefix)
    except FileNotFoundError:
        raise ConfigError(f"{prefix}.idx does not exist: preprocess that source first (scidfm-preprocess)") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return int(lengths.astype(np.int64).sum())
