"""Checkpoint conversion (issue 5): logit parity, bitwise round trips, tokenizer, corrupt inputs."""

import json
import shutil
import struct
import subprocess

import pytest
import torch

from conftest import ROOT, sample_documents
from scidfm_megatron.testing.distributed import cpu_env
from scidfm_megatron.testing.runs import console_script

CLI = console_script("scidfm-convert")


def cli(*args):
    return subprocess.run([*CLI, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=cpu_env(),
                          timeout=600)


def cli_here(capsys, *args) -> subprocess.CompletedProcess:
    """The same CLI called in this process (no interpreter start-up and imports per call)."""
    from scidfm_megatron.cli.convert import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def hf_tensors(d):
    from scidfm_megatron.convert.hf_io import HFCheckpoint

    ck = HFCheckpoint(d)
    return {n: ck.get(n) for n in sorted(ck.location)}


@pytest.fixture(scope="module")
def prompt_ids(science_tokenizer):
    doc = next(d for d in sample_documents() if "[START_I_SMILES]" in d)
    return science_tokenizer.encode(doc, bos=True)[:40]


def test_logits_and_greedy_tokens_match_megatron(trained_tiny, hf_tiny, prompt_ids):
    """Saved at TP2 x PP2 x EP2, converted: transformers (no trust_remote_code) gives megatron's logits
    (fp32, dropless routing in both) and the same 20 greedy tokens."""
    from transformers import AutoModelForCausalLM

    from scidfm_megatron.inference import MegatronLM

    meta = json.loads((next(trained_tiny.glob("iter_*")) / "scidfm_meta.json").read_text())
    assert meta["layout"] == {"world": 8, "tp": 2, "pp": 2, "ep": 2}
    hf = AutoModelForCausalLM.from_pretrained(hf_tiny, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    lm = MegatronLM(trained_tiny)
    try:
        ids = torch.tensor([prompt_ids, prompt_ids[::-1]])
        want = lm.logits(ids)
        with torch.no_grad():
            got = hf(ids).logits
        assert got.shape == want.shape == (2, len(prompt_ids), lm.vocab_size)
        assert (got - want).abs().max().item() <= 1e-4
        assert (want[:, 1:] - want[:, :-1]).abs().max() > 0.1  # logits that depend on the input
        mine = lm.generate_greedy(prompt_ids[:12], 20)
    finally:
        lm.close()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt_ids[:12]]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
    assert mine == theirs and len(mine) == 20


def test_round_trip_through_two_layouts_is_bitwise(hf_tiny, tmp_path, capsys):
    """HF -> megatron for TP2 x EP2 and for PP2 -> HF, no --dtype: every tensor bit for bit (fp32 stays
    fp32), the same config.json and scidfm_megatron.json (model config incl. capacity factor)."""
    want = hf_tensors(hf_tiny)
    for name, layout in (("tp2ep2", ["--tp", 2, "--ep", 2]), ("pp2", ["--pp", 2])):
        mc, back = tmp_path / f"mc_{name}", tmp_path / f"hf_{name}"
        r = cli_here(capsys, "--direction", "hf-to-mcore", "--load", hf_tiny, "--save", mc, *layout)
        assert r.returncode == 0, r.stderr[-3000:]
        meta = json.loads((mc / "iter_0000000" / "scidfm_meta.json").read_text())
        assert meta["weights_only"] and meta["layout"]["world"] == 4 // (2 if name == "pp2" else 1)
        r = cli_here(capsys, "--direction", "mcore-to-hf", "--load", mc, "--save", back, "--max-shard-size", "5MB")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "dtype fp32 (the source's)" in r.stdout
        got = hf_tensors(back)
        assert list(got) == list(want)
        for n in want:
            assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
        assert json.loads((back / "config.json").read_text()) == json.loads((hf_tiny / "config.json").read_text())
        a, b = (json.loads((d / "scidfm_megatron.json").read_text())["model"] for d in (hf_tiny, back))
        assert a == b and a["moe_capacity_factor"] == 1.0  # the run's, kept (not Mixtral's dropless default)


# HF -> megatron (EP2) as a starting point for training is tests/test_bf16.py::
# test_hf_import_keeps_its_weights_in_bf16 (the precision real runs use: several steps from the imported
# weights at LR ~0 stay at the trained loss).


def test_bf16_output_verified(trained_tiny, hf_tiny, tmp_path):
    """--dtype bf16 from the fp32 run (saved at TP2 x PP2 x EP2) with --verify: the bf16 folder equals the
    fp32 conversion cast to bf16, and transformers in bf16 agrees with megatron in bf16 layer by layer."""
    out = tmp_path / "bf16"
    r = cli("--direction", "mcore-to-hf", "--load", trained_tiny, "--save", out, "--dtype", "bf16", "--verify")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "dtype bf16 (--dtype)" in r.stdout and "science tokenizer" in r.stdout
    assert "2 x 64 tokens of the built-in science paragraph, bf16" in r.stdout and "verify: PASS" in r.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["head_dim"] == 32 and cfg["num_local_experts"] == 8 and cfg["tie_word_embeddings"] is False
    got, want = hf_tensors(out), hf_tensors(hf_tiny)
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n].to(torch.bfloat16)) for n in want)
    gen = json.loads((out / "generation_config.json").read_text())
    eod = json.loads((out / "science_tokens.json").read_text())["specials"]["<|eod|>"]
    assert gen["eos_token_id"] == [2, eod] and gen["bos_token_id"] == 1  # </s>, and <|eod|> ends documents


def test_converted_tokenizer_matches_and_renders_chat(hf_tiny, science_tokenizer):
    from transformers import AutoTokenizer

    from scidfm_megatron.tokenizer.core import encode_chat

    tok = AutoTokenizer.from_pretrained(hf_tiny, trust_remote_code=True)
    docs = sample_documents()
    assert any("[START_AMINO]" in d for d in docs) and any("[START_I_SMILES]" in d for d in docs)
    for d in docs:
        assert tok(d)["input_ids"] == science_tokenizer.encode(d, allow_special=True, bos=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "SMILES of ethanol?"},
            {"role": "assistant", "content": "[START_I_SMILES]CCO[END_I_SMILES]"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<s><|system|>Be brief.\n<|user|>SMILES of ethanol?\n"
                    "<|assistant|>[START_I_SMILES]CCO[END_I_SMILES]</s>\n")
    assert (tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
            == encode_chat(science_tokenizer, msgs)[0])


# ------------------------------------------------------------------------------------ corrupt inputs
def _mcore_copy(trained_tiny, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(trained_tiny, src)
    return src, next(src.glob("iter_*"))


def _hf_copy(hf_tiny, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_tiny, src)
    return src, sorted(src.glob("model-*.safetensors"))


def _fails(capsys, args, out, *needles):
    r = cli_here(capsys, *args, "--save", out)
    assert r.returncode == 2, (r.stdout + r.stderr)[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-2000:])
    assert not out.exists() and not list(out.parent.glob(out.name + ".tmp*")), "output written after a failure"


def test_corrupt_megatron_checkpoint_is_named_and_nothing_written(trained_tiny, tmp_path, capsys):
    out = tmp_path / "out"
    src, it = _mcore_copy(trained_tiny, tmp_path)
    shard = sorted(it.glob("*.distcp"))[3]
    shard.unlink()
    _fails(capsys, ["--direction", "mcore-to-hf", "--load", src], out, shard.name, "missing checkpoint shard")
    src, it = _mcore_copy(trained_tiny, tmp_path / "t")
    shard = sorted(it.glob("*.distcp"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _fails(capsys, ["--direction", "mcore-to-hf", "--load", src], out, shard.name, "truncated")
    src, it = _mcore_copy(trained_tiny, tmp_path / "m")
    (it / "scidfm_meta.json").unlink()
    _fails(capsys, ["--direction", "mcore-to-hf", "--load", src], out, "no complete megatron checkpoint")


def test_corrupt_hf_checkpoint_is_named_and_nothing_written(hf_tiny, tmp_path, capsys):
    out = tmp_path / "out"
    src, shards = _hf_copy(hf_tiny, tmp_path / "a")
    shards[1].unlink()
    _fails(capsys, ["--direction", "hf-to-mcore", "--load", src], out, shards[1].name, "missing shard")

    src, shards = _hf_copy(hf_tiny, tmp_path / "b")
    f = shards[-1]
    f.write_bytes(f.read_bytes()[:-1000])
    _fails(capsys, ["--direction", "hf-to-mcore", "--load", src], out, f.name, "truncated")

    # A renamed tensor: rewrite one file's header (same length) and its index entry.
    src, shards = _hf_copy(hf_tiny, tmp_path / "c")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    f = src / index["weight_map"][victim]
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    renamed = victim.replace("w2", "wX")
    f.write_bytes(raw[:8] + raw[8:8 + n].replace(victim.encode(), renamed.encode()) + raw[8 + n:])
    index["weight_map"][renamed] = index["weight_map"].pop(victim)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(capsys, ["--direction", "hf-to-mcore", "--load", src], out, victim)

    # A shape that disagrees with config.json.
    src, _ = _hf_copy(hf_tiny, tmp_path / "d")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["--direction", "hf-to-mcore", "--load", src], out, "w1.weight has shape", "config.json implies")


def test_release_style_config_maps_to_the_18b_preset():
    """The public release's config.json uses Mixtral's keys (architecture SciDFMForCausalLM)."""
    from scidfm_megatron.convert.mapping import model_config_from_hf
    from scidfm_megatron.model.presets import get_preset

    release = {"architectures": ["SciDFMForCausalLM"], "hidden_size": 3200, "intermediate_size": 8640,
               "num_hidden_layers": 26, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 100,
               "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32196, "rope_theta": 10000.0,
               "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 8192,
               "router_aux_loss_coef": 0.02, "hidden_act": "silu"}
    got = model_config_from_hf(release)
    want = get_preset("scidfm-18b")
    fields = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
              "moe_ffn_hidden_size", "num_experts", "moe_router_topk", "vocab_size", "max_seq_length", "rope_theta",
              "rms_norm_eps", "untie_embeddings", "moe_aux_loss_coeff")
    assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}


def test_fused_expert_layout_is_read_as_per_expert(hf_tiny, tmp_path):
    """transformers' in-memory fused experts (gate_up_proj / down_proj) on disk read as w1 / w3 / w2."""
    from safetensors.torch import save_file

    from scidfm_megatron.convert.hf_io import HFCheckpoint
    from scidfm_megatron.convert.hf_to_mcore import HFTensors, check_hf_tensors
    from scidfm_megatron.convert.mapping import model_config_from_hf

    want = hf_tensors(hf_tiny)
    cfg = model_config_from_hf(json.loads((hf_tiny / "config.json").read_text()))
    fused = {}
    for n, t in want.items():
        if ".experts." not in n:
            fused[n.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t
    for layer in range(cfg.num_layers):
        e = lambda i, w: want[f"model.layers.{layer}.block_sparse_moe.experts.{i}.{w}.weight"]  # noqa: E731, B023  used in this iteration only
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e(i, "w1"), e(i, "w3")]) for i in range(cfg.num_experts)])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([e(i, "w2") for i in range(cfg.num_experts)])
    d = tmp_path / "fused"
    d.mkdir()
    shutil.copyfile(hf_tiny / "config.json", d / "config.json")
    save_file(fused, d / "model.safetensors")
    ck = HFCheckpoint(d)
    check_hf_tensors(ck, cfg)
    src = HFTensors(ck, cfg)
    assert src.names() == set(want)
    for n in want:
        assert torch.equal(src.get(n), want[n]), n
