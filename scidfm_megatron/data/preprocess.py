"""Raw jsonl corpora (plain, .gz, .zst) and parquet files -> Megatron ``<prefix>_<key>_document.{bin,idx}``.

Streaming and parallel: the main process reads raw lines and writes tokens; worker processes
(data/encode_worker.py) validate, decode, wrap and tokenize batches of lines. At most ``4 x workers`` batches
are in flight, so memory is bounded whatever the input size (``multiprocessing.Pool.imap`` would read the
whole input ahead). Nothing here imports torch: workers stay small and start fast.

Bad input is never dropped silently. Each bad line (invalid UTF-8, raw NUL bytes, invalid JSON, not an
object, missing key, non-string value, text holding an escaped lone surrogate such as ``"\ud800"``) is
counted and listed with its file, line number and reason in the summary and in ``<prefix>_rejected.jsonl``;
``strict=True`` stops at the first one with that message and writes nothing. Empty documents are skipped and
counted. An escaped NUL (``"\u0000"``) is a valid JSON string: the document is kept with its NUL (SentencePiece
encodes it, as a byte with byte fallback) and counted (``nul_documents``). Outputs are written under temporary names
and renamed only when everything is complete. The summary records the tokenizer's fingerprint and the largest id
written per output (``tokenizer``, ``largest_id``), which training checks against its recipe (data/provenance.py).
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, cast

import numpy as np

from ..errors import PreprocessError, PreprocessUsageError  # re-export: defined in scidfm_megatron/errors.py
from ..utils import atomic_write
from .encode_worker import encode_batch, init_worker  # the worker processes' side
from .indexed import IndexedWriter, idx_path, optimal_dtype

SPAN_KINDS = ("molecule", "protein")


@dataclass
class Rejection:
    """One bad input line: where it is and why it was rejected (the summary and ``<prefix>_rejected.jsonl``)."""
    file: str
    line: int
    reason: str


@dataclass
class Summary:
    """What a preprocessing run read, wrote and rejected; printed, and written as ``<prefix>_summary.json``."""
    inputs: list[str]
    outputs: dict[str, str]
    documents: dict[str, int]
    tokens: dict[str, int]
    lines: int = 0
    bytes_read: int = 0
    rejected: int = 0
    empty: int = 0
    blank_lines: int = 0
    seconds: float = 0.0
    rejections: list[Rejection] = field(default_factory=list)  # the first ``max_listed``
    sft: dict = field(default_factory=dict)  # SFT packing statistics (SFT mode only)
    nul_documents: int = 0  # documents kept that hold an escaped NUL (\u0000)
    tokenizer: dict = field(default_factory=dict)  # tokenizer.fingerprint: sha256, vocab_size, kind
    largest_id: dict = field(default_factory=dict)  # per output key: the largest token id written
    skipped: str = ""  # --shard: the complete manifest that made this run skip the shard

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    def render(self, max_listed: int = 20) -> str:
        if self.skipped:
            return f"already complete ({self.skipped}): skipped; delete that manifest to redo the shard"
        docs = sum(self.documents.values())
        toks = sum(self.tokens.values())
        lines = [f"{self.lines:,} lines, {self.bytes_read / 1e6:.1f} MB in {self.seconds:.1f} s "
                 f"({self.mb_per_s:.2f} MB/s, {docs / max(self.seconds, 1e-9):,.0f} docs/s, "
                 f"{toks / max(self.seconds, 1e-9):,.0f} tokens/s)"]
        for key, out in self.outputs.items():
            if self.sft:
                lines.append(f"  {key}: {self.documents[key]:,} conversations, {self.tokens[key]:,} tokens "
                             f"({self.sft['assistant_tokens']:,} assistant) in {self.sft['sequences']:,} sequences of "
                             f"<= {self.sft['seq_length'] + 1} tokens ({self.sft['truncated']:,} truncated) -> "
                             f"{out}_{{tokens,lossmask,convlens}}.{{bin,idx}}")
            else:
                lines.append(f"  {key}: {self.documents[key]:,} documents, {self.tokens[key]:,} tokens -> "
                             f"{out}.{{bin,idx}}")
        if self.sft.get("formats"):
            counts = collections.Counter(self.sft["formats"].values())
            lines.append("  SFT record formats: "
                         + ", ".join(f"{f} ({n} file{'s' * (n > 1)})" for f, n in counts.items()))
        lines.append(f"  rejected lines: {self.rejected:,}; empty documents skipped: {self.empty:,}; "
                     f"blank lines: {self.blank_lines:,}" +
                     (f"; documents kept with an escaped NUL (\\u0000): {self.nul_documents:,}"
                      if self.nul_documents else ""))
        for r in self.rejections[:max_listed]:
            lines.append(f"    {r.file}:{r.line}: {r.reason}")
        if self.rejected > max_listed:
            lines.append(f"    ... {self.rejected - max_listed:,} more (all in the _rejected.jsonl file)")
        return "\n".join(lines)


def open_binary(path: str | os.PathLike) -> io.BufferedIOBase:
    """Open plain, gzip (.gz) or zstandard (.zst) files for binary reading."""
    p = str(path)
    if p.endswith(".gz"):
        return gzip.open(p, "rb")
    if p.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise PreprocessError(f"{p}: reading .zst needs the zstandard package (pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), closefd=True))
    return open(p, "rb")


# ---------------------------------------------------------------------------------- reading
def _blocks(files: list[str], block_bytes: int, pieces=None, columns=()) -> Iterator[tuple[int, int, bytes]]:
    """(file index, first line number, bytes) blocks of whole lines; the main process never parses.
    ``pieces``: (file index, start byte, end byte or None) parts of the files (a --shard's share);
    ``columns``: the keys read (the only parquet columns loaded)."""
    from .shards import first_line_number

    for fi, start, end in pieces if pieces is not None else [(fi, 0, None) for fi in range(len(files))]:
        path = files[fi]
        if path.endswith(".parquet"):  # rows -> jsonl lines of the columns read (data/parquet.py)
            from .parquet import parquet_blocks

            yield from parquet_blocks(path, fi, list(columns), block_bytes)
            continue
        line = first_line_number(path, start) if start else 1
        carry = b""
        left = None if end is None else end - start
        with (open_binary(path) if end is None else open(path, "rb")) as f:
            if start:
                f.seek(start)
            while True:
                data = f.read(block_bytes if left is None else min(block_bytes, left))
                if left is not None:
                    left -= len(data)
                if not data:
                    break
                data = carry + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading
                    carry = data
                    continue
                block, carry = data[:cut], data[cut:]
                yield fi, line, block
                line += block.count(b"\n")
        if carry:
            yield fi, line, carry


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, directories (their *.jsonl, *.jsonl.gz, *.jsonl.zst, *.json, *.parquet) and globs, sorted."""
    import glob

    files: list[str] = []
    for item in inputs:
        for part in item.split(","):
            if not part:
                continue
            p = Path(part)
            if p.is_dir():
                found = sorted(str(x) for pat in ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.json", "*.parquet")
                               for x in p.glob(pat))
            elif any(c in part for c in "*?["):
                found = sorted(glob.glob(part))
            else:
                found = [part] if p.exists() else []
            if not found:
                raise PreprocessError(f"--input {part}: no such file (or no *.jsonl[.gz|.zst] in that directory)")
            files.extend(found)
    return files


def output_prefix_for(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


class _Terminate(Exception):
    pass


def preprocess(inputs: list[str], output_prefix: str, tokenizer_model: str, *, json_keys=("text",),
               spans: Optional[dict] = None, append_eod: bool = True, workers: int = 1, strict: bool = False,
               block_bytes: int = 1 << 20, progress: bool = True, max_listed: int = 20,
               sft_seq_length: Optional[int] = None, sft_pack: bool = True, sft_format: str = "auto",
               shard: Optional[tuple[int, int]] = None) -> Summary:
    """Tokenize ``inputs`` into one Megatron dataset per json key. Returns the summary.

    ``shard=(K, N)``: only shard K's share of the inputs, into ``<output_prefix>.shard-K-of-N`` with a
    manifest; skipped when that manifest is already complete (see :mod:`.shards`).

    With ``sft_seq_length``, records are conversations (``json_keys[0]``, default ``messages``: a list
    of {role, content}; or ShareGPT / Alpaca / query-response records, ``sft_format``, chosen per file
    when ``"auto"``: :mod:`.sft_formats`) and the output is a packed SFT dataset (see :mod:`.sft`)."""
    from ..tokenizer.plain import PlainSentencePieceTokenizer, load_tokenizer

    spans = dict(spans or {})
    keys = list(json_keys)
    for k, kind in spans.items():
        if kind not in SPAN_KINDS:
            raise PreprocessError(f"--span {k}={kind}: kind must be one of {SPAN_KINDS}")
        if k not in keys:
            raise PreprocessError(f"--span {k}={kind}: {k!r} is not one of --json-keys {keys}")
    files = expand_inputs(list(inputs))
    try:
        tok = load_tokenizer(tokenizer_model)
    except (OSError, ValueError, RuntimeError) as exc:
        raise PreprocessError(f"--tokenizer-model: {exc}") from None
    if isinstance(tok, PlainSentencePieceTokenizer) and (spans or sft_seq_length):
        what = "--span" if spans else "SFT preprocessing (--sft-seq-length: chat markers)"
        raise PreprocessUsageError(f"{what} needs the science tokenizer; {tokenizer_model} is a plain SentencePiece "
                              f"model: build one with scidfm-build-tokenizer --base-model {tokenizer_model}")
    from ..tokenizer.fingerprint import tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(tokenizer_model, tok)
    dtype = optimal_dtype(tok.vocab_size)
    mode = "chat" if sft_seq_length else "text"
    if shard is not None and mode == "chat":
        raise PreprocessUsageError("--shard splits pretraining text; SFT data (--sft-seq-length) is small: "
                                   "preprocess it in one run")
    base_prefix = output_prefix
    if mode == "text":
        from ..tokenizer.fast import prepare

        prepare(tok)  # GigaToken's model conversion, done once before the workers fork
    if mode == "chat":
        from .sft import SFTPacker

        if keys == ["text"]:
            keys = ["messages"]
        if len(keys) != 1 or spans:
            raise PreprocessError("SFT preprocessing takes one --json-keys (the messages list) and no --span")
        file_formats = _sft_formats(files, sft_format, keys[0])
        prefixes = {keys[0]: output_prefix}
        writers: dict[str, Any] = {keys[0]: SFTPacker(output_prefix, cast(int, sft_seq_length), dtype,
                                                      pack=sft_pack)}  # chat mode: set
    else:
        if sft_format != "auto":
            raise PreprocessUsageError(f"--sft-format {sft_format} applies to SFT data: add --sft-seq-length")
        file_formats = []
        pieces = None
        if shard is not None:
            from . import shards as sh

            k_shard, n_shard = shard
            shard_info: dict[str, Any] = dict(files=files, plan=sh.plan_identity(files),
                              fingerprint=dict(fingerprint),
                              settings={"json_keys": keys, "spans": spans, "append_eod": append_eod})
            done = sh.finished(output_prefix, k_shard, n_shard, shard_info["plan"], shard_info["fingerprint"],
                               shard_info["settings"])
            if done is not None:
                return Summary(inputs=files, outputs={}, documents=done["documents"], tokens=done["tokens"],
                               lines=done["lines"], bytes_read=done["bytes"], rejected=done["rejected"],
                               skipped=str(sh.manifest_path(output_prefix, k_shard, n_shard)))
            pieces = sh.plan_shard(files, k_shard, n_shard)
            output_prefix = sh.shard_prefix(output_prefix, k_shard, n_shard)
        prefixes = {k: output_prefix_for(output_prefix, k) for k in keys}
        writers = {k: IndexedWriter(p, dtype) for k, p in prefixes.items()}
    rejected_path = Path(f"{output_prefix}_rejected.jsonl")
    rejected_tmp = Path(f"{rejected_path}.tmp")
    summary = Summary(inputs=files, outputs=prefixes, documents={k: 0 for k in keys}, tokens={k: 0 for k in keys},
                      tokenizer=dict(fingerprint, model_file=os.path.abspath(tokenizer_model)))
    total_bytes = sum(os.path.getsize(f) for f in files) if mode == "chat" or pieces is None else \
        sum((os.path.getsize(files[fi]) if e is None else e - s) for fi, s, e in pieces)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)

    def on_term(signum, frame):
        raise _Terminate()

    prev_term = signal.signal(signal.SIGTERM, on_term) if _is_main_thread() else None
    pool = None
    start = time.perf_counter()
    init_args = (str(tokenizer_model), keys, spans, append_eod, np.dtype(dtype).name, mode, tuple(file_formats))
    try:
        with open(rejected_tmp, "w") as rej_file:
            submit: Callable[[Any], Any]  # -> an ApplyResult or a _Done: both have .get()
            if workers > 1:
                import multiprocessing as mp

                pool = mp.get_context("fork").Pool(workers, initializer=init_worker, initargs=init_args)
                submit = lambda b: pool.apply_async(encode_batch, (b,))  # noqa: E731
            else:
                init_worker(*init_args, in_pool=False)
                submit = lambda b: _Done(encode_batch(b))  # noqa: E731
            inflight: collections.deque = collections.deque()
            compressed = [f.endswith((".gz", ".zst", ".parquet")) for f in files]

            def drain_one():
                fi, out, rejects, empty, blank, nbytes, nlines, nul = inflight.popleft().get()
                for lineno, reason in rejects:
                    r = Rejection(files[fi], lineno, reason)
                    if strict:
                        raise PreprocessError(f"{r.file}:{r.line}: {r.reason} (strict mode: nothing written)")
                    summary.rejected += 1
                    if len(summary.rejections) < max_listed:
                        summary.rejections.append(r)
                    rej_file.write(json.dumps(asdict(r)) + "\n")
                for k, (flat, lengths, *mask) in out.items():
                    if len(lengths):
                        writers[k].add_documents(flat, lengths, *mask)
                        summary.documents[k] += len(lengths)
                        summary.tokens[k] += int(flat.size)
                        summary.largest_id[k] = max(summary.largest_id.get(k, -1), int(flat.max()))
                summary.lines += nlines
                summary.empty += empty
                summary.blank_lines += blank
                summary.nul_documents += nul
                summary.bytes_read += nbytes
                if bar is not None:
                    bar.update(nbytes if not compressed[fi] else 0)
                    el = time.perf_counter() - start
                    bar.set_postfix_str(f"{sum(summary.documents.values()) / el:,.0f} docs/s, "
                                        f"{sum(summary.tokens.values()) / el:,.0f} tok/s", refresh=False)

            for batch in _blocks(files, block_bytes, None if mode == "chat" else pieces, keys):
                inflight.append(submit(batch))
                if len(inflight) >= 4 * max(workers, 1):
                    drain_one()
            while inflight:
                drain_one()
        for w in writers.values():
            w.finalize()
        os.replace(rejected_tmp, rejected_path)
    except BaseException:
        for w in writers.values():
            w.abort()
        rejected_tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
    summary.seconds = time.perf_counter() - start
    extra = (dict(writers[keys[0]].stats(), formats=dict(zip(files, file_formats, strict=False)))
             if mode == "chat" else {})
    summary.sft = extra
    write_json_atomic(Path(f"{output_prefix}_summary.json"),
                      dict(asdict(summary), mb_per_s=summary.mb_per_s,
                           rejections=[asdict(r) for r in summary.rejections],
                           **({"sft": extra} if extra else {})))
    if mode == "text" and shard is not None:
        sh.write_manifest(base_prefix, *shard, pieces=pieces, summary=summary,
                          outputs=prefixes, **shard_info)
    return summary


def _sft_formats(files: list[str], requested: str, key: str) -> list[str]:
    """The SFT record format of each input file (``--sft-format``, or detected from its first record), printed."""
    from .sft_formats import CHOICES, SFTFormatError, choose

    if requested not in CHOICES:
        raise PreprocessUsageError(f"--sft-format {requested}: choose one of {', '.join(CHOICES)}")
    if requested not in ("auto", "messages") and key != "messages":
        raise PreprocessUsageError(f"--json-keys {key} names the messages key; --sft-format {requested} reads its own "
                                   f"keys (docs/data.md): drop --json-keys")
    out = []
    for k, path in enumerate(files):
        def lines():
            with open_binary(path) as f:  # noqa: B023  consumed by choose() within this iteration
                yield from enumerate(f, 1)
        try:
            fmt, how = choose(lines(), path, requested, key)
        except SFTFormatError as exc:
            raise PreprocessUsageError(str(exc)) from None
        except (OSError, EOFError) as exc:
            raise PreprocessError(f"{path}: cannot read ({exc})") from None
        out.append(fmt)
        if k < 20:
            print(f"[scidfm] {path}: SFT records read as {fmt} ({how})", file=sys.stderr)
    if len(files) > 20:
        counts = collections.Counter(out)
        print(f"[scidfm] ... {len(files) - 20} more files; in all: "
              + ", ".join(f"{f} {n} file(s)" for f, n in counts.items()), file=sys.stderr)
    return out


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def write_json_atomic(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=1))


def outputs_complete(prefix: str) -> bool:
    return idx_path(prefix).exists()
