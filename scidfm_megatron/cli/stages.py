"""Console scripts scidfm-train (stage from the recipe) and its aliases scidfm-pretrain / scidfm-sft
(run them under torchrun, or alone for one process)."""

import sys

from ..entry import main


def train():
    sys.exit(main())


def pretrain():
    sys.exit(main("pretrain"))


def sft():
    sys.exit(main("sft"))
