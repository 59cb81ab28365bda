"""Alias kept for existing job scripts: ``-m scidfm_megatron.sft ARGS`` is ``-m scidfm_megatron.train
--stage sft ARGS`` (scidfm_megatron/cli/train.py), which refuses a pretraining recipe."""

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main(["--stage", "sft", *sys.argv[1:]]))
