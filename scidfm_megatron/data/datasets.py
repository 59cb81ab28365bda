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
        self.unique_identifiers = {"class": "ScienceTokenizer", "model_file": str(tok.model_file),
                                   "vocab_size": tok.vocab_size}

    def detokenize(self, ids):
        return self.tok.decode(ids)


def check_splits(prefixes: list[str], split: str, samples: tuple[int, int, int]) -> None:
    """Every source must have documents in every split that is asked for samples.

    megatron-core 0.16.1's GPTDataset loops forever computing its epoch count when a split of a source is
    empty (``_get_num_epochs`` with zero tokens per epoch), e.g. a 6-document source with a 2% validation
    split. Fail instead, naming the source, the split and the fix. Uses megatron's own split arithmetic.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                         parse_and_normalize_split)

    from ..config import ConfigError
    from .indexed import read_index_counts

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        _, n = read_index_counts(prefix)  # megatron splits a GPTDataset by documents
        for name, bounds, want in zip(("train", "valid", "test"), matrix, samples):
            if want and bounds is not None and int(round(bounds[1] * n)) - int(round(bounds[0] * n)) < 1:
                raise ConfigError(f"{prefix}: its {name} split is empty ({n} documents, data.split={split!r}) but "
                                  f"{want} {name} samples are requested; give {name} a larger share of data.split, "
                                  f"or drop evaluation (train.eval_interval: null)")


def gpt_dataset_config(blend, tokenizer, *, seq_length: int, seed: int = 1234, split: str = "98,1,1",
                       cache_dir: Optional[str] = None):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, split=split, path_to_cache=cache_dir,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        mid_level_dataset_surplus=0.005)


def epoch_seed(seed: int, epoch: int) -> int:
    """The dataset seed of mixture epoch ``epoch``: the run's seed for epoch 1, a different one for each
    later epoch. megatron's GPTDataset orders documents and samples by its ``random_seed`` alone, so with
    one seed for both stages every source that is not re-sampled would give epoch 2 the same windows in
    the same order as epoch 1. A function of (seed, epoch) only, so a resumed run sees the same order."""
    return seed if epoch <= 1 else (seed + 1_000_003 * (epoch - 1)) % 2**32


def build_pretrain_datasets(mixture: Mixture, epoch: int, tokenizer, *, seq_length: int,
                            samples: tuple[int, int, int], seed: int = 1234, split: str = "98,1,1",
                            cache_dir: Optional[str] = None, is_built_on_rank=None):
    """(train, valid, test) blended GPT datasets with ``samples`` sequences each (0 -> None), shuffled with
    :func:`epoch_seed` of (``seed``, ``epoch``)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    import torch.distributed as dist

    if not isinstance(tokenizer, MegatronTokenizerAdapter):
        tokenizer = MegatronTokenizerAdapter(tokenizer)
    check_splits(mixture.blend(epoch)[0], split, samples)
    if cache_dir and not dist.is_initialized():
        # megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() unguarded when it
        # writes its cache; a single process without a process group gains nothing from the cache.
        cache_dir = None
    config = gpt_dataset_config(mixture.blend(epoch), tokenizer, seq_length=seq_length, seed=epoch_seed(seed, epoch),
                                split=split,
                                cache_dir=cache_dir)
    from ..quiet import quiet_dataset_cache_lines

    quiet_dataset_cache_lines()  # no cache without data.cache_dir: megatron says so per dataset and start
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(samples), is_built_on_rank or (lambda: True), config)
    return builder.build()
