"""Configs, presets, overrides and the up-front validation of parallel degrees (acceptance 5)."""

import subprocess
import sys

import pytest

from scidfm_megatron.config import ConfigError, ModelConfig, ParallelConfig, apply_overrides, from_dict, to_dict
from scidfm_megatron.model.presets import PRESETS, get_preset
from scidfm_megatron.parallel import ParallelConfigError, validate_layout


def test_scidfm_18b_is_exactly_the_release_architecture():
    c = get_preset("scidfm-18b")
    assert ((c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.head_dim)
            == (26, 3200, 32, 32, 100))
    assert (c.moe_ffn_hidden_size, c.num_experts, c.moe_router_topk) == (8640, 8, 2)
    assert (c.vocab_size, c.max_seq_length, c.rope_theta, c.rms_norm_eps) == (32196, 8192, 1e4, 1e-6)
    assert c.untie_embeddings and c.moe_aux_loss_coeff == 0.02 and c.moe_capacity_factor == 1.0
    assert c.padded_vocab_size == 32256 and c.padded_vocab_size % 8 == 0


def test_transformer_config_adapter_carries_every_field():
    from scidfm_megatron.model.builder import to_transformer_config

    c = get_preset("scidfm-18b")
    tc = to_transformer_config(c, ParallelConfig(tp=2, ep=2), precision="bf16")
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.kv_channels) == (26, 3200, 32, 100)
    assert tc.num_query_groups == 32 and tc.ffn_hidden_size == tc.moe_ffn_hidden_size == 8640
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-6 and tc.gated_linear_unit
    assert not tc.add_bias_linear and tc.num_moe_experts == 8 and tc.moe_router_topk == 2
    assert not tc.moe_router_pre_softmax  # Mixtral: softmax over the top-k logits
    assert tc.moe_aux_loss_coeff == 0.02 and tc.moe_expert_capacity_factor == 1.0
    assert tc.moe_router_load_balancing_type == "aux_loss" and tc.sequence_parallel  # MoE + TP>1
    assert tc.bf16 and tc.tensor_model_parallel_size == 2 and tc.expert_model_parallel_size == 2
    dropless = to_transformer_config(get_preset("scidfm-debug", moe_capacity_factor=None), ParallelConfig())
    assert dropless.moe_expert_capacity_factor is None and not dropless.sequence_parallel


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown model preset 'scidfm-7b'.*scidfm-18b"):
        get_preset("scidfm-7b")


@pytest.mark.parametrize("par,world,match", [
    (ParallelConfig(tp=3), 3, r"TP=3 must divide model.num_attention_heads=32: choose parallel.tp"),
    (ParallelConfig(ep=3), 3, r"EP=3 must divide model.num_experts=8: choose parallel.ep"),
    (ParallelConfig(tp=2, pp=2), 6, r"TP\*PP=4 must divide world size=6: launch a multiple of 4 processes"),
    (ParallelConfig(ep=4, tp=2), 4, r"ETP\*EP\*PP=8 must divide world size=4"),
    (ParallelConfig(pp=4), 4, r"PP=4 must divide model.num_layers=26: choose parallel.pp"),
    (ParallelConfig(tp=2, sequence_parallel=False), 2, r"requires sequence parallelism"),
    (ParallelConfig(tp=0), 1, r"parallel.tp must be an integer >= 1"),
])
def test_bad_layouts_name_the_degree_and_the_fix(par, world, match):
    with pytest.raises(ParallelConfigError, match=match):
        validate_layout(get_preset("scidfm-18b"), par, world)


def test_good_layouts_resolve_dp_and_expert_dp():
    lay = validate_layout(get_preset("scidfm-18b"), ParallelConfig(tp=2, pp=2, ep=8), 128)
    assert (lay.dp, lay.etp, lay.edp) == (32, 2, 4)
    lay = validate_layout(get_preset("scidfm-debug"), ParallelConfig(tp=2, pp=2, ep=2), 8)
    assert (lay.dp, lay.edp) == (2, 1)


def test_validation_happens_before_any_process_group(tmp_path):
    """init_distributed refuses a bad layout before torch.distributed or megatron groups exist."""
    code = (
        "import torch.distributed as dist\n"
        "from scidfm_megatron.parallel import init_distributed, ParallelConfigError\n"
        "from scidfm_megatron.model.presets import get_preset\n"
        "from scidfm_megatron.config import ParallelConfig\n"
        "try:\n"
        "    init_distributed(get_preset('scidfm-debug'), ParallelConfig(tp=2))\n"
        "except ParallelConfigError as e:\n"
        "    print('REFUSED', e, 'initialized:', dist.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"WORLD_SIZE": "3", "PATH": "/usr/bin:/bin", "TORCHDYNAMO_DISABLE": "1",
                              "PYTHONPATH": str(__import__("conftest").ROOT)})
    assert "REFUSED TP*PP=2 must divide world size=3" in out.stdout, out.stdout + out.stderr
    assert "initialized: False" in out.stdout


def test_yaml_overrides_are_typed_and_unknown_keys_named():
    base = {"model": to_dict(get_preset("scidfm-tiny")), "parallel": {"tp": 1}}
    data = apply_overrides(base, ["model.num_layers=8", "parallel.ep=2", "model.moe_capacity_factor=null"])
    m = from_dict(ModelConfig, data["model"], "model")
    p = from_dict(ParallelConfig, data["parallel"], "parallel")
    assert m.num_layers == 8 and m.moe_capacity_factor is None and p.ep == 2
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['model.num_layyers'\]"):
        from_dict(ModelConfig, apply_overrides(base, ["model.num_layyers=8"])["model"], "model")
    with pytest.raises(ConfigError, match=r"model.num_layers: expected an integer, got 'eight'"):
        from_dict(ModelConfig, apply_overrides(base, ["model.num_layers=eight"])["model"], "model")
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(base, ["model.num_layers"])


def test_every_preset_validates():
    for name in PRESETS:
        get_preset(name).validate()


def test_schedule_changes_are_one_line_per_key():
    """What a resume (and --check) logs against the checkpoint's saved schedule (training/schedule.py)."""
    from types import SimpleNamespace

    from scidfm_megatron.training.schedule import changes, recipe_schedule

    t = SimpleNamespace(lr=3e-4, min_lr=3e-5, warmup_iters=0, lr_decay_iters=None, lr_decay_style="cosine",
                        weight_decay=0.1)
    saved = recipe_schedule(t, 100)
    assert changes(saved, recipe_schedule(t, 100)) == [] and changes(None, saved) == []
    new = recipe_schedule(SimpleNamespace(**{**vars(t), "lr": 1.5e-4, "warmup_iters": 2, "lr_decay_style": "linear",
                                             "weight_decay": 0.0}), 150)
    assert changes(saved, new) == ["train.lr 3.0e-4 -> 1.5e-4", "train.warmup_iters 0 -> 2",
                                   "decay length (train.lr_decay_iters, else train.train_iters) 100 -> 150",
                                   "train.lr_decay_style cosine -> linear", "train.weight_decay 0.1 -> 0.0"]
