"""Training entry point; the stage (pretrain or sft) comes from the recipe's ``train.stage``:

    torchrun --nproc-per-node 2 -m scidfm_megatron.train --config examples/recipes/tiny_stage1.yaml
"""

import sys

from .entry import main

if __name__ == "__main__":
    sys.exit(main())
