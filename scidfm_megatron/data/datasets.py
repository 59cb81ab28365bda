"""Pretraining datasets: megatron-core's BlendedMegatronDatasetBuilder over a mixture's blend."""

from __future__ import annotations

from typing import Optional

from .mixture import Mixture


class MegatronTokenizerAdapter:
    """What megatron-core's GPT datasets need from a tokenizer (ids, and a stable cache identity)."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.vocab_size
        self.eod = tok.eod_id
        self.pad = tok.pad_id
        self.unique_identifiers = {"class": type(tok).__name__, "model_file": str(tok.model_file),
                                   "vocab_size": tok.vocab_size}

    def detokenize(self, ids):
        return self.tok.decode(ids)


def check_splits(prefixes: list[str], split: str, samples: tuple[int, int, int]) -> None:
    """Every source must have documents in every split that is asked for samples.

    megatron-core 0.16.1's GPTDataset loops forever computing its epoch count when a split of a source is
    empty (``_get_num_epochs`` with zero tokens per epoch), e.g. a 6-document source with a 2% validation
    split. Fail instead, naming the source, the split and the fix. Uses megatron's own split arithmetic.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from ..config import ConfigError
    from .indexed import read_index_counts

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        _, n = read_index_counts(prefix)  # megatron splits a GPTDataset by documents
        for name, bounds, want in zip(("train", "valid", "test"), matrix, samples, strict=False):
            if want and bounds is not None and int(round(bounds[1] * n)) - int(round(bounds[0] * n)) < 1:
                raise ConfigError(f"{prefix}: its {name} split is empty ({n} documents, data.split={split!r}) but "
                                  f"{want} {name} samples are requested; give {name} a larger share of data.split, "
                                  f"or drop evaluation (train.eval_interval: null)")


def gpt_dataset_config(blend, tokenizer, *, seq_length: int, seed: int = 1234, split: str = "98,1,1",
                       cache_dir: Optional[str] = None, threads: int = 1):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    # create_attention_mask=False: megatron's GPTDataset would otherwise build a seq x seq causal mask on
    # the first read of every source (8192^2 floats, ~2 GiB transient at 1/50 scale) that nothing here
    # reads: the step passes no mask for pretraining (causal kernels), SFT packing builds its own.
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, split=split, path_to_cache=cache_dir,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mid_level_dataset_surplus=0.005, num_dataset_builder_threads=threads)


def epoch_seed(seed: int, epoch: int) -> int:
    """The dataset seed of mixture epoch ``epoch``: the run's seed for epoch 1, a different one for each
    later epoch. megatron's GPTDataset orders documents and samples by its ``random_seed`` alone, so with
    one seed for both stages every source that is not re-sampled would give epoch 2 the same windows in
    the same order as epoch 1. A function of (seed, epoch) only, so a resumed run sees the same order."""
    return seed if epoch <= 1 else (seed + 1_000_003 * (epoch - 1)) % 2**32


def _stable_gpt_dataset():
    """megatron-core's GPTDataset with an index whose first N samples do not depend on how many the run
    plans (defined lazily: megatron is imported only when datasets are built)."""
    global _STABLE
    if _STABLE is None:
        from megatron.core.datasets.gpt_dataset import GPTDataset

        class EpochStableGPTDataset(GPTDataset):
            """GPTDataset whose document and sample order is decided epoch by epoch.

            megatron's GPTDataset plans ``num_epochs`` passes over a source (from the samples the run asks
            for), then shuffles the documents of *all* those epochs together, and the samples of all of
            them together (the last epoch apart when it is used less than 80%). So the order of the very
            first samples depends on the planned total: a run lengthened by ``train.train_iters`` that
            needs one more epoch of some source would see that source reordered from sample 0, and a
            resume would silently train on other data. Here epoch e's documents are shuffled by their own
            ``RandomState`` (the dataset seed for e = 0, ``[seed, e]`` after), and each sample is shuffled
            only among the samples that end in the same epoch, by that epoch's generator after its
            documents. Planning more epochs appends; sample i is the same for every plan that includes it.
            With one epoch planned the index is megatron's, array for array (the same generator calls)."""

            def _build_document_sample_shuffle_indices(self):
                import os

                import numpy
                import torch
                from megatron.core.datasets import helpers
                from megatron.core.datasets.utils import Split

                cache = self.config.path_to_cache  # always set (data/index_cache.py): never the data root
                names = ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy")
                base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
                paths = [os.path.join(cache, f"{base}-{n}") for n in names] if cache else []
                if paths and all(map(os.path.isfile, paths)):
                    return tuple(numpy.load(p, allow_pickle=True, mmap_mode="r") for p in paths[1:])
                seq, extra = self.config.sequence_length, int(self.config.add_extra_token_to_sequence)
                per_epoch = self._get_num_tokens_per_epoch()
                epochs = self._get_num_epochs(per_epoch)
                seed = self.config.random_seed
                rngs = [numpy.random.RandomState(seed if e == 0 else [seed % 2**32, e]) for e in range(epochs)]
                docs = self.indices  # an id array, or data/index_cache.py's DocumentSpan (ids start..stop)
                n_docs = len(docs)
                document_index = numpy.empty(epochs * n_docs, dtype=numpy.int32)
                for e, rng in enumerate(rngs):  # filled and shuffled in place: a 1-D view draws the same swaps
                    part = document_index[e * n_docs:(e + 1) * n_docs]
                    if hasattr(docs, "start"):
                        for a in range(0, n_docs, 1 << 24):  # chunk by chunk: the ids are never held twice
                            b = min(n_docs, a + (1 << 24))
                            part[a:b] = numpy.arange(docs.start + a, docs.start + b, dtype=numpy.int32)
                    else:
                        part[:] = docs
                    rng.shuffle(part)
                drop_last = True if self.index_split != Split.valid else \
                    self.config.drop_last_partial_validation_sequence
                lengths = self.dataset.sequence_lengths  # read into memory when most of it is used (as megatron)
                lengths = lengths.copy() if len(document_index) * 2 > len(lengths) else lengths
                sample_index = helpers.build_sample_idx(lengths, document_index, seq, epochs, per_epoch, drop_last,
                                                        extra)
                n = sample_index.shape[0] - 1
                dtype = numpy.uint32 if n < numpy.iinfo(numpy.uint32).max - 1 else numpy.int64
                shuffle_index, start = numpy.arange(n, dtype=dtype), 0
                for e, rng in enumerate(rngs):  # the samples that end within epoch e, shuffled by its generator
                    end = n if e == epochs - 1 else min(n, ((e + 1) * per_epoch - extra) // seq)
                    rng.shuffle(shuffle_index[start:end])
                    start = end
                if paths and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
                    os.makedirs(cache, exist_ok=True)
                    for p, arr in zip(paths[1:], (document_index, sample_index, shuffle_index), strict=False):
                        with open(p + ".tmp", "wb") as f:
                            numpy.save(f, arr, allow_pickle=True)
                        os.replace(p + ".tmp", p)
                    with open(paths[0] + ".tmp", "w") as f:  # written last: the cache is complete
                        f.write(self.unique_description)
                    os.replace(paths[0] + ".tmp", paths[0])
                return document_index, sample_index, shuffle_index

        _STABLE = EpochStableGPTDataset
    return _STABLE


_STABLE: Optional[type] = None


def build_pretrain_datasets(mixture: Mixture, epoch: int, tokenizer, *, seq_length: int,
                            samples: tuple[int, int, int], seed: int = 1234, split: str = "98,1,1",
                            cache_dir: Optional[str] = None, is_built_on_rank=None, threads: int = 1,
                            gpt_class=None):
    """(train, valid, test) blended GPT datasets with ``samples`` sequences each (0 -> None), shuffled with
    :func:`epoch_seed` of (``seed``, ``epoch``). Sample i is the same for any ``samples`` that includes it
    (a longer run keeps the data of a shorter one: :func:`_stable_gpt_dataset`); ``gpt_class`` (megatron's
    GPTDataset in a test) replaces that index.

    Every index megatron builds or loads lives under ``cache_dir`` (``None``: a temporary directory of
    this call), never next to the data (:mod:`.index_cache`). ``threads`` sources are built in parallel."""
    from . import index_cache

    if not isinstance(tokenizer, MegatronTokenizerAdapter):
        tokenizer = MegatronTokenizerAdapter(tokenizer)
    check_splits(mixture.blend(epoch)[0], split, samples)
    if cache_dir is None:
        cache_dir = index_cache.temporary_cache_dir()
    config = gpt_dataset_config(mixture.blend(epoch), tokenizer, seq_length=seq_length, seed=epoch_seed(seed, epoch),
                                split=split, cache_dir=str(cache_dir), threads=max(1, int(threads)))
    return index_cache.build(config, list(samples), is_built_on_rank or (lambda: True),
                             base=gpt_class or _stable_gpt_dataset())
