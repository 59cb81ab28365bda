"""jsonl -> Megatron .bin/.idx (issue 3, acceptance 2, 3, 4 and 7)."""

import gzip
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import ROOT, SAMPLE
from scidfm_megatron.data.preprocess import PreprocessError, preprocess
from scidfm_megatron.testing.runs import console_script


def megatron_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def cli(*args, **kw):
    return subprocess.run([*console_script("scidfm-preprocess"), *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=600, **kw)


def test_megatron_core_reads_what_we_write(tmp_path, science_tokenizer_dir, science_tokenizer):
    tok = science_tokenizer
    out = tmp_path / "papers"
    r = cli("--input", SAMPLE / "papers.jsonl", "--output-prefix", out, "--json-keys", "text", "--workers", 2,
            "--append-eod", "--tokenizer-model", science_tokenizer_dir / "tokenizer.model")
    assert r.returncode == 0, r.stderr
    texts = [json.loads(line)["text"] for line in open(SAMPLE / "papers.jsonl")]
    ds = megatron_dataset(tmp_path / "papers_text_document")
    assert len(ds) == len(texts) and ds.index.dtype == np.uint16
    assert len(ds.document_indices) == len(texts) + 1
    for k in (0, 1, len(texts) // 2, len(texts) - 1):
        assert ds[k].tolist() == tok.encode(texts[k]) + [tok.eod_id]
        assert tok.decode(ds[k][:-1]) == texts[k]
    summary = json.loads((tmp_path / "papers_summary.json").read_text())
    assert summary["documents"]["text"] == len(texts) and summary["rejected"] == 0
    assert summary["tokens"]["text"] == int(ds.sequence_lengths.sum())
    from scidfm_megatron.tokenizer.fingerprint import tokenizer_fingerprint

    model = science_tokenizer_dir / "tokenizer.model"  # what training checks its recipe against
    assert summary["tokenizer"] == dict(tokenizer_fingerprint(model), model_file=str(model.resolve()))
    assert summary["largest_id"] == {"text": max(int(ds[i].max()) for i in range(len(ds)))}
    assert "documents" in r.stdout and "tokens" in r.stdout


def test_database_fields_are_wrapped_in_spans(tmp_path, science_tokenizer_dir, science_tokenizer):
    s = preprocess([str(SAMPLE / "molecules.jsonl")], str(tmp_path / "mol"),
                   str(science_tokenizer_dir / "tokenizer.model"), json_keys=["smiles", "id"],
                   spans={"smiles": "molecule"}, workers=1, progress=False)
    assert s.documents == {"smiles": 2000, "id": 2000}
    ds = megatron_dataset(tmp_path / "mol_smiles_document")
    first = json.loads(open(SAMPLE / "molecules.jsonl").readline())
    assert science_tokenizer.decode(ds[0][:-1]) == f"[START_I_SMILES]{first['smiles']}[END_I_SMILES]"
    ids_ds = megatron_dataset(tmp_path / "mol_id_document")  # keep it alive: items are views of its mmap
    assert science_tokenizer.decode(ids_ds[0][:-1]) == first["id"]
    with pytest.raises(PreprocessError, match="not one of --json-keys"):
        preprocess([str(SAMPLE / "molecules.jsonl")], str(tmp_path / "x"),
                   str(science_tokenizer_dir / "tokenizer.model"), json_keys=["id"], spans={"smiles": "molecule"},
                   progress=False)


BAD_LINES = [
    (b'{"text": "good one"}', None),
    (b'{"text": "bad \xff utf8"}', "invalid UTF-8 at byte 14"),
    (b'{"text": 5}', "key 'text' is a number, expected a string"),
    (b'{"text": "truncated', "invalid JSON"),
    (b'', None),  # blank line: counted, not an error
    (b'{"body": "no text key"}', "missing key 'text'"),
    (b'{"text": ""}', None),  # empty document: skipped and counted
    (b'{"text": "escaped nul \\u0000"}', None),  # valid JSON: kept with its NUL, and counted
    (b'{"text": "raw nul \x00"}', "NUL byte at byte"),
    (b'["a list"]', "expected a JSON object, got a list"),
    (b'{"text": "good two"}', None),
]


def write_bad_file(path):
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")


def test_bad_lines_are_reported_with_line_numbers(tmp_path, science_tokenizer_dir, science_tokenizer):
    src = tmp_path / "mixed.jsonl"
    write_bad_file(src)
    r = cli("--input", src, "--output-prefix", tmp_path / "m", "--workers", 2, "--append-eod",
            "--tokenizer-model", science_tokenizer_dir / "tokenizer.model")
    assert r.returncode == 0, r.stderr
    expected = [(n, why) for n, (_, why) in enumerate(BAD_LINES, 1) if why]
    rejected = [json.loads(line) for line in open(tmp_path / "m_rejected.jsonl")]
    assert [(x["line"], x["file"]) for x in rejected] == [(n, str(src)) for n, _ in expected]
    for (n, why), x in zip(expected, rejected, strict=False):
        assert why in x["reason"]
        assert f"{src}:{n}: " in r.stdout  # listed in the printed summary too
    ds = megatron_dataset(tmp_path / "m_text_document")
    assert [science_tokenizer.decode(ds[i][:-1]) for i in range(len(ds))] == ["good one", "escaped nul \x00",
                                                                              "good two"]
    s = json.loads((tmp_path / "m_summary.json").read_text())
    assert (s["rejected"], s["empty"], s["blank_lines"], s["lines"]) == (6, 1, 1, len(BAD_LINES))
    assert s["nul_documents"] == 1 and "documents kept with an escaped NUL (\\u0000): 1" in r.stdout


def test_strict_mode_stops_at_the_first_bad_line_and_writes_nothing(tmp_path, science_tokenizer_dir):
    src = tmp_path / "mixed.jsonl"
    write_bad_file(src)
    r = cli("--input", src, "--output-prefix", tmp_path / "s", "--workers", 2, "--strict",
            "--tokenizer-model", science_tokenizer_dir / "tokenizer.model")
    assert r.returncode == 1
    assert f"{src}:2: invalid UTF-8 at byte 14" in r.stderr
    assert os.listdir(tmp_path) == ["mixed.jsonl"]


def test_one_invalid_utf8_line_never_yields_success_without_complete_output(tmp_path, science_tokenizer_dir):
    """Megatron-LM's tool exits 0 with an empty .bin and no .idx here (issue 3, acceptance 7)."""
    src = tmp_path / "one_bad.jsonl"
    src.write_bytes(b'{"text": "a"}\n{"text": "b\xe9"}\n{"text": "c"}\n')
    r = cli("--input", src, "--output-prefix", tmp_path / "o",
            "--tokenizer-model", science_tokenizer_dir / "tokenizer.model")
    assert r.returncode == 0 and "one_bad.jsonl:2: invalid UTF-8" in r.stdout
    assert len(megatron_dataset(tmp_path / "o_text_document")) == 2  # complete: every good line is there


def test_compressed_inputs_give_identical_output(tmp_path, science_tokenizer_dir):
    zstandard = pytest.importorskip("zstandard")
    raw = (SAMPLE / "papers.jsonl").read_bytes()
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "p.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    model = str(science_tokenizer_dir / "tokenizer.model")
    for name in ("p.jsonl.gz", "p.jsonl.zst"):
        preprocess([str(tmp_path / name)], str(tmp_path / name.replace(".", "_")), model, workers=2, progress=False)
    preprocess([str(SAMPLE / "papers.jsonl")], str(tmp_path / "plain"), model, workers=1, progress=False)
    ref = (tmp_path / "plain_text_document.bin").read_bytes()
    assert (tmp_path / "p_jsonl_gz_text_document.bin").read_bytes() == ref
    assert (tmp_path / "p_jsonl_zst_text_document.bin").read_bytes() == ref
    assert ((tmp_path / "p_jsonl_zst_text_document.idx").read_bytes()
            == (tmp_path / "plain_text_document.idx").read_bytes())


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """~12 MB of sample prose: long enough to interrupt a run in the middle."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    lines = [line for line in open(SAMPLE / "papers.jsonl", encoding="utf-8")]
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < 12_000_000:
            f.writelines(lines)
    return path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_run_leaves_nothing_at_the_output_names(tmp_path, science_tokenizer_dir, big_jsonl, sig):
    out = tmp_path / "k"
    proc = subprocess.Popen([*console_script("scidfm-preprocess"), "--input", str(big_jsonl),
                             "--output-prefix", str(out), "--workers", "2", "--no-progress",
                             "--tokenizer-model", str(science_tokenizer_dir / "tokenizer.model")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    tmp = tmp_path / "k_text_document.bin.tmp"
    while not tmp.exists() or tmp.stat().st_size < 100_000:
        assert time.time() < deadline and proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    names = os.listdir(tmp_path)
    for suffix in (".bin", ".idx"):
        assert f"k_text_document{suffix}" not in names
    assert "k_summary.json" not in names and "k_rejected.jsonl" not in names
    if sig == signal.SIGTERM:  # a clean stop also removes its temporary files and says so
        assert proc.returncode == 1 and "terminated; nothing written" in err
        assert names == []


def _peak_rss_of_tree(cmd) -> int:
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            total = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
        except psutil.Error:
            continue
        peak = max(peak, total)
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()
    return peak


def test_peak_memory_is_flat_in_input_size(tmp_path, science_tokenizer_dir, big_jsonl):
    """12 MB vs 60 MB of input: the whole process tree's peak RSS moves by less than 20%."""
    five = tmp_path / "x5.jsonl"
    with open(five, "wb") as f:
        for _ in range(5):
            f.write(big_jsonl.read_bytes())
    peaks = []
    for src in (big_jsonl, five):
        peaks.append(_peak_rss_of_tree([*console_script("scidfm-preprocess"), "--input", str(src),
                                        "--output-prefix", str(tmp_path / src.stem), "--workers", "2", "--no-progress",
                                        "--tokenizer-model", str(science_tokenizer_dir / "tokenizer.model")]))
    assert peaks[1] <= 1.2 * peaks[0], f"peak RSS {peaks[0] / 1e6:.0f} MB -> {peaks[1] / 1e6:.0f} MB"


def test_plain_sentencepiece_model_gives_megatron_lm_ids(tmp_path):
    """A plain 32000-piece Llama tokenizer (Megatron-LM's --tokenizer-type GPTSentencePieceTokenizer):
    each document is encode_as_ids(text), no BOS, then EOD = </s> (the model has no <|eod|>)."""
    import sentencepiece as spm

    base = ROOT / "examples" / "tokenizer" / "base_tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(base))
    docs = [json.loads(x)["text"] for x in open(SAMPLE / "papers.jsonl", encoding="utf-8")][:40]
    docs += ["Benzene is c1ccccc1 \u2014 caf\u00e9 \u4e2d\u6587 <|user|> [START_I_SMILES]CCO[END_I_SMILES] </s>"]
    src = tmp_path / "plain.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    r = cli("--input", src, "--output-prefix", tmp_path / "p", "--tokenizer-model", base, "--append-eod",
            "--workers", 2)
    assert r.returncode == 0, r.stderr
    ds = megatron_dataset(tmp_path / "p_text_document")
    assert len(ds) == len(docs) and ds[0].dtype == np.uint16
    for i, d in enumerate(docs):
        assert ds[i].tolist() == sp.encode_as_ids(d) + [sp.eos_id()]
    # span wrapping and chat markers need the science tokenizer: one line, exit 2, nothing written
    r = cli("--input", src, "--output-prefix", tmp_path / "q", "--tokenizer-model", base, "--json-keys", "text",
            "--span", "text=molecule")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs the science tokenizer" in r.stderr
    assert not list(tmp_path.glob("q*"))
