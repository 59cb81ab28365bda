"""Conversion as a new user meets it (issue 15): a plain Mixtral with a Llama tokenizer or with none,
round trips through the CLI, dtype kept, config.json as transformers writes it, --verify, refusals.

One process: the CLI's ``main`` is called in-process (hf-to-mcore is single-process and streamed), on a
small transformers-made Mixtral (GQA, 2 layers x 4 experts, Llama/Mistral 32000-piece vocabulary).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import BASE_MODEL
from scidfm_megatron.cli.convert import main as convert

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def make_mixtral(out: Path, *, vocab=32000, tokenizer=True, seed=0) -> Path:
    """A random fp32 Mixtral saved by transformers in 3 shards, with the Llama tokenizer as an HF
    tokenizer folder (tokenizer.model + tokenizer.json + tokenizer_config.json) or without one."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                        max_position_embeddings=128)
    torch.manual_seed(seed)
    MixtralForCausalLM(cfg).save_pretrained(out, max_shard_size="3MB")
    if tokenizer:
        src = out.parent / f"{out.name}_sp"
        src.mkdir()
        shutil.copyfile(BASE_MODEL, src / "tokenizer.model")
        (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
        shutil.copyfile(BASE_MODEL, out / "tokenizer.model")
    return out


def tensors(d: Path) -> dict:
    from scidfm_megatron.convert.hf_io import HFCheckpoint

    ck = HFCheckpoint(d)
    return {n: ck.get(n) for n in sorted(ck.location)}


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = convert([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert_cli")


@pytest.fixture(scope="module")
def llama_mixtral(work):
    return make_mixtral(work / "mixtral_llama")


@pytest.fixture(scope="module")
def imported(work, llama_mixtral):
    """hf-to-mcore --ep 2 --verify of the Llama-tokenizer Mixtral, no --dtype: (checkpoint, stdout)."""
    out = work / "mc"
    rc = convert(["--direction", "hf-to-mcore", "--load", str(llama_mixtral), "--save", str(out), "--ep", "2",
                  "--verify"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def exported(work, imported):
    """mcore-to-hf --verify of ``imported``, no --dtype: (folder, exit code, stdout, stderr)."""
    import contextlib
    import io

    back, out, err = work / "back", io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = convert(["--direction", "mcore-to-hf", "--load", str(imported), "--save", str(back), "--verify",
                      "--max-shard-size", "4MB"])
    return back, rc, out.getvalue(), err.getvalue()


def test_llama_mixtral_round_trips_bitwise_with_its_tokenizer_and_config(work, llama_mixtral, imported, exported):
    """Acceptance 2 + 3: HF (fp32, Llama tokenizer) -> megatron -> HF without --dtype: every tensor bit for
    bit and fp32, tokenizer files byte for byte, config.json identical to the one transformers wrote; the
    import is dropless and names its dtype."""
    meta = json.loads((imported / "iter_0000000" / "scidfm_meta.json").read_text())
    assert meta["config"]["model"]["moe_capacity_factor"] is None  # Mixtral is dropless
    assert meta["weights_only"] and meta["layout"] == {"world": 2, "tp": 1, "pp": 1, "ep": 2}
    assert meta["config"]["data"]["tokenizer_model"] == str((imported / "tokenizer" / "tokenizer.model").resolve())
    for f in TOKENIZER_FILES:
        assert (imported / "tokenizer" / f).read_bytes() == (llama_mixtral / f).read_bytes(), f

    back, rc, out, err = exported
    assert rc == 0, err[-2000:]
    assert "dtype fp32 (the source's)" in out and "Hugging Face tokenizer folder" in out
    assert "verify: PASS" in out and "logits" in out
    want, got = tensors(llama_mixtral), tensors(back)
    assert list(got) == list(want)
    for n in want:
        assert got[n].dtype == torch.float32 and torch.equal(got[n], want[n]), n
    for f in TOKENIZER_FILES:
        assert (back / f).read_bytes() == (llama_mixtral / f).read_bytes(), f
    assert json.loads((back / "config.json").read_text()) == json.loads((llama_mixtral / "config.json").read_text())

    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = "Caffeine blocks adenosine receptors; RuBisCO fixes CO2."
    assert AutoTokenizer.from_pretrained(back)(text, add_special_tokens=False)["input_ids"] == \
        spm.SentencePieceProcessor(model_file=str(BASE_MODEL)).encode(text)


def test_config_is_what_transformers_writes(exported):
    """config.json == MixtralConfig(same model).to_diff_dict() (+ architectures and dtype, as
    save_pretrained of a model adds them): no extra keys, no defaults spelled out beyond transformers'."""
    from transformers import MixtralConfig

    back = exported[0]
    got = json.loads((back / "config.json").read_text())
    want = MixtralConfig(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                         max_position_embeddings=128, architectures=["MixtralForCausalLM"],
                         dtype="float32").to_diff_dict()
    assert got == want
    side = json.loads((back / "scidfm_megatron.json").read_text())
    assert side["model"]["moe_capacity_factor"] is None and side["model"]["make_vocab_size_divisible_by"] == 128


def test_weights_only_folder_round_trips_and_says_so(capsys, work):
    """Acceptance 2 (no tokenizer): imported and exported as weights only, said on the console; nothing
    recorded that does not exist; --verify runs on pseudo-random ids."""
    src = make_mixtral(work / "mixtral_bare", tokenizer=False, seed=1)
    mc, back = work / "mc_bare", work / "back_bare"
    rc, out, err = run(capsys, "--direction", "hf-to-mcore", "--load", src, "--save", mc, "--pp", "2")
    assert rc == 0, err[-2000:]
    assert "tokenizer: none (weights-only conversion" in out
    meta = json.loads((mc / "iter_0000000" / "scidfm_meta.json").read_text())
    assert meta["config"]["data"]["tokenizer_model"] is None and meta["tokenizer"] == {"kind": "none", "dir": None}
    assert not (mc / "tokenizer").exists()
    rc, out, err = run(capsys, "--direction", "mcore-to-hf", "--load", mc, "--save", back, "--verify")
    assert rc == 0, err[-2000:]
    assert "tokenizer: none (weights-only conversion" in out and "pseudo-random token ids (no tokenizer)" in out
    assert not any((back / f).exists() for f in TOKENIZER_FILES)
    want, got = tensors(src), tensors(back)
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_verify_names_the_layer_a_conversion_bug_breaks(capsys, monkeypatch, work, llama_mixtral, imported):
    """Acceptance 1: with one tensor of layer 1 wrong in the output (a mapping bug simulated by scaling
    it), --verify fails in both directions, names layer 1, exits 1 and keeps no output."""
    from scidfm_megatron.convert import hf_to_mcore, mapping

    real_to_hf = mapping.to_hf

    def bad_to_hf(m, t, cfg):
        out = real_to_hf(m, t, cfg)
        if m.mcore == "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight":
            out = [out[0] * 3.0, out[1]]
        return out

    monkeypatch.setattr(mapping, "to_hf", bad_to_hf)
    out_dir = work / "bad_hf"
    rc, out, err = run(capsys, "--direction", "mcore-to-hf", "--load", imported, "--save", out_dir, "--verify")
    assert rc == 1, (out + err)[-2000:]
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("scidfm-convert:")]  # one line (the rest: progress bars)
    assert "layer 1 disagrees" in line and "nothing written" in line
    assert not out_dir.exists() and not list(work.glob("bad_hf.tmp*"))
    monkeypatch.undo()

    real_maker = hf_to_mcore._unit_maker

    def bad_maker(src, cfg, dtype):
        make = real_maker(src, cfg, dtype)
        return lambda name: make(name) * (1.5 if name == "decoder.layers.1.self_attention.linear_proj.weight" else 1)

    monkeypatch.setattr(hf_to_mcore, "_unit_maker", bad_maker)
    out_dir = work / "bad_mc"
    rc, out, err = run(capsys, "--direction", "hf-to-mcore", "--load", llama_mixtral, "--save", out_dir, "--verify")
    assert rc == 1, (out + err)[-2000:]
    [line] = [x for x in err.splitlines() if x.startswith("scidfm-convert:")]
    assert "layer 1 disagrees" in line and "layer 0" not in line
    assert not out_dir.exists()
    # the passing run's table: layer 0 agreed before layer 1 broke
    assert "       0 " in out


def test_refusals_are_one_line_exit_2_before_anything_is_written(capsys, work, imported):
    out_dir = work / "refused"

    def refused(*args, needle):
        rc, out, err = run(capsys, *args, "--save", out_dir)
        assert rc == 2, (out + err)[-2000:]
        assert len(err.strip().splitlines()) == 1 and needle in err, err
        assert not out_dir.exists() and not list(work.glob("refused.tmp*"))

    exp = ["--direction", "mcore-to-hf", "--load", imported]
    refused(*exp, "--tokenizer", work / "nowhere" / "tokenizer.model", needle="not found")
    refused(*exp, "--tokenizer", imported / "iter_0000000" / "metadata.json", needle="not a SentencePiece model")
    (work / "empty").mkdir(exist_ok=True)
    refused(*exp, "--tokenizer", work / "empty", needle="no tokenizer files")
    # a checkpoint that records a tokenizer which is gone
    stale = work / "stale"
    shutil.copytree(imported, stale)
    meta_file = stale / "iter_0000000" / "scidfm_meta.json"
    meta = json.loads(meta_file.read_text())
    meta.pop("tokenizer")
    meta["config"]["data"]["tokenizer_model"] = str(work / "gone" / "tokenizer.model")
    meta_file.write_text(json.dumps(meta))
    refused("--direction", "mcore-to-hf", "--load", stale, needle="does not exist")
    # a vocabulary smaller than the folder's tokenizer, refused at import
    small = make_mixtral(work / "mixtral_small_vocab", vocab=1000, seed=2)
    refused("--direction", "hf-to-mcore", "--load", small, needle="has 32000 tokens but the model's vocabulary")
