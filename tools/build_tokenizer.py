"""Thin CLI: see scidfm_megatron/cli/build_tokenizer.py (also installed as a console script)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scidfm_megatron.cli.build_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
