"""Hostile text (issue 11, acceptance 4): JSON lines whose strings hold escaped lone surrogates
("\\ud83d", an emoji cut in half in a web dump) are reported by file:line and skipped, every good line is
kept; --strict stops at the first one and writes nothing. Everywhere text enters: preprocessing (text
keys, span keys, SFT messages), the tokenizer build's --bracket-atoms-from, evaluation task files."""

import json
import os

import pytest

from scidfm_megatron.data.preprocess import PreprocessError, preprocess

CUT = "\\ud83d"  # as it appears in the file: an escaped lone high surrogate


def lines_with_surrogates(tmp_path):
    src = tmp_path / "hostile.jsonl"
    rows = ['{"text": "good one", "smiles": "CCO"}',
            '{"text": "cut emoji ' + CUT + ' here", "smiles": "CCN"}',
            '{"text": "good two", "smiles": "c1ccccc1"}',
            '{"text": "fine", "smiles": "C' + CUT + 'C"}',
            '{"text": "\\udc00 low half", "smiles": "O"}',
            '{"text": "good three", "smiles": "CC(=O)O"}']
    src.write_text("\n".join(rows) + "\n", encoding="ascii")
    return src, [2, 4, 5]


def test_preprocess_reports_each_surrogate_line_and_keeps_the_rest(tmp_path, science_tokenizer_dir, science_tokenizer):
    src, bad = lines_with_surrogates(tmp_path)
    s = preprocess([str(src)], str(tmp_path / "h"), str(science_tokenizer_dir / "tokenizer.model"),
                   json_keys=("text", "smiles"), spans={"smiles": "molecule"}, progress=False)
    assert [r.line for r in s.rejections] == bad
    assert all("lone surrogate" in r.reason and r.file == str(src) for r in s.rejections)
    assert "key 'smiles'" in s.rejections[1].reason and "U+D83D" in s.rejections[1].reason
    assert "U+DC00" in s.rejections[2].reason
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "h_text_document"))
    assert [science_tokenizer.decode(ds[i][:-1] if ds[i][-1] == science_tokenizer.eod_id else ds[i])
            for i in range(len(ds))] == ["good one", "good two", "good three"]
    assert len(IndexedDataset(str(tmp_path / "h_smiles_document"))) == 3
    rejected = [json.loads(x) for x in open(tmp_path / "h_rejected.jsonl")]
    assert [x["line"] for x in rejected] == bad


def test_preprocess_strict_stops_at_the_first_surrogate(tmp_path, science_tokenizer_dir):
    src, bad = lines_with_surrogates(tmp_path)
    with pytest.raises(PreprocessError, match=f"hostile.jsonl:{bad[0]}: .*lone surrogate U\\+D83D"):
        preprocess([str(src)], str(tmp_path / "h"), str(science_tokenizer_dir / "tokenizer.model"),
                   json_keys=("text",), strict=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hostile.jsonl"]


def test_sft_messages_with_surrogates(tmp_path, science_tokenizer_dir):
    def conv(user, answer):
        return json.dumps({"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": answer}]}).replace("@CUT@", CUT)

    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join([conv("What is water?", "H2O"), conv("bad @CUT@ question", "x"),
                              conv("ok", "answer with @CUT@ inside"), conv("Name ethanol.", "CCO")]) + "\n")
    s = preprocess([str(src)], str(tmp_path / "sft"), str(science_tokenizer_dir / "tokenizer.model"),
                   json_keys=("messages",), sft_seq_length=64, progress=False)
    assert [r.line for r in s.rejections] == [2, 3]
    assert "messages[0].content" in s.rejections[0].reason and "messages[1].content" in s.rejections[1].reason
    assert s.sft["conversations"] == 2
    with pytest.raises(PreprocessError, match="chat.jsonl:2: "):
        preprocess([str(src)], str(tmp_path / "sft2"), str(science_tokenizer_dir / "tokenizer.model"),
                   json_keys=("messages",), sft_seq_length=64, strict=True, progress=False)
    assert not list(tmp_path.glob("sft2*"))


def test_tokenizer_build_skips_and_reports_bad_bracket_atom_lines(tmp_path, capsys):
    from conftest import BASE_MODEL
    from scidfm_megatron.cli.build_tokenizer import main
    from scidfm_megatron.tokenizer import ScienceTokenizer

    src, bad = lines_with_surrogates(tmp_path)
    with open(src, "a") as f:
        f.write('{"text": "x", "smiles": "[Fe+3]Cl"}\n')
    smi = tmp_path / "mols.smi"
    smi.write_bytes(b"[Zn+2] zinc\n[O-]\xe9 broken\n[NH4+] ammonium\n")
    assert main(["--base-model", str(BASE_MODEL), "--output-dir", str(tmp_path / "tok"),
                 "--bracket-atoms-from", f"{src}:smiles", str(smi)]) == 0
    err = capsys.readouterr().err
    assert f"{src}:4: key 'smiles': lone surrogate U+D83D" in err and f"{smi}:2: invalid UTF-8" in err
    assert f"{src}:2:" not in err  # that line's surrogate is in "text", not in the harvested key
    mol = set(ScienceTokenizer(tmp_path / "tok" / "tokenizer.model").mol_vocab)
    assert {"[Fe+3]", "[Zn+2]", "[NH4+]"} <= mol
    with pytest.raises(SystemExit, match=f"{src.name}:4: key 'smiles': lone surrogate"):
        main(["--base-model", str(BASE_MODEL), "--output-dir", str(tmp_path / "tok2"), "--strict",
              "--bracket-atoms-from", f"{src}:smiles"])
    assert not (tmp_path / "tok2").exists()


def test_evaluation_task_files_skip_and_report_surrogate_lines(tmp_path):
    from scidfm_megatron.eval.tasks import TaskDataError, load_records

    f = tmp_path / "sciq.jsonl"
    f.write_text('{"question": "Water is?", "choices": ["H2O", "CO2"], "answer": 0}\n'
                 '{"question": "cut ' + CUT + '", "choices": ["a", "b"], "answer": 1}\n'
                 '{"question": "ok", "choices": ["x", "y ' + CUT + '"], "answer": 1}\n'
                 '{"question": "Salt is?", "choices": ["NaCl", "KBr"], "answer": 0}\n', encoding="ascii")
    rejected = []
    recs = load_records(f, "multiple_choice", rejected=rejected)
    assert [r["question"] for r in recs] == ["Water is?", "Salt is?"]
    assert [r.split(": ")[0] for r in rejected] == [f"{f}:2", f"{f}:3"]
    assert "question: lone surrogate U+D83D" in rejected[0] and "choices[1]: lone surrogate" in rejected[1]
    with pytest.raises(TaskDataError, match="sciq.jsonl:2: question: lone surrogate"):
        load_records(f, "multiple_choice", strict=True)
