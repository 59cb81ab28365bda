"""The run configuration: one YAML recipe + dotted overrides -> typed sections.

    model:      preset name + any ModelConfig field to override (e.g. vocab_size to match the tokenizer)
    parallel:   ParallelConfig (tp, pp, ep, etp, vpp, sequence_parallel)
    train:      optimisation and schedule
    data:       tokenizer + mixture (pretraining) or packed SFT prefix
    checkpoint: where to save, how often, what to start from
    logging:    console / tensorboard
    engine:     performance switches (overlap of grad reduce / param gather, fp32 reduction, buckets)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, cast

from ..config import ConfigError, ModelConfig, ParallelConfig, apply_overrides, from_dict, load_yaml, to_dict
from ..model.presets import get_preset
from .faults import FaultsConfig


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # pretrain | sft
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 256
    train_iters: Optional[int] = None  # pretraining: required; SFT: derived from data.sft_epochs when null
    lr: float = 3e-4
    min_lr: float = 3e-5  # cosine decays to this (SciDFM: 10% of the peak)
    warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # default: train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    recompute: Optional[str] = None  # null | selective | full
    seed: int = 1234
    eval_interval: Optional[int] = None
    eval_iters: int = 2
    exit_after_iters: Optional[int] = None  # stop (with a checkpoint) after this many iterations of this run
    # Bitwise-reproducible steps on GPU: torch's deterministic algorithms (CUDA's atomics-based scatter/index
    # adds differ run to run otherwise), a fixed cuBLAS workspace and megatron's deterministic_mode.
    # Slower; CPU runs are deterministic without it.
    deterministic: bool = False
    # Faults (training/faults.py): a step whose loss or gradients are not finite is never applied; stop:
    # exit 1 with one line; skip: count the batch and go on, up to max_skipped_steps skips, then stop.
    on_nan: str = "stop"
    max_skipped_steps: int = 10
    loss_spike_zscore: float = 6.0  # log a loss this many standard deviations above the recent mean (0: off)
    loss_spike_window: int = 100
    # No iteration completed for this long: every rank writes its Python stacks to the log directory and
    # exits 124. null = max(900 s, 20 x the median iteration time); 0 = off.
    hang_timeout_s: Optional[float] = None
    collective_timeout_s: float = 1800.0  # torch.distributed's timeout for one collective

    def validate(self):
        if self.stage not in ("pretrain", "sft"):
            raise ConfigError(f"train.stage must be pretrain or sft, got {self.stage!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError("train.lr_decay_style must be cosine, linear or constant")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) exceeds train.lr ({self.lr})")


@dataclass
class DataConfig:
    tokenizer_model: str = ""
    mixture: Optional[str] = None  # pretraining: mixture recipe (YAML)
    data_root: Optional[str] = None  # override the mixture's data_root
    epoch: int = 1  # which epoch of the mixture (SciDFM stage 2 = epoch 2, re-sampled subsets)
    split: str = "98,2,0"
    cache_dir: Optional[str] = None
    sft_prefix: Optional[str] = None  # SFT: <prefix>_tokens / <prefix>_lossmask from scidfm-preprocess
    sft_epochs: float = 1.0


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # directory of iter_XXXXXXX checkpoints; resumed from automatically
    save_interval: Optional[int] = None
    keep_last: int = 2
    init_from: Optional[str] = None  # start from these weights with a fresh optimizer and schedule
    # Continue exactly from this checkpoint (an iter_XXXXXXX directory, or a save directory: its newest
    # complete one) instead of the newest in checkpoint.save; later saves still go to checkpoint.save.
    resume_from: Optional[str] = None
    save_on_exit: bool = True
    # The distributed optimizer's layout on disk (training/checkpoint.py). auto: the periodic saves write
    # each rank's buffers as they are (dp_reshardable: no gather, loadable at the same TP/PP/EP), the
    # final save (end of run, or a signal) the layout-free fully_reshardable format; or one of the two
    # for every save. The plain optimizer is stored the same way in both.
    format: str = "auto"
    # Periodic saves written by a forked process while training goes on; the checkpoint appears (renamed
    # from iter_N.tmp, then `latest`) only when every rank's write is complete. The final save is synchronous.
    async_save: bool = False
    keep_every: Optional[int] = None  # also keep every K-th iteration's checkpoint (besides the last keep_last)
    # A failed save (any rank; disk full...) leaves the previous checkpoint and `latest`; stop: exit 1 with
    # one line naming the path and errno; continue: train on, the next save interval tries again.
    on_save_error: str = "stop"


@dataclass
class EngineConfig:
    """Performance switches (training/engine.py); null = automatic (on where it helps: CUDA, DP > 1)."""

    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None  # needs train.use_distributed_optimizer
    grad_reduce_in_fp32: bool = True
    bucket_size: Optional[int] = None  # elements per gradient bucket; null = megatron's default
    check_for_nan_in_grad: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None  # one JSON line per step (rank 0): loss, lr, grad norm, ...
    peak_tflops: Optional[float] = None  # per device, for MFU; null = detect the GPU, none on CPU
    expert_load: bool = True  # per-layer tokens per expert and dropped fraction


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)  # fault drills (training/faults.py), off

    def to_dict(self) -> dict:
        return to_dict(self)


# Recipe keys that hold file or directory paths (resolved by load_run_config; docs/training.md, "Paths").
PATH_KEYS = (("data", "tokenizer_model"), ("data", "mixture"), ("data", "data_root"), ("data", "cache_dir"),
             ("data", "sft_prefix"), ("checkpoint", "save"), ("checkpoint", "init_from"),
             ("checkpoint", "resume_from"), ("logging", "tensorboard_dir"), ("logging", "metrics_file"))


def resolve_paths(raw: dict, base) -> dict:
    """Make the relative PATH_KEYS values of a raw recipe absolute against ``base`` (``~`` expanded)."""
    import os

    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section, key in PATH_KEYS:
        sec = out.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and sec[key]:
            sec[key] = os.path.normpath(os.path.join(base, os.path.expanduser(sec[key])))
    return out


def load_run_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                    base: Optional[dict] = None) -> RunConfig:
    """Recipe + overrides -> RunConfig. Paths: relative ones written in the recipe file are relative to the
    recipe file's folder (as a mixture's data_root is to the mixture's); relative ones in overrides (and in
    ``base``) to the working directory. All are absolute afterwards, so a checkpoint's saved config, and
    everything that reads it, works from any working directory."""
    import os

    raw = dict(base or {})
    if path:
        raw.update(resolve_paths(load_yaml(path), os.path.dirname(os.path.abspath(path))))
    raw = resolve_paths(apply_overrides(raw, list(overrides or [])), os.getcwd())
    model_raw = dict(raw.get("model") or {})
    preset = model_raw.pop("preset", None)
    if preset is None:
        raise ConfigError("model.preset is required (e.g. scidfm-18b, scidfm-tiny)")
    model = get_preset(preset)
    if model_raw:
        model = from_dict(ModelConfig, {**to_dict(model), **model_raw}, "model")
    model.validate()
    sections = {k: v for k, v in raw.items() if k != "model"}
    unknown = sorted(set(sections) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; sections are model, parallel, train, data, checkpoint, "
                          f"logging, engine, faults")
    kinds = {"parallel": ParallelConfig, "train": TrainConfig, "data": DataConfig, "checkpoint": CheckpointConfig,
             "logging": LoggingConfig, "engine": EngineConfig, "faults": FaultsConfig}
    parts = {k: from_dict(cls, sections.get(k) or {}, k) for k, cls in kinds.items()}
    cfg = RunConfig(model=model, **parts)
    cfg.train.validate()
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError("train.global_batch_size must be a multiple of train.micro_batch_size")
    return cfg


def sft_sequences(prefix: str) -> int:
    """Packed sequences in an SFT dataset, from its .idx header (no torch)."""
    from ..data.indexed import read_index_counts

    try:
        return read_index_counts(f"{prefix}_tokens")[0]
    except FileNotFoundError:
        raise ConfigError(f"data.sft_prefix: {prefix}_tokens.idx does not exist (make it with scidfm-preprocess "
                          f"--sft-seq-length ...)") from None


def train_iters_of(cfg: RunConfig) -> int:
    """The run's length: train.train_iters, or (SFT) data.sft_epochs passes over the packed data."""
    import math

    t = cfg.train
    if t.train_iters:
        return t.train_iters
    if t.stage != "sft":
        raise ConfigError("train.train_iters is required for pretraining")
    return math.ceil(cfg.data.sft_epochs * sft_sequences(cast(str, cfg.data.sft_prefix))) // t.global_batch_size


def validate_run(cfg: RunConfig, world_size: int, layout_only: bool = False):
    """Everything about a run that can be checked without building anything, on every rank, in about a
    second: layout against the world size, batch divisibility, schedule, files, backend, megatron-core's own
    config checks (training/megatron_check.py), the checkpoint it resumes (training/resume_check.py).
    ``layout_only``: no file is opened (data, tokenizer, checkpoints): the layout, model and megatron checks
    only, for a recipe whose paths exist on the cluster alone. Returns the
    :class:`~scidfm_megatron.parallel.Layout`. Raises ConfigError / ParallelConfigError naming the key."""
    import os

    from ..parallel import validate_layout

    t, d, c = cfg.train, cfg.data, cfg.checkpoint
    layout = validate_layout(cfg.model, cfg.parallel, world_size)
    if t.global_batch_size % (t.micro_batch_size * layout.dp):
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"micro_batch_size x DP = {t.micro_batch_size} x {layout.dp} on {world_size} processes")
    if t.seq_length > cfg.model.max_seq_length:
        raise ConfigError(f"train.seq_length ({t.seq_length}) exceeds model.max_seq_length "
                          f"({cfg.model.max_seq_length})")
    if layout_only:
        return _validate_layout_only(cfg, layout)
    if not d.tokenizer_model:
        raise ConfigError("data.tokenizer_model is required (build it with scidfm-build-tokenizer)")
    if not os.path.exists(d.tokenizer_model):
        raise ConfigError(f"data.tokenizer_model: {d.tokenizer_model} does not exist")
    from .faults import validate_policies

    validate_policies(cfg)
    cfg.faults.validate(world_size)
    from ..data.provenance import check_run_data, run_tokenizer

    fp = run_tokenizer(cfg)  # the science tokenizer or a plain SentencePiece model (SFT: science only)
    if c.format not in ("auto", "fully_reshardable", "dp_reshardable"):
        raise ConfigError(f"checkpoint.format must be auto, fully_reshardable or dp_reshardable, got {c.format!r}")
    if t.stage == "sft":
        if not d.sft_prefix:
            raise ConfigError("data.sft_prefix is required for train.stage: sft")
        from ..data.sft import missing_sft_file

        missing = missing_sft_file(d.sft_prefix)
        if missing:
            raise ConfigError(f"data.sft_prefix: {missing}")
        from ..model.builder import sft_backend_error

        err = sft_backend_error(cfg.model)  # auto under TE: te-sdpa, whose padded SDPA takes the mask
        if err:
            raise ConfigError(err)
    else:
        if not d.mixture:
            raise ConfigError("data.mixture is required for train.stage: pretrain")
        if not os.path.exists(d.mixture):
            raise ConfigError(f"data.mixture: {d.mixture} does not exist")
    vocab = fp["vocab_size"]
    if vocab != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size is {cfg.model.vocab_size} but {d.tokenizer_model} has {vocab} tokens: "
                          f"set model.vocab_size={vocab}")
    iters = train_iters_of(cfg)
    if iters < 1:
        raise ConfigError(f"the run has no iteration: {t.stage} data gives {iters} global batches of "
                          f"{t.global_batch_size}; lower train.global_batch_size or raise data.sft_epochs")
    decay = t.lr_decay_iters or iters
    if t.warmup_iters >= decay:
        raise ConfigError(f"train.warmup_iters ({t.warmup_iters}) must be smaller than the decay length "
                          f"({decay} = train.lr_decay_iters or train.train_iters)")
    for key in ("init_from", "resume_from"):
        v = getattr(c, key)
        if v and not os.path.exists(v):
            raise ConfigError(f"checkpoint.{key}: {v} does not exist")
    if c.init_from and c.resume_from:
        raise ConfigError("checkpoint.init_from and checkpoint.resume_from exclude each other: init_from loads "
                          "weights only (new optimizer and schedule), resume_from continues a run exactly")
    if cfg.engine.overlap_param_gather and not t.use_distributed_optimizer:
        raise ConfigError("engine.overlap_param_gather needs train.use_distributed_optimizer: true")
    from ..model.builder import resolve_backend

    resolve_backend(cfg.model.backend)  # 'te' without TransformerEngine fails here, with the import error
    from .megatron_check import check_megatron_configs
    from .resume_check import check_resume

    check_megatron_configs(cfg, layout)
    check_resume(cfg, fp)  # before the data check: a checkpoint of another tokenizer is named as such
    check_run_data(cfg, fp)  # every dataset made with this tokenizer, its ids inside the vocabulary
    return layout


def _validate_layout_only(cfg: RunConfig, layout):
    """validate_run's checks that need no file: formats, switches, schedule (when train_iters is given),
    the SFT backend choice, and megatron-core's own config checks."""
    from ..model.builder import resolve_backend
    from .megatron_check import check_megatron_configs

    t, c = cfg.train, cfg.checkpoint
    if c.format not in ("auto", "fully_reshardable", "dp_reshardable"):
        raise ConfigError(f"checkpoint.format must be auto, fully_reshardable or dp_reshardable, got {c.format!r}")
    if c.init_from and c.resume_from:
        raise ConfigError("checkpoint.init_from and checkpoint.resume_from exclude each other")
    if cfg.engine.overlap_param_gather and not t.use_distributed_optimizer:
        raise ConfigError("engine.overlap_param_gather needs train.use_distributed_optimizer: true")
    if t.stage == "pretrain" and not t.train_iters:
        raise ConfigError("train.train_iters is required for pretraining")
    if t.train_iters and t.warmup_iters >= (t.lr_decay_iters or t.train_iters):
        raise ConfigError(f"train.warmup_iters ({t.warmup_iters}) must be smaller than the decay length "
                          f"({t.lr_decay_iters or t.train_iters} = train.lr_decay_iters or train.train_iters)")
    if t.stage == "sft" and resolve_backend(cfg.model.backend) == "te":
        if cfg.model.backend == "te":
            raise ConfigError("model.backend: te cannot isolate packed SFT conversations yet; use model.backend: "
                              "local for SFT")
        cfg.model.backend = "local"
    check_megatron_configs(cfg, layout)
    return layout
