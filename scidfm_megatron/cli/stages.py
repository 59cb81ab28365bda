"""Console scripts scidfm-pretrain / scidfm-sft (run them under torchrun, or alone for one process)."""

import sys

from ..entry import main


def pretrain():
    sys.exit(main("pretrain"))


def sft():
    sys.exit(main("sft"))
