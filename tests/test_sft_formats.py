"""SFT data in the formats public instruction sets use (ShareGPT / SlimOrca, Alpaca, MetaMathQA's
query/response): the same conversation gives the same token ids and loss mask as its ``messages`` form,
the format is chosen per file and named, and a record in the wrong shape is a bad line with file:line and key."""

import json

import pytest

from conftest import SAMPLE
from scidfm_megatron.data.preprocess import PreprocessError, PreprocessUsageError, preprocess

SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def _conversations(n=12):
    convs = [json.loads(line)["messages"] for line in open(SAMPLE / "instructions.jsonl")][:n]
    assert any(c[0]["role"] == "system" for c in convs) and any(len(c) > 3 for c in convs)
    return convs


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    toks, mask = IndexedDataset(f"{prefix}_tokens"), IndexedDataset(f"{prefix}_lossmask")
    return [(toks[i].tolist(), mask[i].tolist()) for i in range(len(toks))]


def test_every_format_gives_the_messages_ids_and_loss_mask(tmp_path, science_tokenizer_dir, capsys):
    convs = _conversations()
    # ShareGPT as SlimOrca publishes it (system/human/gpt; weight null on system, 0.0 on human, 1.0 on gpt)
    weight = {"system": None, "user": 0.0, "assistant": 1.0}
    sharegpt = [{"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"],
                                    "weight": weight[m["role"]]} for m in c]} for c in convs]
    # Alpaca: instruction + input (joined by a newline), output, optional system; earlier turns as history
    alpaca, alpaca_msgs = [], []
    for k, c in enumerate(convs):
        system = [m["content"] for m in c if m["role"] == "system"]
        turns = [m["content"] for m in c if m["role"] != "system"]
        pairs = [turns[i:i + 2] for i in range(0, len(turns) - 2, 2)]
        inp = "Answer briefly." if k % 2 else ""
        rec = dict(instruction=turns[-2], input=inp, output=turns[-1], **({"system": system[0]} if system else {}),
                   **({"history": pairs} if pairs else {}))
        alpaca.append(rec)
        msgs = [{"role": "system", "content": system[0]}] if system else []
        for q, a in pairs:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs += [{"role": "user", "content": turns[-2] + ("\n" + inp if inp else "")},
                 {"role": "assistant", "content": turns[-1]}]
        alpaca_msgs.append(msgs)
    # MetaMathQA: query, response (and its other fields, ignored)
    single = [c for c in convs if [m["role"] for m in c] == ["user", "assistant"]] or \
        [[m for m in c if m["role"] != "system"][:2] for c in convs]
    qr = [{"query": c[0]["content"], "response": c[1]["content"], "type": "GSM_Rephrased"} for c in single]

    d = tmp_path / "mixed"
    d.mkdir()
    _write(d / "a_sharegpt.jsonl", sharegpt)
    _write(d / "b_alpaca.jsonl", alpaca)
    _write(d / "c_metamath.jsonl", qr)
    _write(tmp_path / "ref.jsonl", [{"messages": m} for m in [*convs, *alpaca_msgs, *single]])
    tok = str(science_tokenizer_dir / "tokenizer.model")
    s = preprocess([str(d)], str(tmp_path / "mixed_sft"), tok, sft_seq_length=1024, sft_pack=False, progress=False)
    err = capsys.readouterr().err
    ref = preprocess([str(tmp_path / "ref.jsonl")], str(tmp_path / "ref_sft"), tok, sft_seq_length=1024,
                     sft_pack=False, progress=False)
    assert s.rejected == ref.rejected == 0 and s.sft["conversations"] == len(convs) + len(alpaca) + len(qr)
    got, want = _read(tmp_path / "mixed_sft"), _read(tmp_path / "ref_sft")
    assert len(got) == len(want) and got == want  # ids and loss masks, conversation by conversation
    assert s.sft["formats"] == {str(d / "a_sharegpt.jsonl"): "sharegpt", str(d / "b_alpaca.jsonl"): "alpaca",
                                str(d / "c_metamath.jsonl"): "query_response"}
    assert "a_sharegpt.jsonl: SFT records read as sharegpt (detected from line 1)" in err
    assert "c_metamath.jsonl: SFT records read as query_response" in err
    assert "SFT record formats: sharegpt (1 file), alpaca (1 file), query_response (1 file)" in s.render()
    # the named format is used as given (no detection)
    s2 = preprocess([str(d / "b_alpaca.jsonl")], str(tmp_path / "forced"), tok, sft_seq_length=1024,
                    sft_pack=False, progress=False, sft_format="alpaca")
    assert s2.sft["conversations"] == len(alpaca) and "(--sft-format)" in capsys.readouterr().err


def test_records_in_the_wrong_shape_are_bad_lines(tmp_path, science_tokenizer_dir):
    def turn(frm, value, **kw):
        return dict({"from": frm, "value": value}, **kw)

    src = tmp_path / "slimorca.jsonl"
    _write(src, [
        {"note": "not a conversation"},  # before the first record in a known format: still a bad line
        {"conversations": [turn("human", "What is H2O?"), turn("gpt", "Water.")]},
        {"instruction": "Name CO2.", "input": "", "output": "Carbon dioxide."},  # Alpaca inside a ShareGPT file
        {"conversations": [turn("human", "q"), turn("bing", "a")]},
        {"conversations": [turn("human", "q"), turn("gpt", "a", weight=0)]},
        {"conversations": [turn("human", "only a question")]},
        {"conversations": [turn("human", 5), turn("gpt", "a")]},
    ])
    tok = str(science_tokenizer_dir / "tokenizer.model")
    s = preprocess([str(src)], str(tmp_path / "s"), tok, sft_seq_length=64, progress=False)
    reasons = {r.line: r.reason for r in s.rejections}
    assert s.sft["formats"][str(src)] == "sharegpt" and s.sft["conversations"] == 1
    assert sorted(reasons) == [1, 3, 4, 5, 6, 7] and all(r.file == str(src) for r in s.rejections)
    assert reasons[1].startswith("missing key 'conversations'")
    assert "missing key 'conversations'" in reasons[3] and "this record is Alpaca" in reasons[3]
    assert "turn 1: 'from' must be one of" in reasons[4] and "'bing'" in reasons[4]
    assert "turn 1: weight 0 on an assistant turn" in reasons[5] and "set its weight to 1" in reasons[5]
    assert reasons[6] == "key 'conversations': conversation has no assistant turn to learn from"
    assert "turn 0: 'value' must be a string" in reasons[7]
    # Alpaca: a missing or non-string field names its key
    src2 = tmp_path / "alpaca.jsonl"
    _write(src2, [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": 3, "output": "b"},
                  {"instruction": "a", "output": None}])
    s = preprocess([str(src2)], str(tmp_path / "a"), tok, sft_seq_length=64, progress=False)
    assert [(r.line, r.reason) for r in s.rejections] == [
        (2, "key 'input' is a number, expected a string"), (3, "key 'output' is null, expected a string")]
    with pytest.raises(PreprocessError, match=r"alpaca.jsonl:2: key 'input' is a number"):
        preprocess([str(src2)], str(tmp_path / "a2"), tok, sft_seq_length=64, progress=False, strict=True)


def test_unknown_format_stops_in_one_line(tmp_path, science_tokenizer_dir, capsys):
    from scidfm_megatron.cli.preprocess import main

    src = tmp_path / "qa.jsonl"
    _write(src, [{"question": "q", "answer": "a"}] * 3)
    tok = str(science_tokenizer_dir / "tokenizer.model")
    with pytest.raises(PreprocessUsageError, match=r"qa.jsonl:1: no record in a known SFT format"):
        preprocess([str(src)], str(tmp_path / "x"), tok, sft_seq_length=64, progress=False)
    rc = main(["--input", str(src), "--output-prefix", str(tmp_path / "x"), "--tokenizer-model", tok,
               "--sft-seq-length", "64", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "['answer', 'question']" in err[0] and "ShareGPT" in err[0]
    rc = main(["--input", str(src), "--output-prefix", str(tmp_path / "x"), "--tokenizer-model", tok,
               "--sft-format", "sharegpt", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["scidfm-preprocess: error: --sft-format sharegpt applies to SFT data: add "
                               "--sft-seq-length"]
    with pytest.raises(PreprocessUsageError, match="--json-keys convs names the messages key; --sft-format sharegpt"):
        preprocess([str(src)], str(tmp_path / "x"), tok, json_keys=("convs",), sft_seq_length=64, progress=False,
                   sft_format="sharegpt")
    assert not list(tmp_path.glob("x*"))


def test_json_array_releases_are_named_and_converted(tmp_path, science_tokenizer_dir, capsys):
    """Alpaca's alpaca_data.json and MetaMathQA's release are one JSON array (indented), not JSON Lines:
    refused in one line with the command that converts them; converted, they preprocess."""
    from scidfm_megatron.cli.preprocess import main
    from scidfm_megatron.cli.sft_formats import main as to_jsonl

    recs = [{"instruction": "Name the gas.", "input": "CO2", "output": "Carbon dioxide."},
            {"instruction": "What is NaCl?", "input": "", "output": "Table salt."}]
    src = tmp_path / "alpaca_data.json"
    src.write_text(json.dumps(recs, indent=4))
    tok = str(science_tokenizer_dir / "tokenizer.model")
    args = ["--input", str(src), "--output-prefix", str(tmp_path / "a"), "--tokenizer-model", tok,
            "--sft-seq-length", "64", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    fix = f"python -m scidfm_megatron.cli.sft_formats {src} alpaca_data.jsonl"
    assert len(err) == 1 and f"{src}:1: one JSON array" in err[0] and err[0].endswith(fix)
    assert to_jsonl([str(src), str(tmp_path / "alpaca_data.jsonl")]) == 0
    args[1] = str(tmp_path / "alpaca_data.jsonl")
    assert main(args) == 0
    assert "alpaca (1 file)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a_summary.json").read_text())["sft"]["conversations"] == 2
