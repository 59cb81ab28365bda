"""GSM8K / MATH final answers: extraction and equivalence, and both benchmarks scored as lm-eval scores them
(lm-eval and PyYAML are imported lazily). Conventions: docs/evaluation.md, "Metric conventions".
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

from ._common import _check_pairs

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


# ------------------------------------------------------------------ GSM8K / MATH as lm-eval scores them
def _lm_eval_task_yaml(rel: str) -> dict:
    """A task YAML shipped inside the installed lm-eval (lm_eval/tasks/<rel>), parsed."""
    import lm_eval
    import yaml

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

    out: dict[str, float] = {}
    per: list[dict] = [{} for _ in completions]
    for name, ensemble in cfg["filters"].items():
        insts = [Instance(request_type="generate_until", doc={"answer": g}, arguments=("", {}), idx=0)
                 for g in golds]
        for inst, c in zip(insts, completions, strict=True):
            inst.resps = [c if isinstance(c, str) else ""]
        ensemble.apply(insts)  # lm-eval's filter pipeline (regex, take_first)
        extracted = [inst.filtered_resps[name] for inst in insts]
        hits = [float(exact_match_hf_evaluate([e], [g], **cfg["metric"])["exact_match"])
                for e, g in zip(extracted, golds, strict=True)]
        key = name.replace("-", "_")
        out[key] = 100 * sum(hits) / len(hits)
        for d, e, h in zip(per, extracted, hits, strict=True):
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
    for c, g in zip(completions, golds, strict=True):
        g = str(g)
        gold = boxed(g) if "\\boxed" in g else g
        pred = boxed(c)
        ok = pred is not None and bool(is_equiv(pred, gold))
        right += ok
        per.append(dict(extracted=pred, gold=gold, correct=ok))
    return {"acc": 100 * right / n}, per
