"""Thin CLI: see scidfm_megatron/cli/mixture.py (also installed as scidfm-mixture)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scidfm_megatron.cli.mixture import main

if __name__ == "__main__":
    sys.exit(main())
