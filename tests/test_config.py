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


# ------------------------------------------------------------------ enum-like settings (Literal fields)
# Every setting with a fixed set of values, and the choices a refusal lists, as a recipe writes them.
CHOICES = {
    "model.backend": "auto, te, te-sdpa, torch or local",
    "model.moe_token_drop_policy": "probs or position",
    "model.moe_token_dispatcher": "alltoall or allgather",
    "model.moe_router_dtype": "null, fp32 or fp64",
    "model.moe_router_score_function": "softmax or sigmoid",
    "model.moe_router_load_balancing_type": "aux_loss, seq_aux_loss, global_aux_loss or none",
    "train.stage": "pretrain or sft",
    "train.precision": "auto, fp32 or bf16",
    "train.lr_decay_style": "cosine, linear or constant",
    "train.on_nan": "stop or skip",
    "checkpoint.format": "auto, fully_reshardable or dp_reshardable",
    "checkpoint.on_save_error": "stop or continue",
}


def scidfm_train(capsys, *args) -> tuple[int, list[str]]:
    """``scidfm-train ARGS`` in this process: (exit code, stderr lines)."""
    from scidfm_megatron.cli.train import main

    capsys.readouterr()
    rc = main(argv=[str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_every_enum_like_setting_is_a_literal_field():
    import dataclasses
    import typing

    from scidfm_megatron.config import choices_of
    from scidfm_megatron.training.config import RunConfig

    sections = typing.get_type_hints(RunConfig)
    found = {f"{s.name}.{k}" for s in dataclasses.fields(RunConfig)
             for k, tp in typing.get_type_hints(sections[s.name]).items() if choices_of(tp) is not None}
    assert found == set(CHOICES)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_bad_choice_is_refused_by_the_loader_in_one_line(capsys, key):
    """``scidfm-train --config R key=bogus``: exit 2, one line naming the key, the value and every choice; a
    config changed in code is refused by the same check (RunConfig.check_sections, run by RunConfig.validate)."""
    from conftest import RECIPES
    from scidfm_megatron.training.config import load_run_config

    want = f"{key} must be {CHOICES[key]}, got 'bogus'"
    rc, err = scidfm_train(capsys, "--config", RECIPES / "tiny_stage1.yaml", "--check", "--layout-only",
                           f"{key}=bogus")
    assert (rc, err) == (2, [f"scidfm-train: configuration error: {want}"])
    cfg = load_run_config(RECIPES / "tiny_stage1.yaml")
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, "bogus")
    with pytest.raises(ConfigError) as exc:
        cfg.check_sections()
    assert str(exc.value) == want


def test_a_bad_recompute_is_refused_at_load(capsys):
    """Before: the loader took any string and the model builder raised a ValueError."""
    from conftest import RECIPES
    from scidfm_megatron.training.config import load_run_config

    tiny = RECIPES / "tiny_stage1.yaml"
    for bad in ("everything", "core_attn,flash", "selective,moe", ""):
        with pytest.raises(ConfigError, match=r"^train.recompute must be null, full, selective or a comma-separated "
                                              r"list of core_attn, moe_act, moe, layernorm, mlp .*, got "):
            load_run_config(tiny, [f"train.recompute={bad}"])
    rc, err = scidfm_train(capsys, "--config", tiny, "train.recompute=everything")
    assert rc == 2 and len(err) == 1 and err[0].startswith("scidfm-train: configuration error: train.recompute")
    for good, value in (("null", None), ("full", "full"), ("selective", "selective"),
                        ("core_attn,moe", "core_attn,moe")):
        assert load_run_config(tiny, [f"train.recompute={good}"]).train.recompute == value


def test_backend_auto_is_logged_as_resolved_and_kept_as_written():
    """model.backend: auto builds what this machine has; the run logs that choice with its reason (at --check
    and at start: applied_defaults), and the config, which a checkpoint saves, keeps "auto"."""
    from scidfm_megatron.model.builder import resolve_backend
    from scidfm_megatron.training.megatron_check import applied_defaults

    auto = get_preset("scidfm-tiny")
    built = resolve_backend("auto")
    notes = [n for n in applied_defaults(auto) if n.startswith("model.backend")]
    assert len(notes) == 1 and notes[0].startswith(f"model.backend: auto -> {built} ("), notes
    assert auto.backend == "auto"
    assert not [n for n in applied_defaults(get_preset("scidfm-tiny", backend="local")) if "backend" in n]


def test_every_error_has_the_common_base_and_keeps_its_builtin_one():
    """One errors module: a CLI catches ScidfmError; old ``except ValueError`` callers and old imports work."""
    import importlib

    from scidfm_megatron import errors

    homes = {"config": ["ConfigError"], "parallel": ["ParallelConfigError"],
             "training.faults": ["RunStopped", "SaveFailed"], "training.checkpoint": ["CheckpointMismatch"],
             "convert.tokenizer_files": ["TokenizerError"], "convert.verify": ["VerifyError"],
             "convert.hf_io": ["HFCheckpointError"], "convert.mcore_io": ["McoreCheckpointError"],
             "data.preprocess": ["PreprocessError", "PreprocessUsageError"], "data.sft_formats": ["SFTFormatError"],
             "data.shards": ["ShardError"],
             "tokenizer.build": ["LossyBaseError"], "tokenizer.hf_plain": ["PlainExportError"],
             "eval.experts": ["CorpusError"], "eval.converters": ["ConvertError"], "eval.tasks": ["TaskDataError"]}
    builtin = {"ConfigError": ValueError, "ParallelConfigError": ValueError, "RunStopped": RuntimeError,
               "SaveFailed": OSError, "CheckpointMismatch": RuntimeError, "TokenizerError": ValueError,
               "VerifyError": RuntimeError, "HFCheckpointError": RuntimeError, "McoreCheckpointError": RuntimeError,
               "PreprocessError": RuntimeError, "PreprocessUsageError": RuntimeError, "SFTFormatError": ValueError,
               "ShardError": RuntimeError, "LossyBaseError": ValueError,
               "PlainExportError": ValueError, "CorpusError": ValueError, "ConvertError": ValueError,
               "TaskDataError": ValueError}
    assert sorted(n for names in homes.values() for n in names) == sorted(builtin)
    assert set(builtin) | {"ScidfmError"} == set(errors.__all__)
    for module, names in homes.items():
        mod = importlib.import_module(f"scidfm_megatron.{module}")
        for name in names:
            cls = getattr(errors, name)
            assert getattr(mod, name) is cls and issubclass(cls, errors.ScidfmError) and issubclass(cls, builtin[name])
