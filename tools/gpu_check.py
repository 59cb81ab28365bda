"""Launcher (scripts/gpu_check.sh runs it): the check is `python -m scidfm_megatron.testing.gpu_check`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without the project installed
from scidfm_megatron.testing.gpu_check import main

sys.exit(main())
