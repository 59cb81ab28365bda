"""Preprocessing split over machines: ``scidfm-preprocess --shard K/N`` (the byte-range plan, manifests)
and ``scidfm-merge-data`` (checks every manifest, then concatenates); the merged files are byte-identical to
one run's (docs/data.md, "Sharding over machines")."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from ..errors import ShardError  # re-export: defined in scidfm_megatron/errors.py

MANIFEST_VERSION = 1
WHOLE_FILE_SUFFIXES = (".gz", ".zst", ".parquet")


def parse_shard(value: str) -> tuple[int, int]:
    k_text, sep, n_text = str(value).partition("/")
    try:
        k, n = int(k_text), int(n_text)
    except ValueError:
        k = n = -1
    if not sep or n < 1 or not 0 <= k < n:
        raise ShardError(f"--shard {value}: expected K/N with 0 <= K < N (e.g. $SLURM_ARRAY_TASK_ID/8)")
    return k, n


def shard_prefix(prefix: str, k: int, n: int) -> str:
    return f"{prefix}.shard-{k}-of-{n}"


def manifest_path(prefix: str, k: int, n: int) -> Path:
    return Path(f"{shard_prefix(prefix, k, n)}.manifest.json")


def plan_identity(files: list[str]) -> dict:
    sizes = [os.path.getsize(f) for f in files]
    listing = [[os.path.abspath(f), s] for f, s in zip(files, sizes, strict=False)]
    h = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"files": len(files), "bytes": sum(sizes), "sha256": h}


def _line_start_at_or_after(path: str, pos: int, size: int) -> int:
    """The first line start >= ``pos`` in a plain file (``size`` at the end)."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    with open(path, "rb") as f:
        f.seek(pos - 1)
        if f.read(1) == b"\n":
            return pos
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                return size
            nl = chunk.find(b"\n")
            if nl >= 0:
                return f.tell() - len(chunk) + nl + 1


def plan_shard(files: list[str], k: int, n: int) -> list[tuple[int, int, Optional[int]]]:
    """Shard ``k``'s pieces: (file index, start byte, end byte or None for the whole compressed file)."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    lo, hi = k * total // n, (k + 1) * total // n
    pieces: list[tuple[int, int, Optional[int]]] = []
    offset = 0
    for fi, (path, size) in enumerate(zip(files, sizes, strict=False)):
        f_lo, f_hi = offset, offset + size
        offset = f_hi
        if path.endswith(WHOLE_FILE_SUFFIXES):
            if lo <= f_lo < hi or (k == n - 1 and f_lo == hi == total):
                pieces.append((fi, 0, None))
            continue
        if f_hi <= lo or f_lo >= hi or size == 0:
            continue
        start = _line_start_at_or_after(path, max(lo - f_lo, 0), size)
        end = _line_start_at_or_after(path, min(hi - f_lo, size), size)
        if end > start:
            pieces.append((fi, start, end))
    return pieces


def first_line_number(path: str, start: int) -> int:
    """1-based number of the line starting at byte ``start`` (counts newlines before it)."""
    if start == 0:
        return 1
    count = 0
    with open(path, "rb") as f:
        left = start
        while left:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count + 1


def file_digest(path: Path) -> dict:
    from ..tokenizer.fingerprint import file_sha256

    return {"path": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_manifest(prefix: str, k: int, n: int, *, files, pieces, plan, summary, fingerprint, settings,
                   outputs: dict) -> Path:
    from .preprocess import write_json_atomic

    data = {
        "version": MANIFEST_VERSION, "complete": True, "shard": [k, n], "plan": plan, "settings": settings,
        "tokenizer": fingerprint,
        "inputs": [{"file": files[fi], "start": s, "end": e} for fi, s, e in pieces],
        "bytes": summary.bytes_read, "lines": summary.lines, "documents": summary.documents,
        "tokens": summary.tokens, "rejected": summary.rejected, "empty": summary.empty,
        "outputs": {key: [file_digest(Path(f"{p}{ext}")) for ext in (".bin", ".idx")] for key, p in outputs.items()},
    }
    path = manifest_path(prefix, k, n)
    write_json_atomic(path, data)
    return path


def finished(prefix: str, k: int, n: int, plan: dict, fingerprint: dict, settings: dict) -> Optional[dict]:
    """The manifest of an already complete shard of this same plan, tokenizer and settings, else None."""
    path = manifest_path(prefix, k, n)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (data.get("complete") and data.get("shard") == [k, n] and data.get("plan") == plan
            and data.get("settings") == settings
            and (data.get("tokenizer") or {}).get("sha256") == fingerprint["sha256"]):
        return None
    for digests in data["outputs"].values():
        for d in digests:
            f = path.parent / d["path"]
            if not f.exists() or f.stat().st_size != d["bytes"]:
                return None
    return data


# ------------------------------------------------------------------------------------ merge
def check_shards(prefix: str, n: int, verify_checksums: bool = True) -> list[dict]:
    """Every manifest of ``prefix``'s N shards, checked; ShardError naming the first shard at fault."""
    from ..tokenizer.fingerprint import file_sha256

    manifests: list[dict] = []
    for k in range(n):
        path = manifest_path(prefix, k, n)
        name = f"shard {k}/{n} ({path})"
        if not path.exists():
            partial = list(path.parent.glob(f"{Path(shard_prefix(prefix, k, n)).name}_*"))
            what = "incomplete: outputs but no manifest (the task died or is still running)" if partial else "missing"
            raise ShardError(f"{name}: {what}; rerun scidfm-preprocess --shard {k}/{n} with the same arguments")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ShardError(f"{name}: unreadable manifest ({exc}); rerun that shard") from None
        if not data.get("complete"):
            raise ShardError(f"{name}: incomplete; rerun scidfm-preprocess --shard {k}/{n}")
        if data.get("shard") != [k, n]:
            raise ShardError(f"{name}: duplicated: it holds shard {data.get('shard')}'s data, not {k}/{n}; "
                             f"rerun scidfm-preprocess --shard {k}/{n}")
        for digests in data["outputs"].values():
            for d in digests:
                f = path.parent / d["path"]
                if not f.exists() or f.stat().st_size != d["bytes"]:
                    raise ShardError(f"{name}: incomplete: {f} is missing or not {d['bytes']} bytes; rerun that shard")
                if verify_checksums and file_sha256(f) != d["sha256"]:
                    raise ShardError(f"{name}: {f} does not match its manifest's sha256 (changed or damaged); "
                                     f"rerun that shard")
        if manifests:
            ref = manifests[0]
            if (data.get("tokenizer") or {}).get("sha256") != (ref.get("tokenizer") or {}).get("sha256"):
                raise ShardError(f"{name}: different tokenizer (sha256 {data['tokenizer'].get('sha256', '?')[:12]} vs "
                                 f"shard 0's {ref['tokenizer'].get('sha256', '?')[:12]}); rerun it with shard 0's "
                                 f"--tokenizer-model")
            if data.get("plan") != ref.get("plan"):
                raise ShardError(f"{name}: made from different inputs than shard 0 ({data.get('plan')} vs "
                                 f"{ref.get('plan')}); rerun every shard on the same inputs")
            if data.get("settings") != ref.get("settings"):
                raise ShardError(f"{name}: different settings than shard 0 ({data.get('settings')} vs "
                                 f"{ref.get('settings')}); rerun it with shard 0's flags")
        manifests.append(data)
    seen: dict = {}
    for k, data in enumerate(manifests):
        for piece in data["inputs"]:
            key = (piece["file"], piece["start"])
            if key in seen:
                raise ShardError(f"shard {k}/{n}: duplicated: its input {piece['file']} from byte {piece['start']} "
                                 f"is also in shard {seen[key]}/{n}; rerun both with the same --shard N")
            seen[key] = k
    return manifests


def merge(prefix: str, n: int, output_prefix: str, verify_checksums: bool = True) -> dict:
    """Check and merge ``prefix``'s N shards into ``output_prefix_<key>_document``; returns the totals."""
    from .preprocess import output_prefix_for, write_json_atomic

    manifests = check_shards(prefix, n, verify_checksums)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader  # loads torch

    keys = list(manifests[0]["outputs"])
    outputs = {}
    for key in keys:
        parts = [output_prefix_for(shard_prefix(prefix, k, n), key) for k in range(n)]
        final = output_prefix_for(output_prefix, key)
        tmp = f"{final}.merging"
        Path(final).parent.mkdir(parents=True, exist_ok=True)
        dtype = _IndexReader(f"{parts[0]}.idx", multimodal=False).dtype
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
        try:
            for p in parts:
                builder.add_index(p)
            builder.finalize(f"{tmp}.idx")
        except BaseException:
            for ext in (".bin", ".idx"):
                Path(f"{tmp}{ext}").unlink(missing_ok=True)
            raise
        os.replace(f"{tmp}.bin", f"{final}.bin")
        os.replace(f"{tmp}.idx", f"{final}.idx")
        outputs[key] = final
    totals = {
        "shards": n, "outputs": outputs, "tokenizer": manifests[0]["tokenizer"], "plan": manifests[0]["plan"],
        "settings": manifests[0]["settings"],
        **{f: sum(m[f] for m in manifests) for f in ("bytes", "lines", "rejected", "empty")},
        "documents": {k: sum(m["documents"][k] for m in manifests) for k in keys},
        "tokens": {k: sum(m["tokens"][k] for m in manifests) for k in keys},
        "rejected_files": [f"{shard_prefix(prefix, k, n)}_rejected.jsonl" for k in range(n)
                           if manifests[k]["rejected"]],
    }
    write_json_atomic(Path(f"{output_prefix}_merge.json"), totals)
    return totals
