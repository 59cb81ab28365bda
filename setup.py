"""scidfm-megatron: SciDFM (18.2B-parameter MoE LLM for science) on megatron-core.

Dependencies are ranges (what the code needs), so ``pip install -e .`` on a GPU image keeps the image's own
torch build (any torch >= 2.6, megatron-core 0.16.1's own floor; tested: 2.13.0 here). The exact versions
this project's CI and scripts install live in ``constraints.txt``:
``pip install -c constraints.txt -e .[test]`` (scripts/setup_env.sh does that, after installing torch first:
otherwise pip resolves torch from PyPI, which on Linux is the multi-GB CUDA build).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.6.0",  # megatron-core 0.16.1 requires torch>=2.6.0; nothing here asserts a torch version
    # megatron_patches are written for this release and refuse any other at import (check_version): the one
    # exact requirement, because any other version fails there anyway.
    "megatron-core==0.16.1",
    "numpy>=1.26,<3",
    "psutil>=5.9",  # megatron dist_checkpointing's torch_dist writer needs it but does not declare it
    "PyYAML>=6.0",
    "sentencepiece>=0.2.0",
    "tensorboard>=2.15",
    "tqdm>=4.66",
    "zstandard>=0.22",  # .jsonl.zst corpora
]

EXTRAS = {
    # GPU fast path: fused kernels and grouped-GEMM experts. Needs CUDA; never required.
    "gpu": ["transformer-engine[pytorch]>=2.9"],
    "hf": ["transformers>=5.17,<6", "safetensors>=0.4.3"],
    "eval": ["rdkit>=2024.3.1", "rouge-score>=0.1.2", "scikit-learn>=1.4", "rapidfuzz>=3.0", "selfies>=2.1",
             "matplotlib>=3.8", "lm-eval>=0.4.8,<0.5",
             "accelerate>=1.0"],  # lm-eval's hf model imports accelerate without declaring it
    "test": ["pytest>=8.0", "pytest-timeout>=2.3"],
    "dev": ["ruff>=0.15", "mypy>=1.15", "pre-commit>=3.0"],  # checks configured in pyproject.toml
    # Preprocessing: GigaToken for the base BPE (ids checked equal to SentencePiece's; without it,
    # SentencePiece), parquet inputs. Never required.
    "fast": ["gigatoken>=0.10"],
    "parquet": ["pyarrow>=14"],
}
EXTRAS["all-cpu"] = sorted({r for k, v in EXTRAS.items() if k not in ("gpu", "dev") for r in v})

setup(
    name="scidfm-megatron",
    version="0.1.0",
    description="Train, convert and evaluate SciDFM-style science MoE LLMs on megatron-core "
                "(TP/PP/EP/DP; CPU+gloo to multi-node GPUs)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # 3.11 tested here; 3.12: the GPU images (docs/gpu.md)
    packages=find_packages(include=["scidfm_megatron", "scidfm_megatron.*", "megatron_patches"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "scidfm-info=scidfm_megatron.cli.info:main",
        "scidfm-build-tokenizer=scidfm_megatron.cli.build_tokenizer:main",
        "scidfm-preprocess=scidfm_megatron.cli.preprocess:main",
        "scidfm-merge-data=scidfm_megatron.cli.merge_data:main",
        "scidfm-mixture=scidfm_megatron.cli.mixture:main",
        "scidfm-prepare-data=scidfm_megatron.cli.prepare_data:main",
        "scidfm-train=scidfm_megatron.cli.train:main",
        "scidfm-pretrain=scidfm_megatron.cli.train:pretrain",
        "scidfm-sft=scidfm_megatron.cli.train:sft",
        "scidfm-convert=scidfm_megatron.cli.convert:main",
        "scidfm-evaluate=scidfm_megatron.cli.evaluate:main",
        "scidfm-eval-data=scidfm_megatron.cli.eval_data:main",
        "scidfm-analyze-experts=scidfm_megatron.cli.analyze_experts:main",
    ]},
    license="Apache-2.0",
)
