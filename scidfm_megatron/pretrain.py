"""Alias kept for existing job scripts: ``-m scidfm_megatron.pretrain ARGS`` is ``-m scidfm_megatron.train
--stage pretrain ARGS`` (scidfm_megatron/cli/train.py), which refuses an SFT recipe."""

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main(["--stage", "pretrain", *sys.argv[1:]]))
