"""Parquet inputs: the same documents and ids as jsonl, and bad rows named by file and row."""

import json

import pytest

from conftest import SAMPLE

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def test_parquet_rows_equal_jsonl_and_bad_rows_are_named(tmp_path, science_tokenizer_dir):
    from scidfm_megatron.data.preprocess import preprocess

    texts = [json.loads(line)["text"] for line in open(SAMPLE / "papers.jsonl", encoding="utf-8")][:40]
    model = str(science_tokenizer_dir / "tokenizer.model")
    col = texts[:20] + [None] + texts[20:]  # row 21: null
    pq.write_table(pa.table({"id": list(range(41)), "text": col}), tmp_path / "a.parquet", row_group_size=7)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")  # wrong column type
    pq.write_table(pa.table({"body": ["x"], "meta": ["y"]}), tmp_path / "c.parquet")  # no text column
    pq.write_table(pa.table({"text": [b"raw bytes"]}), tmp_path / "d.parquet")  # binary column
    s = preprocess([str(tmp_path / f"{n}.parquet") for n in "abcd"], str(tmp_path / "pq"), model, append_eod=True,
                   progress=False, workers=1)
    got = {(r.file.rsplit("/", 1)[1], r.line): r.reason for r in s.rejections}
    assert got == {
        ("a.parquet", 21): "key 'text' is null, expected a string",
        ("b.parquet", 1): "key 'text' is a number, expected a string",
        ("b.parquet", 2): "key 'text' is a number, expected a string",
        ("c.parquet", 1): "missing key 'text' (keys present: ['body', 'meta']); choose --json-keys accordingly",
        ("d.parquet", 1): "key 'text' is an object, expected a string",
    }, got
    assert s.rejected == 5 and s.documents["text"] == 40
    (tmp_path / "same.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    preprocess([str(tmp_path / "same.jsonl")], str(tmp_path / "js"), model, append_eod=True, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"pq_text_document{ext}").read_bytes() == (tmp_path / f"js_text_document{ext}").read_bytes()
    rejected = [json.loads(line) for line in open(tmp_path / "pq_rejected.jsonl")]
    assert len(rejected) == 5 and rejected[0]["file"].endswith("a.parquet") and rejected[0]["line"] == 21
