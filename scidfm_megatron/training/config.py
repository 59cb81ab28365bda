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
from typing import TYPE_CHECKING, Literal, Optional, cast

from ..config import (
    RECOMPUTE_CHOICES,
    RECOMPUTE_MODULES,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    apply_overrides,
    check_choices,
    from_dict,
    load_yaml,
    to_dict,
)
from ..model.presets import get_preset
from .faults import FaultsConfig

if TYPE_CHECKING:
    from ..parallel import Layout

Stage = Literal["pretrain", "sft"]
Precision = Literal["auto", "fp32", "bf16"]  # auto: bf16 on GPU, fp32 on CPU
LrDecayStyle = Literal["cosine", "linear", "constant"]
OnNan = Literal["stop", "skip"]
CheckpointFormat = Literal["auto", "fully_reshardable", "dp_reshardable"]
OnSaveError = Literal["stop", "continue"]


def recompute_error(value: Optional[str]) -> Optional[str]:
    """Why ``train.recompute`` is not a valid setting (None when it is): null, full, selective or a
    comma-separated list of megatron's recompute modules. Whether the backend builds them (moe_act) depends on
    the machine under model.backend: auto: the builder checks that (validate_run's megatron check)."""
    if value in RECOMPUTE_CHOICES:
        return None
    if isinstance(value, str) and value and not set(value.split(",")) - set(RECOMPUTE_MODULES):
        return None
    named = ", ".join("null" if c is None else c for c in RECOMPUTE_CHOICES)
    return (f"train.recompute must be {named} or a comma-separated list of "
            f"{', '.join(RECOMPUTE_MODULES)} (moe_act needs model.backend torch or te), got {value!r}")


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision and fault policy of one stage; the same class serves pretraining
    and SFT (``stage``), so a recipe differs from another only in its values."""

    stage: Stage = "pretrain"
    precision: Precision = "auto"
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 256
    train_iters: Optional[int] = None  # pretraining: required; SFT: derived from data.sft_epochs when null
    lr: float = 3e-4
    min_lr: float = 3e-5  # cosine decays to this (SciDFM: 10% of the peak)
    warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # default: train_iters
    lr_decay_style: LrDecayStyle = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    recompute: Optional[str] = None  # null | selective | full | a module list ("core_attn,moe_act")
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
    on_nan: OnNan = "stop"
    max_skipped_steps: int = 10
    loss_spike_zscore: float = 6.0  # log a loss this many standard deviations above the recent mean (0: off)
    loss_spike_window: int = 100
    # No iteration completed for this long: every rank writes its Python stacks to the log directory and
    # exits 124. null = max(900 s, 20 x the median iteration time); 0 = off.
    hang_timeout_s: Optional[float] = None
    collective_timeout_s: float = 1800.0  # torch.distributed's timeout for one collective

    def validate(self) -> None:
        """This section's own checks (no file, no world size)."""
        check_choices(self, "train")
        err = recompute_error(self.recompute)
        if err:
            raise ConfigError(err)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) exceeds train.lr ({self.lr})")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError("train.global_batch_size must be a multiple of train.micro_batch_size")
        # fault policy (training/faults.py)
        if self.max_skipped_steps < 0:
            raise ConfigError(f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if self.hang_timeout_s is not None and self.hang_timeout_s < 0:
            raise ConfigError(f"train.hang_timeout_s must be >= 0 (0 = off, null = automatic), "
                              f"got {self.hang_timeout_s}")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"train.collective_timeout_s must be > 0, got {self.collective_timeout_s}")


@dataclass
class DataConfig:
    """Where the tokens come from: the tokenizer, and a pretraining mixture or a packed SFT prefix (which
    one ``train.stage`` says); the files themselves are checked by validate_run, not here."""

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
    """Saving and starting points: where to save and how often, what to start from (weights only or an
    exact resume), the optimizer's layout on disk and what a failed save does."""

    save: Optional[str] = None  # directory of iter_XXXXXXX checkpoints; resumed from automatically
    save_interval: Optional[int] = None
    keep_last: int = 2
    init_from: Optional[str] = None  # start from these weights with a fresh optimizer and schedule
    # Continue exactly from this checkpoint (an iter_XXXXXXX directory, or a save directory: its newest
    # complete one) instead of the newest in checkpoint.save; later saves still go to checkpoint.save.
    resume_from: Optional[str] = None
    save_on_exit: bool = True
    # The distributed optimizer's layout on disk (training/checkpoint/save_load.py). auto: the periodic saves write
    # each rank's buffers as they are (dp_reshardable: no gather, loadable at the same TP/PP/EP), the
    # final save (end of run, or a signal) the layout-free fully_reshardable format; or one of the two
    # for every save. The plain optimizer is stored the same way in both.
    format: CheckpointFormat = "auto"
    # Periodic saves written by a forked process while training goes on; the checkpoint appears (renamed
    # from iter_N.tmp, then `latest`) only when every rank's write is complete. The final save is synchronous.
    async_save: bool = False
    keep_every: Optional[int] = None  # also keep every K-th iteration's checkpoint (besides the last keep_last)
    # A failed save (any rank; disk full...) leaves the previous checkpoint and `latest`; stop: exit 1 with
    # one line naming the path and errno; continue: train on, the next save interval tries again.
    on_save_error: OnSaveError = "stop"

    def validate(self) -> None:
        """This section's own checks (whether the paths exist is validate_run's)."""
        check_choices(self, "checkpoint")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError(f"checkpoint.keep_every must be >= 1 (or null), got {self.keep_every}")
        if self.init_from and self.resume_from:
            raise ConfigError("checkpoint.init_from and checkpoint.resume_from exclude each other: init_from loads "
                              "weights only (new optimizer and schedule), resume_from continues a run exactly")


@dataclass
class EngineConfig:
    """Performance switches (training/engine.py); null = automatic (on where it helps: CUDA, DP > 1)."""

    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None  # needs train.use_distributed_optimizer
    grad_reduce_in_fp32: bool = True
    bucket_size: Optional[int] = None  # elements per gradient bucket; null = megatron's default
    check_for_nan_in_grad: bool = False

    def validate(self, train: TrainConfig) -> None:
        if self.overlap_param_gather and not train.use_distributed_optimizer:
            raise ConfigError("engine.overlap_param_gather needs train.use_distributed_optimizer: true")


@dataclass
class LoggingConfig:
    """What the run reports and where: the console every log_interval steps, TensorBoard, a JSON-lines file."""

    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None  # one JSON line per step (rank 0): loss, lr, grad norm, ...
    peak_tflops: Optional[float] = None  # per device, for MFU; null = detect the GPU, none on CPU
    expert_load: bool = True  # per-layer tokens per expert and dropped fraction


@dataclass
class RunConfig:
    """One run, as a recipe plus overrides describe it (``load_run_config``), with the user's values kept as
    written (what a checkpoint saves); ``validate`` checks it against a world size before anything is built."""

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

    def check_sections(self) -> None:
        """Each section's own checks: what the loader refuses before any world size is known."""
        self.model.validate()
        self.train.validate()
        self.checkpoint.validate()
        self.engine.validate(self.train)

    def validate(self, world_size: int) -> Layout:
        """Every check of this run that opens no file: each section's, the layout for ``world_size``
        processes (parallel.py) and the settings that span sections. Returns the layout. The file checks
        (tokenizer, data, checkpoints) and megatron-core's own are validate_run's."""
        from ..parallel import validate_layout

        self.check_sections()
        self.faults.validate(world_size)
        layout = validate_layout(self.model, self.parallel, world_size)
        t = self.train
        if t.stage == "pretrain" and not t.train_iters:
            raise ConfigError("train.train_iters is required for pretraining")
        if t.train_iters and t.warmup_iters >= (t.lr_decay_iters or t.train_iters):  # SFT's derived length: below
            raise ConfigError(f"train.warmup_iters ({t.warmup_iters}) must be smaller than the decay length "
                              f"({t.lr_decay_iters or t.train_iters} = train.lr_decay_iters or train.train_iters)")
        if t.global_batch_size % (t.micro_batch_size * layout.dp):
            raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                              f"micro_batch_size x DP = {t.micro_batch_size} x {layout.dp} on {world_size} processes")
        if t.seq_length > self.model.max_seq_length:
            raise ConfigError(f"train.seq_length ({t.seq_length}) exceeds model.max_seq_length "
                              f"({self.model.max_seq_length})")
        from ..model.builder import resolve_backend, sft_backend_error  # imports torch: after the cheap checks

        resolve_backend(self.model.backend)  # 'te' without TransformerEngine fails here, with the import error
        if t.stage == "sft":
            err = sft_backend_error(self.model)  # auto under TE: te-sdpa, whose padded SDPA takes the mask
            if err:
                raise ConfigError(err)
        return layout


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
    cfg.check_sections()
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


def validate_run(cfg: RunConfig, world_size: int, layout_only: bool = False) -> Layout:
    """Everything about a run that can be checked without building anything, on every rank, in about a
    second: ``cfg.validate`` (sections, layout against the world size, batch, schedule, backend), then the
    files, megatron-core's own config checks (training/megatron_check.py) and the checkpoint it resumes
    (training/resume_check.py). ``layout_only``: no file is opened (data, tokenizer, checkpoints): the
    config and megatron checks only, for a recipe whose paths exist on the cluster alone. Returns the
    :class:`~scidfm_megatron.parallel.Layout`. Raises ConfigError / ParallelConfigError naming the key."""
    import os

    from .megatron_check import check_megatron_configs

    layout = cfg.validate(world_size)
    if layout_only:
        check_megatron_configs(cfg, layout)
        return layout
    t, d, c = cfg.train, cfg.data, cfg.checkpoint
    if not d.tokenizer_model:
        raise ConfigError("data.tokenizer_model is required (build it with scidfm-build-tokenizer)")
    if not os.path.exists(d.tokenizer_model):
        raise ConfigError(f"data.tokenizer_model: {d.tokenizer_model} does not exist")
    from ..data.provenance import check_run_data, run_tokenizer

    fp = run_tokenizer(cfg)  # the science tokenizer or a plain SentencePiece model (SFT: science only)
    if t.stage == "sft":
        if not d.sft_prefix:
            raise ConfigError("data.sft_prefix is required for train.stage: sft")
        from ..data.sft import missing_sft_file

        missing = missing_sft_file(d.sft_prefix)
        if missing:
            raise ConfigError(f"data.sft_prefix: {missing}")
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
    if t.warmup_iters >= decay:  # SFT without train.train_iters: the length the data gives
        raise ConfigError(f"train.warmup_iters ({t.warmup_iters}) must be smaller than the decay length "
                          f"({decay} = train.lr_decay_iters or train.train_iters)")
    for key in ("init_from", "resume_from"):
        v = getattr(c, key)
        if v and not os.path.exists(v):
            raise ConfigError(f"checkpoint.{key}: {v} does not exist")
    from .resume_check import check_resume

    check_megatron_configs(cfg, layout)
    check_resume(cfg, fp)  # before the data check: a checkpoint of another tokenizer is named as such
    check_run_data(cfg, fp)  # every dataset made with this tokenizer, its ids inside the vocabulary
    return layout
