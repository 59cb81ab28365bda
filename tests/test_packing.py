"""Packed SFT is isolated and padding stays out of MoE (issues 11, 22), through the real data path
(SFTPacker -> .bin/.idx -> SFTDataset -> collate -> the training step's forward) at TP2, PP2, EP2 and
TP2 x PP2 (sequence parallelism with a pipeline: the padding mask carried to the later stage) with a
micro-batch of 2. One run of ``packing_rank`` on 4 forked gloo ranks checks every layout."""

import numpy as np
import pytest
import torch

from scidfm_megatron.data.sft import SFTPacker, document_layout
from scidfm_megatron.testing.fork import run_distributed

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
    return run_distributed(packing_rank, 4, ["tp2", "pp2", "ep2", "tp2pp2"], d / "sft", SEQ, LENGTHS, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2", "tp2pp2"])
def test_packed_conversations_equal_alone(packing_report, layout):
    """Within 1e-5 (measured: 5e-7 or less, fp32); the second packed sequence ends in padding, so at
    TP2 x PP2 the later stage routes with the padding mask scattered to its sequence shard."""
    r = packing_report[layout]
    assert r["max_diff_loss"] <= 1e-5 and r["max_diff_logits"] <= 1e-5, r
    # negative control in the same run: without the document ids the conversations see each other
    assert r["max_diff_loss_unisolated"] > 1e-2, r


@pytest.mark.distributed
def test_rotary_rows_restart_per_conversation(packing_report):
    """The rotary rows every packed conversation gets are, bitwise, the rows it gets alone; the rows by
    sequence index (what megatron's RoPE would use) differ, so the check sees a missing gather."""
    r = packing_report["tp2"]
    assert r["rotary_rows_diff"] == 0.0 and r["rotary_rows_by_index_diff"] > 1e-3, r


@pytest.mark.distributed
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


@pytest.mark.distributed
def test_aux_coefficient_per_routed_real_token(packing_report):
    """The aux term's router gradient in SFT (per-token loss over a third of the real tokens, padded)
    equals the pretraining mode's (mean loss, no padding): 0.02 per routed real token."""
    r = packing_report["ep2"]
    assert r["aux_grad_scale"] > 1e-4
    assert r["aux_grad_sft_few_vs_pretrain"] <= 1e-3 * r["aux_grad_scale"], r
    assert r["aux_grad_sft_all_vs_pretrain"] <= 1e-3 * r["aux_grad_scale"], r


# ------------------------------------------------------------------ the ranks (forked by run_distributed)
def layout_of(name):
    import re

    from scidfm_megatron.config import ParallelConfig

    deg = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", name)}  # "tp2pp2" -> tp=2, pp=2
    return ParallelConfig(tp=deg.get("tp", 1), pp=deg.get("pp", 1), ep=deg.get("ep", 1))


class RotaryRows:
    """Records the rotary table rows the model's _preprocess hands to attention ([s, b, 1, d])."""

    def __init__(self, chunks):
        self.rows, self.saved = [], []
        for c in chunks:
            m = c.module if hasattr(c, "module") else c
            orig = m._preprocess

            def hooked(*a, _orig=orig, **k):
                out = _orig(*a, **k)
                self.rows.append(out[1].detach().clone())
                return out
            m._preprocess = hooked
            self.saved.append((m, orig))

    def close(self):
        for m, orig in self.saved:
            m._preprocess = orig


def packing_rank(rank, world_size, layouts, sft_prefix, seq_length, conv_lengths):
    """One rank of the packing check (rank 0 returns the report). For each layout in ``layouts``
    (re-initialising megatron's groups in the same processes):

    * contamination: the SFT sequences in ``sft_prefix`` (conversations packed by SFTPacker, read by
      SFTDataset, collated into one micro-batch of 2) run through the training step's forward path; every
      conversation's per-token losses and logits are compared with the same conversation run alone (its own
      sequence, no mask, no padding). Also the same packed batch without document ids and with running
      positions (isolation off: the negative control), which must differ.
    * padding (layouts without PP): a batch of 2 unpadded sequences vs the same batch padded to twice the
      length (document ids 0 / -1), with capacity factor 1.0 and dropless routing: real tokens' losses,
      tokens per expert and the aux loss of every layer.
    * aux normalisation (layouts without TP/PP): the aux loss's contribution to the router gradients in SFT
      mode (per-token loss over assistant tokens, padding) equals its contribution with every token in the
      loss, and equals the pretraining mode's (mean loss), so the coefficient is 0.02 per routed real token.
    The report holds the largest differences per layout. ``conv_lengths``: the packed conversations'
    lengths, in order."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from scidfm_megatron.data.sft import SFTDataset
    from scidfm_megatron.model.builder import build_model_chunks
    from scidfm_megatron.model.presets import get_preset
    from scidfm_megatron.model.routing import RouterRecorder
    from scidfm_megatron.parallel import init_distributed
    from scidfm_megatron.training.data import _collate
    from scidfm_megatron.training.engine import build_optimizer, wrap_ddp
    from scidfm_megatron.training.step import forward_step, train_step

    S = seq_length
    ds = SFTDataset(str(sft_prefix), S, pad_id=0)
    packed = _collate([ds[0], ds[1]])
    flat = torch.cat([torch.from_numpy(ds.tokens[i].astype("int64")) for i in (0, 1)])
    lens = list(conv_lengths)
    convs, where, off = [], [], 0  # where: (sample, start) of each conversation in the packed batch
    sample, start = 0, 0
    for n in lens:
        if start + n > len(ds.tokens[sample]):
            sample, start = sample + 1, 0
        convs.append(flat[off:off + n])
        where.append((sample, start))
        off, start = off + n, start + n

    def run(chunks, batches, seq, mbs, with_labels):
        """Forward-only through megatron's schedule; the last stage's per-token losses / logits."""
        def fs(it, model):
            out, _ = forward_step(it, model)
            return out, lambda o: (o.float().sum(), torch.tensor(1), {"out": o.detach().float().clone()})

        def fs_logits(it, model):
            b = next(it)
            from scidfm_megatron.model.packing import document_attention_mask
            doc = b.get("document_ids")
            o = model(b["tokens"], b["position_ids"], None if doc is None else document_attention_mask(doc),
                      padding_mask=None if doc is None else doc < 0)
            return o, lambda o: (o.float().sum(), torch.tensor(1), {"out": o.detach().float().clone()})

        its = [iter(list(batches)) for _ in chunks]
        res = get_forward_backward_func()(forward_step_func=fs if with_labels else fs_logits,
                                          data_iterator=its if len(chunks) > 1 else its[0], model=chunks,
                                          num_microbatches=len(batches), seq_length=seq, micro_batch_size=mbs,
                                          forward_only=True)
        return [r["out"] for r in res]

    def alone(c):
        n = len(c) - 1
        return dict(tokens=c[:-1][None], labels=c[1:][None], loss_mask=torch.ones(1, n),
                    position_ids=torch.arange(n)[None])

    report = {}
    for name in layouts:
        par = layout_of(name)
        model_cfg = get_preset("scidfm-debug", moe_capacity_factor=None)
        init_distributed(model_cfg, par, seed=1234)
        chunks = build_model_chunks(model_cfg, par, precision="fp32")
        for c in chunks:
            c.eval()
        r = {}
        unisolated = dict(packed, position_ids=torch.arange(S).expand(2, S).contiguous())
        unisolated.pop("document_ids")
        with torch.no_grad():
            for with_labels, key, batch in ((True, "loss", packed), (False, "logits", packed),
                                            (True, "loss_unisolated", unisolated)):
                got = run(chunks, [batch], S, 2, with_labels)
                diff = torch.zeros(())
                for k, c in enumerate(convs):
                    ref = run(chunks, [alone(c)], len(c) - 1, 1, with_labels)
                    if got:  # last pipeline stage
                        smp, st = where[k]
                        n = len(c) - 1
                        g = got[0][smp, st:st + n]
                        diff = torch.maximum(diff, (g - ref[0][0]).abs().max())
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                r[f"max_diff_{key}"] = float(diff)

        if par.pp == 1:
            r.update(padding(model_cfg, par, chunks, RouterRecorder, clear_aux_losses_tracker,
                             get_moe_layer_wise_logging_tracker))
        if par.pp == 1 and par.tp == 1:
            r.update(aux_normalisation(model_cfg, par, wrap_ddp, build_optimizer, train_step))
        if name == layouts[0]:
            r.update(rotary_rows(chunks, run, packed, convs, where, alone, S))
        report[name] = r
        del chunks
        ps.destroy_model_parallel()
    return report if rank == 0 else None


def rotary_rows(chunks, run, packed, convs, where, alone, S):
    """The rotary rows each conversation of the packed batch gets are the rows it gets alone (positions
    restart per conversation), compared directly: a model that rotated by the index in the sequence would
    give a conversation at offset st the rows st.., which relative attention scores partly hide."""
    import torch.distributed as dist

    rec = RotaryRows(chunks)
    try:
        run(chunks, [packed], S, 2, False)
        got = rec.rows[0]  # [s, b, 1, d] of the first chunk
        diff, moved = torch.zeros(()), torch.zeros(())
        for c, (smp, st) in zip(convs, where, strict=False):
            n = len(c) - 1
            rec.rows.clear()
            run(chunks, [alone(c)], n, 1, False)
            lone = rec.rows[0][:n, 0]
            diff = torch.maximum(diff, (got[st:st + n, smp] - lone).abs().max())
            if st > 0:  # the rows by sequence index differ: the check can see a missing gather
                moved = torch.maximum(moved, (got[0:n, 0] - got[st:st + n, 0]).abs().max()
                                      if smp == 0 else moved)
    finally:
        rec.close()
    d = torch.stack([diff, moved])
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return {"rotary_rows_diff": float(d[0]), "rotary_rows_by_index_diff": float(d[1])}


def padding(model_cfg, par, chunks, RouterRecorder, clear_tracker, tracker):
    """Unpadded [2, L] vs padded [2, 2L]: real tokens' losses, tokens per expert, aux loss per layer.
    At TP > 1 (sequence parallelism: each TP rank routes its share of the sequence) the unpadded batch is
    an SFT batch without padding (document ids 0, an all-False padding mask) and the per-rank statistics
    are summed over the TP group before they are compared."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from scidfm_megatron.model.packing import document_attention_mask

    tp_group = ps.get_tensor_model_parallel_group() if par.tp > 1 else None

    g = torch.Generator().manual_seed(11)
    L = 16
    tok = torch.randint(0, model_cfg.vocab_size, (2, L + 1), generator=g)
    model = chunks[0]
    model.train()
    out = {}
    for capacity in (1.0, None):
        model.config.moe_expert_capacity_factor = capacity
        res = []
        for padded in (False, True):
            t, lab = tok[:, :-1], tok[:, 1:]
            pos = torch.arange(L).expand(2, L)
            kw = {}
            if tp_group is not None:
                doc = torch.zeros(2, L, dtype=torch.long)
                kw = dict(attention_mask=document_attention_mask(doc), padding_mask=doc < 0)
            if padded:
                z = torch.zeros(2, L, dtype=torch.long)
                t, lab = torch.cat([t, z], 1), torch.cat([lab, z], 1)
                pos = torch.cat([pos, torch.arange(L).expand(2, L)], 1)
                doc = torch.cat([torch.zeros(2, L, dtype=torch.long), -torch.ones(2, L, dtype=torch.long)], 1)
                kw = dict(attention_mask=document_attention_mask(doc), padding_mask=doc < 0)
            clear_tracker()
            with RouterRecorder(chunks) as rec:
                loss = model(t, pos, kw.pop("attention_mask", None), labels=lab, **kw)
            aux = tracker()["load_balancing_loss"]["values"].clone()
            tpe = torch.stack([c.tokens_per_expert for c in rec.calls]).float()
            n_tok = torch.tensor([float(c.num_tokens) for c in rec.calls])
            if tp_group is not None:
                for x in (tpe, aux, n_tok):
                    dist.all_reduce(x, group=tp_group)
            res.append((loss[:, :L].detach(), tpe, aux, n_tok))
        (l0, t0, a0, n0), (l1, t1, a1, n1) = res
        tag = "cf1" if capacity else "dropless"
        d = torch.stack([(l0 - l1).abs().max(), (t0 - t1).abs().max(), (a0 - a1).abs().max(), (n0 - n1).abs().max()])
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        out.update({f"pad_{tag}_loss": float(d[0]), f"pad_{tag}_tokens_per_expert": float(d[1]),
                    f"pad_{tag}_aux": float(d[2]), f"pad_{tag}_num_tokens": float(d[3]),
                    f"pad_{tag}_aux_value": float(a0.sum()),
                    f"pad_{tag}_dropped": float(n0.sum() * model_cfg.moe_router_topk - t0.sum())})
    model.config.moe_expert_capacity_factor = None
    model.eval()
    return out


def aux_normalisation(model_cfg, par, wrap_ddp, build_optimizer, train_step):
    """Router-weight gradient of the aux term alone (coefficient 0.02 minus coefficient 0), for
    (a) SFT: per-token loss over a third of the tokens, padding; (b) SFT, every real token in the loss;
    (c) pretraining mode (mean loss), same tokens, no padding. All three must agree."""
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe.router import TopKRouter

    from scidfm_megatron.model.builder import build_model_chunks

    g = torch.Generator().manual_seed(5)
    L = 16
    tok = torch.randint(0, model_cfg.vocab_size, (2, L + 1), generator=g)
    z = torch.zeros(2, L, dtype=torch.long)
    doc = torch.cat([torch.zeros(2, L, dtype=torch.long), -torch.ones(2, L, dtype=torch.long)], 1)
    few = torch.zeros(2, 2 * L)
    few[:, :L:3] = 1

    def batch(loss_mask, padded):
        t, lab = tok[:, :-1], tok[:, 1:]
        if not padded:
            return dict(tokens=t, labels=lab, loss_mask=torch.ones(2, L), position_ids=torch.arange(L).expand(2, L))
        return dict(tokens=torch.cat([t, z], 1), labels=torch.cat([lab, z], 1), loss_mask=loss_mask,
                    position_ids=torch.cat([torch.arange(L), torch.arange(L)]).expand(2, 2 * L).contiguous(),
                    document_ids=doc)

    every = torch.cat([torch.ones(2, L), torch.zeros(2, L)], 1)
    grads = {}
    for case, per_token, b in (("sft_few", True, batch(few, True)), ("sft_all", True, batch(every, True)),
                               ("pretrain", False, batch(None, False))):
        got = []
        for coeff in (0.02, 0.0):
            cfg = get_preset_copy(model_cfg, coeff)
            torch.manual_seed(1234)
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
            chunks = build_model_chunks(cfg, par, precision="fp32", calculate_per_token_loss=per_token)
            config = chunks[0].config
            chunks = wrap_ddp(chunks, config)
            opt = build_optimizer(chunks, config, lr=1e-3)
            train_step(chunks, opt, [b], seq_length=b["tokens"].shape[1], micro_batch_size=2, step_optimizer=False)
            got.append(torch.cat([m.weight.main_grad.flatten() for m in chunks[0].modules()
                                  if isinstance(m, TopKRouter)]))
        grads[case] = got[0] - got[1]
    ref = grads["pretrain"]
    d = torch.stack([(grads["sft_few"] - ref).abs().max(), (grads["sft_all"] - ref).abs().max(), ref.abs().max()])
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return {"aux_grad_sft_few_vs_pretrain": float(d[0]), "aux_grad_sft_all_vs_pretrain": float(d[1]),
            "aux_grad_scale": float(d[2])}


def get_preset_copy(model_cfg, coeff):
    import dataclasses

    return dataclasses.replace(model_cfg, moe_aux_loss_coeff=coeff)
