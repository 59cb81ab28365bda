"""Data: raw corpora -> Megatron .bin/.idx, mixtures, pretraining and SFT datasets."""
