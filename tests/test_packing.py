"""Packed SFT is isolated and padding stays out of MoE (issues 11, 22), through the real data path
(SFTPacker -> .bin/.idx -> SFTDataset -> collate -> the training step's forward) at TP2, PP2, EP2 and
TP2 x PP2 (sequence parallelism with a pipeline: the padding mask carried to the later stage) with a
micro-batch of 2. One 4-rank launch runs every layout (tests/workers/packing_worker.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from scidfm_megatron.data.sft import SFTPacker, document_layout
from scidfm_megatron.testing.distributed import run_torchrun

WORKER = Path(__file__).parent / "workers" / "packing_worker.py"
LENGTHS = [11, 7, 13, 9, 13]  # packed greedily into 2 sequences of <= 33 tokens: [11, 7, 13] and [9, 13]
SEQ = 32


def test_document_layout():
    doc, pos = document_layout([3, 2], 7)
    assert doc.tolist() == [0, 0, 0, 1, 1, -1, -1]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 1]
    doc, pos = document_layout([5, 9], 7)  # the last conversation cut by the sequence end
    assert doc.tolist() == [0] * 5 + [1] * 2 and pos.tolist() == [0, 1, 2, 3, 4, 0, 1]


@pytest.fixture(scope="module")
def packing_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("packing")
    pk = SFTPacker(str(d / "sft"), SEQ, np.uint16)
    flat = np.random.default_rng(3).integers(1, 500, sum(LENGTHS))
    pk.add_documents(flat, np.array(LENGTHS), np.ones(sum(LENGTHS), dtype=np.uint8))
    pk.finalize()
    assert pk.stats()["sequences"] == 2
    run_torchrun(WORKER, 4, ["--layouts", "tp2,pp2,ep2,tp2pp2", "--sft-prefix", d / "sft", "--seq-length", SEQ,
                             "--conv-lengths", json.dumps(LENGTHS), "--out", d / "report.json"], timeout=600)
    return json.loads((d / "report.json").read_text())


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2", "tp2pp2"])
def test_packed_conversations_equal_alone(packing_report, layout):
    """Within 1e-5 (measured: 5e-7 or less, fp32); the second packed sequence ends in padding, so at
    TP2 x PP2 the later stage routes with the padding mask scattered to its sequence shard."""
    r = packing_report[layout]
    assert r["max_diff_loss"] <= 1e-5 and r["max_diff_logits"] <= 1e-5, r
    # negative control in the same run: without the document ids the conversations see each other
    assert r["max_diff_loss_unisolated"] > 1e-2, r


def test_rotary_rows_restart_per_conversation(packing_report):
    """The rotary rows every packed conversation gets are, bitwise, the rows it gets alone; the rows by
    sequence index (what megatron's RoPE would use) differ, so the check sees a missing gather."""
    r = packing_report["tp2"]
    assert r["rotary_rows_diff"] == 0.0 and r["rotary_rows_by_index_diff"] > 1e-3, r


@pytest.mark.parametrize("layout", ["ep2", "tp2"])
@pytest.mark.parametrize("routing", ["cf1", "dropless"])
def test_padding_stays_out_of_moe(packing_report, routing, layout):
    """Padding changes no real token's loss, tokens per expert, routed-token count or aux loss, dropless
    and with capacity factor 1.0. At TP2 (sequence parallelism: each TP rank routes its share of the
    sequence, and padding moves real tokens between the shares) the capacity is decided over the whole
    micro-batch's real tokens (model/packing.py, _drop_over_sequence); the unpadded batch is an SFT batch
    without padding (all-False padding mask), statistics summed over the TP group."""
    r = packing_report[layout]
    for what in ("loss", "tokens_per_expert", "aux", "num_tokens"):
        assert r[f"pad_{routing}_{what}"] <= 1e-6, (what, r)
    assert r[f"pad_{routing}_aux_value"] > 0
    if routing == "cf1":
        assert r["pad_cf1_dropped"] > 0, "capacity 1.0 dropped nothing: the capacity was never exercised"


def test_aux_coefficient_per_routed_real_token(packing_report):
    """The aux term's router gradient in SFT (per-token loss over a third of the real tokens, padded)
    equals the pretraining mode's (mean loss, no padding): 0.02 per routed real token."""
    r = packing_report["ep2"]
    assert r["aux_grad_scale"] > 1e-4
    assert r["aux_grad_sft_few_vs_pretrain"] <= 1e-3 * r["aux_grad_scale"], r
    assert r["aux_grad_sft_all_vs_pretrain"] <= 1e-3 * r["aux_grad_scale"], r
