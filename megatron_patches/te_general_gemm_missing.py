"""te_general_gemm_missing: define ``moe_utils.te_general_gemm = None`` when TransformerEngine is absent.

megatron-core 0.16.1 imports ``te_general_gemm`` inside a ``try`` that only runs with TE, but the MoE
router's ``RouterGatingLinearFunction`` tests ``if te_general_gemm is not None`` unconditionally, so
without TE (CPU, or a GPU without TE) the first router call raises ``NameError: te_general_gemm``.
Setting the name to None selects the router's own ``torch.mm`` branch, which is what the code intends.
"""

from ._base import Patch, Target

MODULE = "megatron.core.transformer.moe.moe_utils"


def _apply():
    import megatron.core.transformer.moe.moe_utils as mu

    if not getattr(mu, "HAVE_TE", False) and not hasattr(mu, "te_general_gemm"):
        mu.te_general_gemm = None


PATCH = Patch(
    name="te_general_gemm_missing",
    when="no_te",
    summary="define moe_utils.te_general_gemm = None so the MoE router uses torch.mm without TE",
    why="RouterGatingLinearFunction.forward raises NameError: te_general_gemm when TE is not installed",
    targets=[Target(MODULE, "RouterGatingLinearFunction.forward", ("inp", "weight", "bias", "router_dtype")),
             Target(MODULE, "HAVE_TE")],
    apply=_apply,
)
