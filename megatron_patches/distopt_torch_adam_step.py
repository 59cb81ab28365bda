"""distopt_torch_adam_step: after a distributed-optimizer load, every parameter has its own Adam ``step``.

megatron-core's load assigns one ``step`` tensor to every parameter's state and torch's AdamW increments it
in place once per parameter, so Adam's bias correction went wrong after a resume (docs/megatron_patches.md;
checked by tests/test_training.py::test_distributed_optimizer_checkpoint_resumes)."""

import torch

from ._base import Patch, Target, wrap_once

MODULE = "megatron.core.optimizer.distrib_optimizer"


def unshare_steps(optimizer: torch.optim.Optimizer) -> int:
    """Give every parameter state its own ``step`` tensor; returns how many were shared."""
    seen, shared = set(), 0
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                shared += 1
            seen.add(id(step))
            state["step"] = step.detach().clone()
    return shared


def restore_common_step(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Set every parameter's ``step`` to the checkpoint's common step (its param groups' ``step``).

    In the ``dp_reshardable`` format megatron then loads each bucket's tensors through
    ``_set_main_param_and_optimizer_states`` with the *live* state's ``step`` among them (the dummy step
    of 1 made before loading), overwriting the common step it had just restored: a resume from such a
    checkpoint ran with Adam at step 1 (loss 9.7264 vs 9.7635 two steps after the resume, tiny EP2)."""
    groups = (state_dict.get("optimizer") or {}).get("param_groups") or []
    steps = {g["step"] for g in groups if isinstance(g, dict) and "step" in g}
    if len(steps) != 1:
        return
    step = float(steps.pop())
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = torch.tensor(step, dtype=state["step"].dtype, device=state["step"].device)


def _apply():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    def make(orig):
        def load_state_dict(self, state_dict):
            out = orig(self, state_dict)
            unshare_steps(self.optimizer)
            restore_common_step(self.optimizer, state_dict)
            return out
        return load_state_dict

    wrap_once(DO, "load_state_dict", make)


PATCH = Patch(
    name="distopt_torch_adam_step",
    when="no_te",
    summary="after a DistributedOptimizer load, torch Adam's per-parameter 'step' tensors are no longer one shared "
            "tensor",
    why="resuming with the distributed optimizer without apex/TE: one 'step' tensor shared by all parameters "
        "is incremented once per parameter per step, so Adam's bias correction is wrong after the resume",
    targets=[Target(MODULE, "DistributedOptimizer.load_state_dict", ("state_dict",)),
             Target(MODULE, "HAVE_APEX_OR_TE")],
    apply=_apply,
)
