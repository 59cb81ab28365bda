"""distopt_torch_adam_load: distributed-optimizer checkpoints load with torch's Adam (no apex / TE).

Without apex or TransformerEngine, megatron-core falls back to ``torch.optim.AdamW``, which keeps a
per-parameter ``step`` tensor in its state. ``DistributedOptimizer`` saves ``step`` once, in its common
state (``state_dict()`` has a branch for exactly this case), but on load
``_set_main_param_and_optimizer_states`` copies *every* key of the live state from the loaded tensors,
so it raises ``KeyError: 'step'``; and with fp32 parameters the main params are views of leaf
parameters that require grad, so its in-place ``copy_`` raises "a view of a leaf Variable that requires
grad is being used in an in-place operation". The patch supplies the missing keys from the live state
(a no-op copy: ``step`` is restored from the common state) and runs the copy under ``no_grad``.
"""

import torch

from ._base import Patch, Target, wrap_once

MODULE = "megatron.core.optimizer.distrib_optimizer"


def _apply():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    def make(orig):
        @torch.no_grad()
        def _set_main_param_and_optimizer_states(self, model_param, tensors):
            if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                group_index, group_order = self.model_param_group_index_map[model_param]
                main_param = self.optimizer.param_groups[group_index]["params"][group_order]
                live = self.optimizer.state[main_param]
                missing = {k: v for k, v in live.items() if k not in tensors}
                if missing:
                    tensors = {**tensors, **missing}
            return orig(self, model_param, tensors)
        return _set_main_param_and_optimizer_states

    wrap_once(DO, "_set_main_param_and_optimizer_states", make)


PATCH = Patch(
    name="distopt_torch_adam_load",
    when="no_te",
    summary="DistributedOptimizer checkpoint load tolerates torch Adam's per-param 'step' and fp32 leaf views",
    why="resuming a distributed-optimizer checkpoint without apex/TE: KeyError: 'step' in "
        "_set_main_param_and_optimizer_states (and an in-place copy into a leaf view with fp32)",
    targets=[Target(MODULE, "DistributedOptimizer._set_main_param_and_optimizer_states", ("model_param", "tensors")),
             Target(MODULE, "DistributedOptimizer._init_optimizer_states_with_dummy_values"),
             Target(MODULE, "HAVE_APEX_OR_TE")],
    apply=_apply,
)
