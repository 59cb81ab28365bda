"""Instruction-tuning entrypoint:

    torchrun --nproc-per-node 2 -m scidfm_megatron.sft --config examples/recipes/tiny_sft.yaml
"""

import sys

from .entry import main

if __name__ == "__main__":
    sys.exit(main("sft"))
