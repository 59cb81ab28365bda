"""Benchmarks of the project's pieces (training throughput, conversion, checkpoints, preprocessing, the
dataset-index cache) and a burn-in run; each module is runnable (``python -m scidfm_megatron.bench.X``) and
launched by ``tools/bench_X.py``. They read the repository's examples/ and scripts/: run them from a checkout.
"""
