"""Instruction-data record formats (messages, ShareGPT, Alpaca, query/response) -> the ``messages`` list that
SFT preprocessing tokenizes, so a conversation gets the same ids and loss mask whatever format it came in
(docs/data.md, "SFT data", "Record formats")."""

from __future__ import annotations

from typing import Iterable, Optional

from ..errors import SFTFormatError  # re-export: defined in scidfm_megatron/errors.py

FORMATS = ("messages", "sharegpt", "alpaca", "query_response")
CHOICES = ("auto",) + FORMATS
DESCRIPTION = {
    "messages": "messages: [{role, content}]",
    "sharegpt": "ShareGPT: conversations: [{from, value}]",
    "alpaca": "Alpaca: instruction, input, output",
    "query_response": "query/response (MetaMathQA)",
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant"}


def _type_name(v) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(v), type(v).__name__)


def detect(obj, messages_key: str = "messages") -> Optional[str]:
    """The format a parsed record is in, or None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get(messages_key), list):
        return "messages"
    if isinstance(obj.get("conversations"), list):
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "query" in obj and "response" in obj:
        return "query_response"
    return None


def fields(fmt: str, messages_key: str = "messages") -> tuple[str, ...]:
    """The record keys a format reads (their values are checked for lone surrogates)."""
    return {"messages": (messages_key,), "sharegpt": ("conversations",),
            "alpaca": ("system", "history", "instruction", "input", "output"),
            "query_response": ("query", "response")}[fmt]


def main_key(fmt: str, messages_key: str = "messages") -> str:
    """The key a conversation-level problem is reported under."""
    return {"messages": messages_key, "sharegpt": "conversations", "alpaca": "instruction",
            "query_response": "query"}[fmt]


def _string(obj: dict, key: str, optional: bool = False) -> str:
    if key not in obj:
        if optional:
            return ""
        raise ValueError(f"missing key {key!r}")
    v = obj[key]
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"key {key!r} is {_type_name(v)}, expected a string")
    return v


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError("key 'conversations': must be a non-empty list of {from, value} objects")
    out = []
    for k, t in enumerate(turns):
        where = f"key 'conversations': turn {k}"
        if not isinstance(t, dict):
            raise ValueError(f"{where}: expected an object with from and value")
        role = SHAREGPT_ROLES.get(t.get("from"))  # type: ignore[arg-type]  # a missing "from" gives None too
        if role is None:
            raise ValueError(f"{where}: 'from' must be one of {sorted(SHAREGPT_ROLES)}, got {t.get('from')!r}")
        if not isinstance(t.get("value"), str):
            raise ValueError(f"{where}: 'value' must be a string, got {_type_name(t.get('value'))}")
        if role == "assistant" and t.get("weight", 1) not in (None, 1):  # user / system turns are never trained
            raise ValueError(f"{where}: weight {t['weight']!r} on an assistant turn (a turn not to train on) is not "
                             "supported: drop the turn, or set its weight to 1")
        out.append({"role": role, "content": t["value"]})
    return out


def _alpaca(obj: dict) -> list[dict]:
    instruction, inp, output = _string(obj, "instruction"), _string(obj, "input", True), _string(obj, "output")
    system = _string(obj, "system", True)
    msgs = [{"role": "system", "content": system}] if system else []
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise ValueError(f"key 'history' is {_type_name(history)}, expected a list of [instruction, output] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"key 'history': item {k} must be a pair of strings [instruction, output]")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = instruction + ("\n" + inp if inp else "")
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def to_messages(obj: dict, fmt: str, messages_key: str = "messages"):
    """The record as a messages list (validated by the tokenizer's chat encoder). Raises ValueError with a
    reason naming the key for a record that is not in ``fmt``."""
    if fmt == "messages":
        if messages_key not in obj:
            raise ValueError(f"missing key {messages_key!r}")
        return obj[messages_key]
    if fmt == "sharegpt":
        if "conversations" not in obj:
            raise ValueError("missing key 'conversations'")
        return _sharegpt(obj["conversations"])
    if fmt == "alpaca":
        return _alpaca(obj)
    if fmt == "query_response":
        return [{"role": "user", "content": _string(obj, "query")},
                {"role": "assistant", "content": _string(obj, "response")}]
    raise ValueError(f"unknown SFT format {fmt!r}")


def record_messages(obj: dict, fmt: str, messages_key: str = "messages") -> tuple[Optional[list], Optional[str]]:
    """(messages, None) or (None, the reason this line is bad). The reason names the key and, when the
    record is in another of the formats, says so (a file mixing formats)."""
    from ..utils import lone_surrogate

    bad = lone_surrogate({k: obj[k] for k in fields(fmt, messages_key) if k in obj})
    if bad:
        return None, bad
    try:
        return to_messages(obj, fmt, messages_key), None
    except ValueError as exc:
        reason = str(exc)
    other = detect(obj, messages_key)
    if reason.startswith("missing key"):
        reason += f" (keys present: {sorted(obj)[:8]})"
        if other and other != fmt:
            reason += f"; this record is {DESCRIPTION[other]}, the file was read as {DESCRIPTION[fmt]}"
    return None, reason


def choose(lines: Iterable[tuple[int, bytes]], path: str, requested: str, messages_key: str = "messages"
           ) -> tuple[str, str]:
    """(format, how it was chosen) for one file. ``requested`` other than auto is used as given; auto scans
    ``lines`` ((number, raw bytes)) for the first record in a known format. A file holding records but none in
    a known format raises SFTFormatError (one line: the file, the first record's keys, the fix)."""
    import json

    first = None
    for no, raw in lines:
        if not raw.strip():
            continue
        if first is None and raw.lstrip().startswith(b"["):
            raise SFTFormatError(
                f"{path}:{no}: one JSON array (as Alpaca's alpaca_data.json and MetaMathQA's release are), not JSON "
                f"Lines; convert it once: python -m scidfm_megatron.cli.sft_formats {path} "
                f"{_jsonl_name(path)}")
        if requested != "auto":
            return requested, "--sft-format"
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        fmt = detect(obj, messages_key)
        if fmt:
            return fmt, f"detected from line {no}"
        if first is None:
            first = (no, sorted(obj)[:8] if isinstance(obj, dict) else _type_name(obj))
    if first is None:
        return ("messages" if requested == "auto" else requested), "no records"
    raise SFTFormatError(
        f"{path}:{first[0]}: no record in a known SFT format (first record: {first[1]}); expected one of "
        f"{'; '.join(DESCRIPTION.values())}: convert the file, or name the messages key with --json-keys")


def _jsonl_name(path: str) -> str:
    import os

    stem = os.path.basename(path)
    for suf in (".json.gz", ".json", ".jsonl"):
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    return stem + ".jsonl"


def json_array_to_jsonl(src: str, dst: str) -> int:
    """Write the records of a JSON array file (Alpaca's alpaca_data.json, MetaMathQA-395K.json) as JSON
    Lines, under a temporary name renamed when complete. Returns the record count."""
    import gzip
    import json

    from ..utils import atomic_write

    with (gzip.open(src, "rt", encoding="utf-8") if src.endswith(".gz") else open(src, encoding="utf-8")) as f:
        try:
            data = json.load(f)
        except ValueError as exc:
            raise SFTFormatError(f"{src}: not one JSON document ({exc})") from None
    if not isinstance(data, list):
        raise SFTFormatError(f"{src}: expected a JSON array of records, got {_type_name(data)}")
    atomic_write(dst, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
    return len(data)
