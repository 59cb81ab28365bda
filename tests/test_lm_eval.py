"""lm-eval runs offline on a converted (tiny, random) SciDFM checkpoint with the local task (issue 6, acceptance 5).

The stand-in checkpoint is what the converter writes: a ``MixtralForCausalLM`` folder plus the SciDFM
tokenizer files (custom code, loaded with ``trust_remote_code=True``). lm-eval's scores are checked
against log-likelihoods computed here directly with transformers, with the task's prompt format.
"""

import json
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate")
pytest.importorskip("lm_eval")

from scidfm_megatron.eval.lm_eval_local import TASK, run_lm_eval

QUESTIONS = [
    {"question": "What is the chemical symbol for sodium?", "choices": ["Na", "So", "Sd", "N"], "answer": 0},
    {"question": "Which organelle produces most of a cell's ATP?",
     "choices": ["Nucleus", "Ribosome", "Mitochondrion", "Golgi apparatus"], "answer": 2},
    {"question": "Which molecule is ethanol?",
     "choices": ["[START_I_SMILES]CCO[END_I_SMILES]", "[START_I_SMILES]CC=O[END_I_SMILES]",
                 "[START_I_SMILES]C=C[END_I_SMILES]"], "answer": 0},
    {"question": "Which amino acid is encoded by the start codon AUG?",
     "choices": ["Glycine", "Methionine", "Leucine", "Proline"], "answer": 1},
    {"question": "What is the SI unit of force?", "choices": ["Joule", "Watt", "Pascal", "Newton"], "answer": 3},
    {"question": "Is water (H2O) polar?", "choices": ["yes", "no"], "answer": 0},
]


@pytest.fixture(scope="module")
def tiny_hf_model(science_tokenizer_dir, tmp_path_factory):
    """A random 2-layer, 8-expert Mixtral with the science tokenizer, saved as the converter saves it."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(science_tokenizer_dir, trust_remote_code=True)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "model"
    MixtralForCausalLM(cfg).save_pretrained(out)
    for f in science_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def offline(monkeypatch):
    """Offline switches for this test only (run_lm_eval would set them for the rest of the session)."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def _direct_loglikelihoods(model_dir, docs):
    """Sum of log P(" " + choice | "Question: <q>\\nAnswer:") per choice, straight from transformers.

    Tokenisation as a causal LM is scored: the whole text (BOS + context + continuation) is encoded and
    the continuation is what follows the context's tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    assert type(tok).__name__ == "SciDFMTokenizer"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        ctx = tok(context)["input_ids"]
        lls = []
        for choice in doc["choices"]:
            whole = tok(context + " " + choice)["input_ids"]
            assert whole[:len(ctx)] == ctx and len(whole) > len(ctx)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        out.append(lls)
    return out


def test_lm_eval_offline_local_task_matches_direct_scoring(tiny_hf_model, tmp_path, offline):
    import numpy as np

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")

    res = run_lm_eval(str(tiny_hf_model), str(data), batch_size=4)
    assert res["task"] == TASK and res["n"] == len(QUESTIONS) == len(res["samples"])
    assert 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
    assert res["raw"]["acc,none"] == res["acc"]

    # deterministic: a second run scores every choice the same
    again = run_lm_eval(str(tiny_hf_model), str(data), batch_size=4)
    assert again["acc"] == res["acc"] and again["acc_norm"] == res["acc_norm"]
    np.testing.assert_allclose([ll for s in again["samples"] for ll in s["loglikelihoods"]],
                               [ll for s in res["samples"] for ll in s["loglikelihoods"]], rtol=0, atol=1e-5)

    # independent scoring with transformers: same log-likelihoods per choice, hence the same acc / acc_norm
    # (this fails if lm-eval tokenised differently, e.g. with the generic tokenizer transformers falls back
    # to without trust_remote_code, or if the prompt or target delimiter of the task changed)
    direct = _direct_loglikelihoods(tiny_hf_model, QUESTIONS)
    for doc, sample, lls in zip(QUESTIONS, res["samples"], direct, strict=False):
        assert sample["answer"] == doc["answer"]
        np.testing.assert_allclose(sample["loglikelihoods"], lls, rtol=0, atol=1e-4)
    acc = np.mean([int(np.argmax(lls)) == d["answer"] for d, lls in zip(QUESTIONS, direct, strict=False)])
    acc_norm = np.mean([int(np.argmax(np.array(lls) / [len(c) for c in d["choices"]])) == d["answer"]
                        for d, lls in zip(QUESTIONS, direct, strict=False)])
    assert res["acc"] == pytest.approx(acc) and res["acc_norm"] == pytest.approx(acc_norm)

    # limit scores the first N questions only
    assert run_lm_eval(str(tiny_hf_model), str(data), limit=2, batch_size=4)["n"] == 2
