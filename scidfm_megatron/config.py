"""Typed, nested configuration: dataclasses, YAML recipes and ``a.b=value`` overrides.

One adapter (``model.builder.to_transformer_config``) turns these into megatron-core's
``TransformerConfig``; nothing else in the library reads megatron's config objects directly.
Unknown keys and wrongly typed values are errors that name the key path, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import ConfigError  # re-export: defined in scidfm_megatron/errors.py

# The enum-like settings. The loader (``from_dict``) and each section's ``validate()`` refuse any other value with
# one line naming the key, the value and these choices (``check_choices``); the choices are written only here.
Backend = Literal["auto", "te", "te-sdpa", "torch", "local"]
TokenDropPolicy = Literal["probs", "position"]
TokenDispatcher = Literal["alltoall", "allgather"]
RouterDtype = Literal["fp32", "fp64"]
RouterScoreFunction = Literal["softmax", "sigmoid"]
LoadBalancingType = Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"]
# train.recompute's named choices; it also takes a comma-separated list of megatron's recompute modules:
RECOMPUTE_CHOICES = (None, "full", "selective")
RECOMPUTE_MODULES = ("core_attn", "moe_act", "moe", "layernorm", "mlp")


# --------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Architecture of a SciDFM-style Llama MoE: RMSNorm, RoPE, SwiGLU experts, Mixtral-style routing."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads; == num_attention_heads for plain MHA (SciDFM)
    head_dim: int
    moe_ffn_hidden_size: int  # per-expert SwiGLU hidden size (w1/w3: hidden -> this)
    num_experts: int
    moe_router_topk: int
    vocab_size: int  # real tokenizer size; the embedding is padded to padded_vocab_size
    max_seq_length: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    untie_embeddings: bool = True
    moe_aux_loss_coeff: float = 0.02
    # Expert capacity as a multiple of the even share (tokens*topk/experts). None = dropless routing.
    moe_capacity_factor: Optional[float] = 1.0
    # Which tokens lose their slot when an expert is over capacity: lowest router prob ("probs",
    # GShard/Switch practice) or latest position ("position").
    moe_token_drop_policy: TokenDropPolicy = "probs"
    moe_token_dispatcher: TokenDispatcher = "alltoall"
    moe_router_dtype: Optional[RouterDtype] = "fp32"  # router logits/softmax in fp32 even when training bf16
    # Router settings, by megatron-core's names (its TransformerConfig documents each). Defaults = Mixtral's
    # routing: softmax over the top-k logits. moe_router_pre_softmax null = on exactly for top-1 softmax
    # routing (megatron refuses top-1 without it: a softmax over one logit has no gradient), off otherwise.
    moe_router_pre_softmax: Optional[bool] = None
    moe_router_score_function: RouterScoreFunction = "softmax"
    moe_router_num_groups: Optional[int] = None  # group-limited routing: experts in this many groups ...
    moe_router_group_topk: Optional[int] = None  # ... of which each token may use this many
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_router_load_balancing_type: LoadBalancingType = "aux_loss"
    moe_router_enable_expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3; sigmoid scores)
    moe_router_bias_update_rate: float = 1e-3
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Pad the vocabulary to a multiple of this, independent of TP, so every layout shares one
    # global embedding shape (Megatron-LM pads to a multiple of 128*TP, which changes with TP).
    make_vocab_size_divisible_by: int = 128
    # Layer implementations (model/builder.py): "auto" = "te-sdpa" (TE's linears, norms and experts, the
    # padded SDPA attention) when TE imports and CUDA is present, else "torch" on CUDA and "local" on CPU;
    # "te" = TE's spec with TE's attention (fails with the import
    # error when TE is missing); "torch" = PyTorch's fused kernels, no TE (model/torch_backend.py: padded
    # SDPA attention, grouped-GEMM experts); "local" = megatron-core's unfused pure-torch modules. The
    # checkpoint keys are the same for all.
    backend: Backend = "auto"

    @property
    def router_pre_softmax(self) -> bool:
        """moe_router_pre_softmax as applied: null -> on for top-1 softmax routing only."""
        if self.moe_router_pre_softmax is not None:
            return self.moe_router_pre_softmax
        return self.moe_router_topk == 1 and self.moe_router_score_function == "softmax"

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    @property
    def attention_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    def validate(self) -> None:
        """The model's own consistency (sizes, divisibility, choices); the layout is checked in parallel.py."""
        for f in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
                  "moe_ffn_hidden_size", "num_experts", "moe_router_topk", "vocab_size", "max_seq_length",
                  "make_vocab_size_divisible_by"):
            if getattr(self, f) < 1:
                raise ConfigError(f"model.{f} must be >= 1, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                              f"model.num_query_groups ({self.num_query_groups})")
        if self.moe_router_topk > self.num_experts:
            raise ConfigError(f"model.moe_router_topk ({self.moe_router_topk}) exceeds model.num_experts "
                              f"({self.num_experts})")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ConfigError("model.moe_capacity_factor must be > 0, or null for dropless routing")
        check_choices(self, "model")  # a preset changed in code (get_preset(..., backend=...)) skips the loader


# ------------------------------------------------------------------------------------ parallel
@dataclass
class ParallelConfig:
    """Parallel degrees. Data parallelism is what is left: dp = world_size / (tp * pp).

    Experts use their own grid over the same ranks: expert tensor parallel (etp, defaults to tp) x
    expert parallel (ep) x expert data parallel (edp = world_size / (etp * ep * pp)) x pp.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel; None = same as tp (megatron-core's default)
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved 1F1B)
    # Megatron requires sequence parallelism for MoE with TP>1 in training; None = on exactly then.
    sequence_parallel: Optional[bool] = None

    @property
    def expert_tp(self) -> int:
        return self.etp if self.etp is not None else self.tp

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)

    def edp(self, world_size: int) -> int:
        return world_size // (self.expert_tp * self.ep * self.pp)


# ------------------------------------------------------------------------------------- helpers
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def choices_of(tp: Any) -> Optional[tuple]:
    """The allowed values of a ``Literal[...]`` or ``Optional[Literal[...]]`` annotation (None for null first),
    else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and typing.get_origin(rest[0]) is Literal:
            return ((None,) if len(rest) < len(args) else ()) + typing.get_args(rest[0])
    return None


def describe_choices(choices) -> str:
    """("a", "b", None) -> "a, b or null" (the way a recipe writes them)."""
    words = ["null" if c is None else str(c) for c in choices]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def choice_error(path: str, value: Any, choices) -> ConfigError:
    return ConfigError(f"{path} must be {describe_choices(choices)}, got {value!r}")


def check_choices(obj: Any, section: str) -> None:
    """Raise ConfigError for the first ``Literal`` field of dataclass ``obj`` whose value is not a choice."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = choices_of(hints[f.name])
        value = getattr(obj, f.name)
        if choices is not None and not any(value == c and type(value) is type(c) for c in choices):
            raise choice_error(f"{section}.{f.name}", value, choices)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``path``."""
    choices = choices_of(tp)
    if choices is not None:
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise choice_error(path, value, choices)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, f"{path} key"): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-7 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys by their full path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key(s) {[where + k for k in unknown]}; valid keys here: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{path}.{f.name}" if path else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {path + '.' if path else ''}{f.name}")
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.num_layers=4`` -> (["model", "num_layers"], 4); the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key component")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested mapping (before it becomes dataclasses, so types get checked)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "apply_overrides", "check_choices", "choices_of",
           "from_dict", "load_yaml", "parse_override", "to_dict", "field"]
