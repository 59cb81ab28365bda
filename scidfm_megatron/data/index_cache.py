"""megatron-core's GPT / blended dataset indices at corpus scale: built once, cached, mapped (not held).

megatron-core 0.16.1's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` + ``BlendedDataset``, with
three changes made through subclasses of a GPT dataset class (over megatron's ``GPTDataset`` the sample order
is megatron's, element for element: tested; the trainer uses data/datasets.py's epoch-stable one):

* **No document-id list per source.** The builder hands every split of every source a
  ``numpy.arange(begin, end, dtype=int32)`` of its document ids, which each ``GPTDataset`` keeps for the
  whole run although a cached index never reads it: 4 bytes per document, ~3.9 GB per process for the
  967M documents of SciDFM's Table 2. :class:`LeanBuilder` passes a :class:`DocumentSpan` (begin, end)
  instead; the document index is filled from it directly (megatron_patches' gpt_lean_document_index,
  which also drops megatron's 16 bytes-per-document mgrid); without that patch :class:`LeanGPTDataset`
  makes the array only while it builds an index.
* **Built indices are mapped, not held.** After a build, the document / sample / shuffle indices (and the
  blend's dataset indices) are re-opened from the cache files with ``mmap_mode="r"``, as a cached load
  opens them: the process that built them holds no more than one that loaded them. The ``.idx`` pages
  a build read (every document's length) are released from the process (``madvise(DONTNEED)``).
* **Parallel builds within a memory budget.** Sources are built by megatron's
  ``num_dataset_builder_threads``; :data:`BUDGET` (4 GiB of index arrays under construction) makes a
  build wait while others run and it would pass the budget, so the largest sources are built alone.
* **Caches only where they are asked for.** ``path_to_cache`` is always set (megatron falls back to
  ``<data prefix>/cache/GPTDataset_indices`` when it is ``None``, i.e. writes into the corpus), and a
  process without a process group gets a one-process gloo group for the build, because
  ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unguarded when it writes its cache.

Each dataset records whether it built or loaded its index (``index_built``); :func:`build` logs the
count, which is how the trainer shows it rebuilt nothing after ``scidfm-prepare-data``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy

log = logging.getLogger("scidfm_megatron.data")


@dataclass(frozen=True)
class DocumentSpan:
    """The documents [start, stop) of one split of one source (what megatron keeps as an int32 arange)."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def array(self) -> numpy.ndarray:
        return numpy.arange(self.start, self.stop, dtype=numpy.int32)


def _mapped(path: str) -> numpy.ndarray:
    return numpy.load(path, allow_pickle=False, mmap_mode="r")


def _classes(base):
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.utils import Split

    class LeanGPTDataset(base):  # type: ignore[valid-type,misc]  # megatron's class, given at run time
        """megatron's GPTDataset over a :class:`DocumentSpan`; its indices mapped from the cache."""

        index_built = False

        def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
            span = indexed_indices
            self._reserved = 0
            try:
                super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
            finally:
                BUDGET.release(self._reserved)
            self.indices = span  # the arange a build needed is dropped
            if self.index_built:
                _drop_mapped_pages(indexed_dataset)
            if self.index_built and config.path_to_cache:
                base = os.path.join(config.path_to_cache,
                                    f"{self.unique_description_hash}-{type(self).__name__}-{index_split.name}")
                self.document_index = _mapped(f"{base}-document_index.npy")
                self.sample_index = _mapped(f"{base}-sample_index.npy")
                self.shuffle_index = _mapped(f"{base}-shuffle_index.npy")

        def _get_num_tokens_per_epoch(self) -> int:
            # Called first (and only) when megatron builds the index: the one place the ids are needed.
            if isinstance(self.indices, DocumentSpan):
                import megatron.core.datasets.gpt_dataset as gd

                span = self.indices
                self.index_built = True
                if not getattr(gd._build_document_index, "__scidfm_patched__", False):
                    self.indices = span.array()  # megatron's own function needs the ids as an array
                lengths = self.dataset.sequence_lengths[span.start:span.stop]
                tokens = int(numpy.sum(lengths, dtype=numpy.int64))
                # what megatron's build will hold: the document index (4 B per document and epoch), its
                # copy of the source's lengths, the sample (8-16 B) and shuffle (4-8 B) indices
                epochs = self._get_num_epochs(tokens) if tokens else 1
                self._reserved = (4 * len(span) * epochs + 4 * len(self.dataset.sequence_lengths)
                                  + 24 * (epochs * tokens // self.config.sequence_length + 1))
                BUDGET.acquire(self._reserved)
                return tokens
            return super()._get_num_tokens_per_epoch()

    class LeanBlendedDataset(BlendedDataset):
        """megatron's BlendedDataset; after a build its indices are mapped from the cache."""

        def __init__(self, datasets, weights, size, config):
            super().__init__(datasets, weights, size, config)
            self.index_built = not isinstance(self.dataset_index, numpy.memmap)  # type: ignore[has-type]  # megatron's
            if self.index_built and config.path_to_cache:
                base = os.path.join(config.path_to_cache,
                                    f"{self.unique_description_hash}-{type(self).__name__}-{self.split.name}")
                self.dataset_index = _mapped(f"{base}-dataset_index.npy")
                self.dataset_sample_index = _mapped(f"{base}-dataset_sample_index.npy")

    class LeanBuilder(BlendedMegatronDatasetBuilder):
        """megatron's builder, handing each split a :class:`DocumentSpan` instead of an id array."""

        def _build_megatron_dataset_splits(self, dataset_path, split, sizes, synchronize_ranks=True):
            import torch

            if torch.distributed.is_initialized() and not self.is_built_on_rank():
                for i in range(len(Split)):
                    if split[i] is not None and synchronize_ranks:
                        torch.distributed.barrier()
                return [None] * len(Split)
            low_level = self.cls.build_low_level_dataset(dataset_path, self.config)
            n = self.cls.numel_low_level_dataset(low_level)
            out: list = []
            for i, name in enumerate(Split):
                if split[i] is None:
                    out.append(None)
                    continue
                span = DocumentSpan(int(round(split[i][0] * float(n))), int(round(split[i][1] * float(n))))
                out.append(self.build_generic_dataset(self.cls, self.is_built_on_rank, synchronize_ranks, low_level,
                                                      dataset_path, span, sizes[i], name, self.config))
            return out

        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            cls = LeanBlendedDataset if cls is BlendedDataset else cls
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)

    return LeanGPTDataset, LeanBlendedDataset, LeanBuilder


class BuildBudget:
    """Bytes of index arrays being built at once, across builder threads: a build waits while others
    hold memory and it would exceed ``limit``; one build always runs (however large). Keeps the largest
    sources (PubChem's 458M documents: ~5.5 GB of arrays) from being built side by side."""

    def __init__(self, limit: int):
        import threading

        self.limit, self.used, self._cv = limit, 0, threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cv:
            while self.used and self.used + n > self.limit:
                self._cv.wait()
            self.used += n

    def release(self, n: int) -> None:
        if n:
            with self._cv:
                self.used -= n
                self._cv.notify_all()


BUDGET = BuildBudget(4 << 30)


def _drop_mapped_pages(indexed_dataset) -> None:
    """Unmap the .idx pages a build read (the page cache keeps them): a source's lengths are read once,
    and would otherwise stay resident in this process for the whole run (4 B per document)."""
    import mmap

    buf = getattr(getattr(indexed_dataset, "index", None), "bin_buffer_mmap", None)
    raw = getattr(buf, "_mmap", None)
    if raw is not None and hasattr(raw, "madvise"):
        try:
            raw.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


_CLASSES: dict = {}


def classes(base=None):
    """(LeanGPTDataset, LeanBlendedDataset, LeanBuilder) over the GPT dataset class ``base`` (megatron's
    GPTDataset by default), made once per base (megatron imported on first use)."""
    if base is None:
        from megatron.core.datasets.gpt_dataset import GPTDataset as base  # type: ignore[no-redef]
    if base not in _CLASSES:
        _CLASSES[base] = _classes(base)
    return _CLASSES[base]


@contextlib.contextmanager
def process_group():
    """A one-process gloo group when none exists (megatron's BlendedDataset needs a rank to write its
    cache); the caller's group otherwise."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def temporary_cache_dir() -> str:
    """A cache directory for this process only (removed at exit): for callers that keep no cache."""
    path = tempfile.mkdtemp(prefix="scidfm-index-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def members(datasets) -> list:
    """Every GPT and blended dataset under ``datasets`` (each once)."""
    seen, out = set(), []
    stack = [d for d in datasets if d is not None]
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        out.append(d)
        stack.extend(x for x in getattr(d, "datasets", []) or [] if x is not None)
    return out


def apply_lean_patch() -> None:
    """Install megatron_patches' ``gpt_lean_document_index`` alone (data tools need none of the CPU
    runtime patches), unless SCIDFM_DISABLE_PATCHES names it."""
    import megatron_patches
    from megatron_patches import gpt_lean_document_index

    megatron_patches.check_version()
    name = gpt_lean_document_index.PATCH.name
    if name not in os.environ.get("SCIDFM_DISABLE_PATCHES", "").replace(" ", "").split(","):
        gpt_lean_document_index.PATCH.apply()


def build(config, sizes, is_built_on_rank, base=None):
    """megatron's builder with the lean classes over ``base`` (megatron's GPTDataset by default; the
    trainer passes data/datasets.py's epoch-stable one); logs how many indices were built and loaded."""
    import torch.distributed as dist

    apply_lean_patch()
    gpt, _, builder_cls = classes(base)
    t0 = time.perf_counter()
    with process_group():
        datasets = builder_cls(gpt, sizes, is_built_on_rank, config).build()
    seconds = time.perf_counter() - t0
    parts = members(datasets)
    built = sum(bool(getattr(d, "index_built", False)) for d in parts)
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("dataset indices: %d built, %d loaded from %s (%.1f s)", built, len(parts) - built,
                 config.path_to_cache, seconds)
    return datasets
