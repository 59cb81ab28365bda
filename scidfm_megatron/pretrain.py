"""Pretraining entrypoint (SciDFM stages 1 and 2):

    torchrun --nproc-per-node 2 -m scidfm_megatron.pretrain --config examples/recipes/tiny_stage1.yaml
"""

import sys

from .entry import main

if __name__ == "__main__":
    sys.exit(main("pretrain"))
