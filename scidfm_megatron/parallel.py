"""Parallel layout: validated before any process group exists, then megatron's groups are built.

Every check raises :class:`ParallelConfigError` naming the degree, the number it must divide and a fix,
so a bad launch fails in the first second on every rank instead of deep inside megatron-core.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from .config import ModelConfig, ParallelConfig
from .errors import ParallelConfigError  # re-export: defined in scidfm_megatron/errors.py


@dataclass(frozen=True)
class Layout:
    """The resolved degrees of a run (validate_layout): dense TP x PP x DP and the experts' own ETP x EP x EDP
    over the same ranks; what every later step (groups, data sharding, checkpoint names) reads instead of
    recomputing it from the config and the world size."""

    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    edp: int
    world_size: int

    def __str__(self) -> str:
        return (f"TP{self.tp} x PP{self.pp} x DP{self.dp} (experts: ETP{self.etp} x EP{self.ep} x "
                f"EDP{self.edp}) on {self.world_size} process{'es' if self.world_size > 1 else ''}")


def _divides(what: str, n: int, by_what: str, by: int, fix: str) -> None:
    if by < 1:
        raise ParallelConfigError(f"{by_what} must be >= 1, got {by}")
    if n % by:
        raise ParallelConfigError(f"{by_what}={by} must divide {what}={n}: {fix}")


def validate_layout(model: ModelConfig, par: ParallelConfig, world_size: int) -> Layout:
    """Check every divisibility megatron-core relies on; return the resolved layout."""
    for name in ("tp", "pp", "ep"):
        v = getattr(par, name)
        if not isinstance(v, int) or v < 1:
            raise ParallelConfigError(f"parallel.{name} must be an integer >= 1, got {v!r}")
    if par.etp is not None and par.etp < 1:
        raise ParallelConfigError(f"parallel.etp must be >= 1 or null, got {par.etp}")
    tp, pp, ep, etp = par.tp, par.pp, par.ep, par.expert_tp
    model.validate()

    _divides("world size", world_size, "TP*PP", tp * pp,
             f"launch a multiple of {tp * pp} processes (torchrun --nproc-per-node x --nnodes), "
             f"or change parallel.tp/parallel.pp")
    _divides("world size", world_size, "ETP*EP*PP", etp * ep * pp,
             f"launch a multiple of {etp * ep * pp} processes, or lower parallel.ep / parallel.etp")
    _divides("model.num_attention_heads", model.num_attention_heads, "TP", tp,
             "choose parallel.tp among the divisors of the head count")
    _divides("model.num_query_groups", model.num_query_groups, "TP", tp,
             "choose parallel.tp among the divisors of the key/value head count")
    _divides("model.num_experts", model.num_experts, "EP", ep,
             "choose parallel.ep among the divisors of the expert count")
    _divides("model.moe_ffn_hidden_size", model.moe_ffn_hidden_size, "ETP", etp,
             "choose parallel.etp (expert tensor parallel; defaults to tp) dividing the expert FFN size")
    _divides("model.padded_vocab_size", model.padded_vocab_size, "TP", tp,
             "raise model.make_vocab_size_divisible_by to a multiple of parallel.tp")
    stages = pp * (par.vpp or 1)
    _divides("model.num_layers", model.num_layers, "PP*VPP" if par.vpp else "PP", stages,
             "choose parallel.pp (and parallel.vpp) so every stage gets the same number of layers")
    if par.vpp is not None and (par.vpp < 1 or pp == 1):
        raise ParallelConfigError("parallel.vpp (interleaved pipeline) needs parallel.pp > 1 and vpp >= 1")
    if tp > 1 and not par.use_sequence_parallel:
        raise ParallelConfigError("MoE with TP>1 requires sequence parallelism in megatron-core: leave "
                                  "parallel.sequence_parallel unset (auto) or set it to true")
    dp = world_size // (tp * pp)
    edp = world_size // (etp * ep * pp)
    return Layout(tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, edp=edp, world_size=world_size)


def slurm_rendezvous_env() -> None:
    """Launched by ``srun`` directly (one task per GPU, no torchrun agent: examples/launch/slurm.sbatch),
    a process has SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID but not torch's RANK / WORLD_SIZE /
    LOCAL_RANK: derive them. Variables a launcher already set (torchrun) win."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])


def env_world_size() -> int:
    slurm_rendezvous_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(model: ModelConfig, par: ParallelConfig, *, seed: int = 1234,
                     timeout_minutes: float = 30) -> Layout:
    """Validate, then start torch.distributed (NCCL on GPU, gloo on CPU) and megatron's groups.

    Works under torchrun and as a plain single process (world size 1, no launcher needed).
    """
    import megatron_patches

    megatron_patches.apply()
    layout = validate_layout(model, par, env_world_size())

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # modulo: sites that bind one GPU per task (srun --gpus-per-task=1) show each process one device
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        timeout = datetime.timedelta(minutes=timeout_minutes)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's static rendezvous (--master-addr/--master-port) keeps one store across automatic
            # restarts, so a restarted group reads the dead group's keys and hangs creating megatron's
            # subgroups: each attempt gets its own key prefix.
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            store = dist.PrefixStore(f"scidfm_attempt_{restart}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout))
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tp,
            pipeline_model_parallel_size=par.pp,
            virtual_pipeline_model_parallel_size=par.vpp,
            expert_model_parallel_size=par.ep,
            expert_tensor_parallel_size=par.etp,
            distributed_timeout_minutes=timeout_minutes,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


def destroy_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
