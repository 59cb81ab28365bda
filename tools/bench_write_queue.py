"""Launcher: the code and its documentation are in the module; same as `python -m scidfm_megatron.bench.write_queue`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without the project installed
from scidfm_megatron.bench.write_queue import main

sys.exit(main())
