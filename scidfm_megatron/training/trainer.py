"""One trainer over megatron-core for SciDFM's three stages (pretraining epochs 1 and 2, SFT).

The stages differ only by recipe: stage 2 is pretraining on the epoch-2 mixture with LR 3e-5 and
``checkpoint.init_from`` stage 1 (weights only: fresh optimizer and schedule); SFT reads packed
conversations and takes the loss on assistant tokens only (per-token loss over the global batch).

Everything numerical is megatron-core's: DDP and ``finalize_model_grads``, ``get_megatron_optimizer``
(AdamW, plain or distributed), ``OptimizerParamScheduler`` (warmup + cosine to ``min_lr``), the
pipeline schedules (``get_forward_backward_func``) with gradient accumulation over micro-batches, the MoE
aux loss, recomputation, and ``dist_checkpointing``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Any, Optional, cast

import torch

from ..config import ConfigError
from . import checkpoint as ckpt
from .config import RunConfig

log = logging.getLogger("scidfm.train")


class Trainer:
    """One training run of a RunConfig: engine, data, resume, the step loop, evaluation, saves and fault
    policies in one object, so the module-level :func:`run` (what the entry points call) is setup, train, close."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._stop_signal: Optional[int] = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup
    def _on_signal(self, signum, frame):
        self._stop_signal = signum
        if self.rank0:
            print(f"[scidfm] received {signal.Signals(signum).name}: finishing this step, then saving", flush=True)

    def setup(self, validated: bool = False):
        """Build the run from its parts: process groups, tokenizer, engine (model + DDP + optimizer), data,
        schedule, then restore a checkpoint, then the reporter (which needs to know about a resume).
        ``validated``: the caller already ran ``validate_run`` on this config (the entry point does)."""
        from ..parallel import env_world_size, init_distributed
        from .config import validate_run

        cfg = self.cfg
        if not validated:  # the vocabulary, schedule, batch and layout checks live there, once
            validate_run(cfg, env_world_size())
        if cfg.train.deterministic:  # a non-deterministic op is named in the log (training/determinism.py)
            from .determinism import enable_deterministic

            enable_deterministic()
        self.layout = init_distributed(cfg.model, cfg.parallel, seed=cfg.train.seed,
                                       timeout_minutes=cfg.train.collective_timeout_s / 60)
        self.rank0 = torch.distributed.get_rank() == 0
        from megatron.core import parallel_state as ps

        self.dp_rank, self.dp = ps.get_data_parallel_rank(), self.layout.dp
        logging.basicConfig(level=logging.INFO if self.rank0 else logging.WARNING,
                            format="[scidfm] %(levelname)s %(name)s: %(message)s", force=True)
        self.tokenizer = self._tokenizer()
        self.engine = self._engine()
        self.chunks, self.optimizer = self.engine.chunks, self.engine.optimizer
        from .faults import FaultGuard

        self.guard = FaultGuard(cfg, torch.distributed.get_rank(), self.layout.world_size, self.optimizer,
                                self.engine.config, self.chunks, self.rank0)
        self.train_ds, self.valid_ds = self._datasets()
        self.train_iters = self._train_iters()
        self.scheduler = self._scheduler()
        self.iteration, self.consumed = 0, 0
        self.async_queue: Any = None  # megatron-core's AsyncCallsQueue, made at the first async save
        self.last_checkpoint: Optional[Path] = None
        resumed = self._restore()
        self.reporter = self._reporter(resumed)
        self.expert_load = self._expert_load()

    def _tokenizer(self):
        from ..tokenizer.plain import load_tokenizer

        return load_tokenizer(self.cfg.data.tokenizer_model)  # science or plain; size and data: validate_run

    def _engine(self):
        from ..model.builder import attention_kernel, resolve_backend
        from .engine import build_engine

        engine = build_engine(self.cfg, self.layout)
        if self.rank0:
            kernel = attention_kernel(self.cfg.model, tp=self.layout.tp, masked=self.cfg.train.stage == "sft",
                                      dtype=torch.bfloat16 if engine.config.bf16 else torch.float32)
            print(f"[scidfm] {self.cfg.model.name} ({'bf16' if engine.config.bf16 else 'fp32'}, backend "
                  f"{resolve_backend(self.cfg.model.backend)}): attention kernel {kernel}; {engine.describe()}",
                  flush=True)
            from .megatron_check import applied_defaults

            for note in applied_defaults(self.cfg.model):
                print(f"[scidfm] {note}", flush=True)
            from ..model.accounting import startup_memory_line

            print(f"[scidfm] {startup_memory_line(self.cfg, self.layout, engine)}", flush=True)
        return engine

    def _train_iters(self) -> int:
        from .config import train_iters_of

        t = self.cfg.train
        iters = train_iters_of(self.cfg)
        if iters * t.global_batch_size > len(self.train_ds):
            raise ConfigError(f"train.train_iters x global_batch_size = {iters * t.global_batch_size} "
                              f"samples, but the training data has {len(self.train_ds)}")
        return iters

    def _scheduler(self):
        from .schedule import build_scheduler

        return build_scheduler(self.optimizer, self.cfg.train, self.train_iters)

    def _reporter(self, resumed: bool):
        from ..model.accounting import training_flops_per_token
        from .metrics import Reporter, detect_peak_tflops

        cfg = self.cfg
        peak = cfg.logging.peak_tflops or detect_peak_tflops()
        return Reporter(self.rank0, cfg.logging.tensorboard_dir, cfg.logging.metrics_file,
                        training_flops_per_token(cfg.model, cfg.train.seq_length), peak, self.layout.world_size,
                        resumed_at=self.iteration if resumed else None,
                        resumed_from=str(self.last_checkpoint) if resumed else None)

    def _expert_load(self):
        from .metrics import ExpertLoad

        m = self.cfg.model
        return ExpertLoad(m.num_layers, m.num_experts, m.moe_router_topk) if self.cfg.logging.expert_load else None

    def _datasets(self):
        cfg, t = self.cfg, self.cfg.train
        if t.stage == "sft":
            from ..data.sft import SFTDataset
            from .data import EpochShuffled

            base = SFTDataset(cast(str, cfg.data.sft_prefix), t.seq_length, self.tokenizer.pad_id)  # validate_run: set
            return EpochShuffled(base, cfg.data.sft_epochs, t.seed), None
        from ..data.prepare import build_run_datasets

        train, valid, _ = build_run_datasets(cfg, self.tokenizer)  # indices from data.cache_dir when prepared
        return train, valid

    def _restore(self) -> bool:
        """Load a checkpoint if the run has one. Order: the newest complete checkpoint in checkpoint.save
        (a restarted run continues where it stopped), else checkpoint.resume_from (a full resume from a
        chosen checkpoint), else checkpoint.init_from (weights only). Returns True for a full resume."""
        c = self.cfg.checkpoint
        choice: list[Any] = [None, False]  # [checkpoint path or None, weights only]
        if self.rank0:
            resume = ckpt.find_resume(c.save) if c.save else None
            if resume is not None:
                # A weights-only checkpoint (converted from Hugging Face) in checkpoint.save starts the
                # run from its weights, like checkpoint.init_from.
                choice = [str(resume), ckpt.is_weights_only(resume)]
                if c.resume_from:
                    log.warning("checkpoint.save %s already holds %s: continuing from it; checkpoint.resume_from "
                                "(%s) applies only to a save directory without checkpoints", c.save, resume.name,
                                c.resume_from)
            elif c.resume_from:
                found = ckpt.resolve(c.resume_from, "checkpoint.resume_from")
                if ckpt.is_weights_only(found):
                    raise ConfigError(f"checkpoint.resume_from {found} holds weights only (no optimizer state): "
                                      f"start from it with checkpoint.init_from={found}")
                choice = [str(found), False]
            elif c.init_from:
                choice = [str(ckpt.resolve(c.init_from, "checkpoint.init_from")), True]
        torch.distributed.broadcast_object_list(choice, src=0)
        path, weights_only = choice
        if path is None:
            return False
        if not weights_only:
            ckpt.check_data_position(ckpt.saved_config(path), self.cfg.train, path)
        from . import schedule

        lrs = schedule.group_lrs(self.optimizer)
        common = ckpt.load(path, self.chunks, self.optimizer, self.scheduler, weights_only=weights_only)
        if weights_only:
            reloaded = ckpt.masters_reloaded(self.optimizer)  # checked after megatron's reload ran (collective)
            if self.rank0:
                print(f"[scidfm] initialised weights from {path} (fresh optimizer and LR schedule"
                      + ("; the optimizer's fp32 master weights reloaded from them, checked equal" if reloaded else "")
                      + ")", flush=True)
                if reloaded is False:
                    log.warning("the optimizer's fp32 master weights differ from the loaded weights: its first "
                                "step will overwrite them (megatron's reload_model_params did not take effect)")
            return False
        self.iteration, self.consumed = int(common["iteration"]), int(common["consumed_samples"])
        self.last_checkpoint = Path(path)
        schedule.restore_group_lrs(self.optimizer, self.scheduler, lrs)  # the recipe's schedule, from here
        if self.rank0:
            print(f"[scidfm] resumed from {path}: iteration {self.iteration}, {self.consumed} samples consumed",
                  flush=True)
            changed = schedule.changes(schedule.saved_schedule(path),
                                       schedule.recipe_schedule(self.cfg.train, self.train_iters))
            if changed:
                print(schedule.describe_changes(path, changed, self.iteration), flush=True)
        return True

    # ------------------------------------------------------------------ loop
    def close(self) -> None:
        """Close the metrics file and TensorBoard (``train()`` may be called again before this, e.g. to
        continue for more iterations in the same process, as tools/bench_train.py does)."""
        if getattr(self, "reporter", None) is not None:
            self.reporter.close()
        if getattr(self, "async_queue", None) is not None and self.async_queue.get_num_unfinalized_calls():
            # Only after an error: a write still in flight is abandoned; its iter_N.tmp is never published.
            self.async_queue.close(abort=True)

    def _moe_aux(self, num_microbatches: int) -> Optional[float]:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, track_moe_metrics

        totals: dict = {}
        track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=self.iteration, total_loss_dict=totals,
                          num_layers=self.cfg.model.num_layers)
        clear_aux_losses_tracker()
        v = totals.get("load_balancing_loss")
        return None if v is None else float(v)

    def save(self, final: bool = False):
        """A periodic save (asynchronous with checkpoint.async_save; the fast dp_reshardable format for the
        distributed optimizer with checkpoint.format: auto) or the final one (synchronous, layout-free)."""
        c = self.cfg.checkpoint
        fmt = c.format
        if fmt == "auto":
            fmt = "dp_reshardable" if self.cfg.train.use_distributed_optimizer and not final else "fully_reshardable"
        queue = None if final else self._async_queue()
        if final:  # a save still in flight is published first: `latest` never goes back
            self._finalize_saves(blocking=True)
        common = dict(consumed_samples=self.consumed, stage=self.cfg.train.stage, config=self.cfg.to_dict(),
                      tokenizer=self._tokenizer_record())
        from .faults import SaveFailed

        try:
            with self.engine.synced_params():  # the tokenizer travels with the checkpoint (a copy + its fingerprint)
                path = ckpt.save(cast(str, c.save), self.iteration, self.chunks, self.optimizer, self.scheduler, common,
                                 keep_last=c.keep_last, optimizer_format=fmt, async_queue=queue,
                                 files=self._tokenizer_files(),
                                 keep_every=c.keep_every, inject_error=self.guard.save_error(self.iteration))
        except SaveFailed as exc:
            self.guard.on_save_error(exc, self.iteration)  # stop: raises RunStopped
            return
        if queue is None:
            self.last_checkpoint = path
        if self.rank0:
            print(f"[scidfm] {'writing' if queue else 'saved'} checkpoint {path} ({fmt}"
                  f"{', asynchronously' if queue else ''})", flush=True)

    def _tokenizer_files(self) -> dict:
        # the model, and the science tokenizer's inventory beside it (the HF export ships it)
        model = Path(self.cfg.data.tokenizer_model)
        files = {ckpt.TOKENIZER_FILE: str(model)}
        if (model.parent / "science_tokens.json").is_file():
            files["science_tokens.json"] = str(model.parent / "science_tokens.json")
        return files

    def _tokenizer_record(self) -> dict:
        if getattr(self, "_tok_record", None) is None:
            from ..tokenizer.fingerprint import tokenizer_fingerprint

            fp = tokenizer_fingerprint(self.cfg.data.tokenizer_model)
            self._tok_record = dict(kind=fp["kind"], file=ckpt.TOKENIZER_FILE, fingerprint=fp,
                                    source=str(self.cfg.data.tokenizer_model))
        return self._tok_record

    def _async_queue(self):
        if not self.cfg.checkpoint.async_save:
            return None
        if self.async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        return self.async_queue

    def _finalize_saves(self, blocking: bool = False) -> None:
        """Publish the asynchronous saves whose writes finished on every rank (collective)."""
        if self.async_queue is not None and self.async_queue.get_num_unfinalized_calls():
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)

    def evaluate(self) -> Optional[float]:
        from .data import micro_batches
        from .step import train_step

        t = self.cfg.train
        for c in self.chunks:
            c.eval()
        total, count = 0.0, 0
        with torch.no_grad(), self.engine.synced_params():
            for k in range(t.eval_iters):
                mbs = micro_batches(self.valid_ds, k * t.global_batch_size, t.global_batch_size, t.micro_batch_size,
                                    self.dp_rank, self.dp)
                r = train_step(self.chunks, self.optimizer, mbs, seq_length=t.seq_length,
                               micro_batch_size=t.micro_batch_size, forward_only=True)
                if r.loss is not None:  # None: no loss-masked token in this batch (r.tokens == 0)
                    total, count = total + r.loss * r.tokens, count + r.tokens
        for c in self.chunks:
            c.train()
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        return total / count if count else None

    def _stop_everywhere(self) -> bool:  # (also the end-of-iteration point of the hang watchdog)
        self.guard.beat()
        from ..device import comm_device

        flag = torch.tensor([1 if self._stop_signal is not None else 0], dtype=torch.int32, device=comm_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> list[dict]:
        from ..model.routing import RouterRecorder
        from .data import micro_batches
        from .step import train_step

        cfg, t = self.cfg, self.cfg.train
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        start = self.iteration
        saved_at = self.iteration if self.last_checkpoint else None
        recorder: contextlib.AbstractContextManager[Any] = (RouterRecorder(self.chunks) if self.expert_load
                                                            else contextlib.nullcontext())
        if self.rank0:
            print(f"[scidfm] {t.stage}: {cfg.model.name} on {self.layout}; iterations {start + 1}..{self.train_iters}, "
                  f"global batch {t.global_batch_size} x {t.seq_length} tokens", flush=True)
        self.guard.start_watchdog()
        try:
            while self.iteration < self.train_iters:
                self.reporter.start_step()
                self.guard.before_step(self.iteration + 1)  # fault drills; per-rank step time
                mbs = micro_batches(self.train_ds, self.consumed, t.global_batch_size, t.micro_batch_size,
                                    self.dp_rank, self.dp)
                with recorder as rec:
                    r = train_step(self.chunks, self.optimizer, mbs, seq_length=t.seq_length,
                                   micro_batch_size=t.micro_batch_size, step_optimizer=False)
                    r = self.guard.optimizer_step(self.iteration + 1, r)  # not applied when not finite
                self.iteration += 1
                self.consumed += t.global_batch_size
                self.scheduler.step(increment=1)
                aux = self._moe_aux(len(mbs))
                # train.on_nan (stop: raises RunStopped), loss spikes
                extra = self.guard.check(self.iteration, r, self.consumed - t.global_batch_size, t.global_batch_size,
                                         self.last_checkpoint, lambda: self._finalize_saves(blocking=True))
                log_now = self.iteration % cfg.logging.log_interval == 0
                if log_now:
                    extra.update(self.guard.straggler_stats())  # collective, at every log interval
                load, offered = (None, None)
                if self.expert_load:
                    load, offered = self.expert_load.reduce(rec.calls)
                    rec.clear()
                row = self.reporter.step(self.iteration, r.loss, self.optimizer.param_groups[0]["lr"], r.grad_norm, aux,
                                         t.global_batch_size * t.seq_length, load, offered,
                                         print_line=log_now, extra=extra)
                row["iteration"] = self.iteration
                self.history.append(row)
                if t.eval_interval and self.valid_ds is not None and self.iteration % t.eval_interval == 0:
                    ev = self.evaluate()
                    if self.rank0 and ev is not None:
                        print(f"[scidfm] iteration {self.iteration}: validation loss {ev:.4f}", flush=True)
                        if self.reporter.writer is not None:
                            self.reporter.writer.add_scalar("valid/loss", ev, self.iteration)
                    row["valid_loss"] = ev
                # Decided before the save: a stop (signal, exit_after_iters, end of run) on a save interval
                # writes its final, layout-free save there instead of the periodic format.
                stop = self._stop_everywhere() or bool(t.exit_after_iters
                                                       and self.iteration - start >= t.exit_after_iters)
                c = cfg.checkpoint
                if c.save and c.save_interval and self.iteration % c.save_interval == 0:
                    self.save(final=stop or self.iteration >= self.train_iters)
                    saved_at = self.iteration
                self._finalize_saves()
                if stop:
                    break
            if cfg.checkpoint.save and cfg.checkpoint.save_on_exit and saved_at != self.iteration:
                self.save(final=True)
            self._finalize_saves(blocking=True)
        finally:
            self.guard.stop_watchdog()
            for s, h in old.items():
                signal.signal(s, h)
        if self.rank0:
            where = [f"checkpoints: {cfg.checkpoint.save}" if cfg.checkpoint.save else None,
                     f"tensorboard: {cfg.logging.tensorboard_dir}" if cfg.logging.tensorboard_dir else None]
            print(f"[scidfm] done at iteration {self.iteration}" +
                  (" (stopped by signal)" if self._stop_signal else "") + "; " + "; ".join(w for w in where if w),
                  flush=True)
        return self.history


def run(cfg: RunConfig, validated: bool = False) -> list[dict]:
    from ..parallel import destroy_distributed

    trainer = Trainer(cfg)
    try:
        trainer.setup(validated=validated)
        return trainer.train()
    finally:
        trainer.close()
        destroy_distributed()
