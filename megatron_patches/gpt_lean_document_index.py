"""gpt_lean_document_index: megatron's GPT document index built in int32, in place, without the mgrid.

``gpt_dataset._build_document_index`` builds ``numpy.mgrid[0:num_epochs, 0:len(documents)]``: an int64
array of shape (2, epochs, documents), 16 bytes per document and epoch, then an int32 copy, to end with 4.
At the corpus scale of SciDFM's Table 2 (PubChem alone 458M documents, two epochs) that is, by
arithmetic, a 14.7 GB transient for one source: the bulk of the 18.4 GiB peak issue 23 measured. The replacement fills
one int32 array epoch by epoch and shuffles it (or its leading ``epochs - 1`` epochs and its final epoch
separately, as megatron does with ``separate_final_epoch``) with the same ``RandomState`` calls in the
same order: numpy's legacy 1-D ``shuffle`` draws the same swaps whatever the item size, so the index is
equal element for element (tests/test_data_cache.py compares it with megatron's own function).
"""

from ._base import Patch, Target, mark_patched, wrap_once

MODULE = "megatron.core.datasets.gpt_dataset"


_FILL = 1 << 24


def build_document_index(documents, num_epochs, numpy_random_state, separate_final_epoch):
    """megatron's ``_build_document_index``; ``documents`` may also be a range-like object with ``start``
    and ``stop`` (scidfm_megatron's DocumentSpan): the ids are then written chunk by chunk, never held
    as a separate array."""
    import numpy

    span = (documents.start, documents.stop) if hasattr(documents, "start") and hasattr(documents, "stop") else None
    if span is None:
        documents = numpy.asarray(documents)
    n = len(documents)
    out = numpy.empty(num_epochs * n, dtype=numpy.int32)
    for e in range(num_epochs):
        if span is None:
            out[e * n:(e + 1) * n] = documents
        else:
            for a in range(0, n, _FILL):
                b = min(n, a + _FILL)
                out[e * n + a:e * n + b] = numpy.arange(span[0] + a, span[0] + b, dtype=numpy.int32)
    if not separate_final_epoch or num_epochs == 1:
        numpy_random_state.shuffle(out)
    else:
        numpy_random_state.shuffle(out[:(num_epochs - 1) * n])
        numpy_random_state.shuffle(out[(num_epochs - 1) * n:])
    return out


def _apply():
    import megatron.core.datasets.gpt_dataset as gd

    def install(original):
        mark_patched(build_document_index, __wrapped_original__=original)  # tests compare with megatron's own
        return build_document_index

    wrap_once(gd, "_build_document_index", install)


PATCH = Patch(
    name="gpt_lean_document_index",
    when="always",
    summary="GPT document index built in int32 in place (same values), not through a 16 B/document mgrid",
    why="a cold index build of the Table-2 corpus peaked at 18.4 GiB (PubChem's two-epoch mgrid: 14.7 GB)",
    targets=[Target(MODULE, "_build_document_index",
                    ("documents", "num_epochs", "numpy_random_state", "separate_final_epoch"))],
    apply=_apply,
)
