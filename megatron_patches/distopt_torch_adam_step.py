"""distopt_torch_adam_step: after a distributed-optimizer load, every parameter has its own Adam ``step``.

Without apex or TransformerEngine, megatron-core's optimizer is ``torch.optim.AdamW``, which keeps a
per-parameter ``step`` tensor and increments it in place (``step_t += 1``) for each parameter it updates.
``DistributedOptimizer.load_state_dict`` restores ``step`` from its common state by assigning *one*
tensor to every parameter's state (``s["step"] = step`` in a loop), and torch's ``load_state_dict`` keeps
that object as is on the CPU. After a resume, every optimizer step therefore adds the number of
parameters to the shared counter: at iteration 12 of a run resumed at 2 the stored step read 100 (dense)
and 260 (experts) instead of 12, Adam's bias corrections were wrong from the second step after the
resume, and the losses left the uninterrupted run's (9.7943 vs 9.7882 at step 4, tiny EP2).

The patch runs megatron's load, then gives each parameter's state its own copy of ``step``. Symptom
check: tests/test_training.py::test_distributed_optimizer_checkpoint_resumes (the resume is bitwise for
every step after it, and the saved step equals the iteration; with the patch disabled both fail).
"""

import torch

from ._base import Patch, Target

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


def _apply():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    orig = DO.load_state_dict
    if getattr(orig, "__scidfm_patched__", False):
        return

    def load_state_dict(self, state_dict):
        out = orig(self, state_dict)
        unshare_steps(self.optimizer)
        return out

    load_state_dict.__scidfm_patched__ = True
    DO.load_state_dict = load_state_dict


PATCH = Patch(
    name="distopt_torch_adam_step",
    when="no_te",
    summary="after a DistributedOptimizer load, torch Adam's per-parameter 'step' tensors are no longer one shared tensor",
    why="resuming with the distributed optimizer without apex/TE: one 'step' tensor shared by all parameters "
        "is incremented once per parameter per step, so Adam's bias correction is wrong after the resume",
    targets=[Target(MODULE, "DistributedOptimizer.load_state_dict", ("state_dict",)),
             Target(MODULE, "HAVE_APEX_OR_TE")],
    apply=_apply,
)
