"""``-m scidfm_megatron.train``, the launch path of job scripts: runs ``scidfm_megatron.cli.train.main``
(scidfm-train). ``torchrun --nproc-per-node 2 -m scidfm_megatron.train --config examples/recipes/tiny_stage1.yaml``"""

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
