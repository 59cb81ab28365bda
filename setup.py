"""scidfm-megatron: SciDFM (18.2B-parameter MoE LLM for science) on megatron-core.

Install torch first (the CPU or CUDA build you want), then ``pip install -e .[test]``:
otherwise pip resolves torch==2.13.0 from PyPI, which on Linux is the multi-GB CUDA build.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "numpy==2.4.6",
    "psutil==7.2.2",  # megatron dist_checkpointing's torch_dist writer needs it but does not declare it
    "PyYAML==6.0.3",
    "sentencepiece==0.2.3",
    "tensorboard==2.21.0",
    "tqdm==4.70.1",
    "zstandard==0.25.0",  # .jsonl.zst corpora
]

EXTRAS = {
    # GPU fast path: fused kernels and grouped-GEMM experts. Needs CUDA; never required.
    "gpu": ["transformer-engine[pytorch]==2.20.2"],
    "hf": ["transformers==5.23.0", "safetensors==0.8.0"],
    "eval": ["rdkit==2026.9.1", "rouge-score==0.1.2", "scikit-learn==1.9.1", "rapidfuzz==3.14.6", "selfies==2.2.0",
             "matplotlib==3.11.2", "lm-eval==0.4.13",
             "accelerate==1.15.0"],  # lm-eval's hf model imports accelerate without declaring it
    "test": ["pytest==9.2.0", "pytest-timeout==2.4.0"],
    "dev": ["ruff==0.17.6", "mypy==2.4.1", "pre-commit==4.7.0"],  # checks configured in pyproject.toml
    # Preprocessing: GigaToken for the base BPE (ids checked equal to SentencePiece's; without it,
    # SentencePiece), parquet inputs. Never required.
    "fast": ["gigatoken==0.10.0"],
    "parquet": ["pyarrow==26.0.1"],
}
EXTRAS["all-cpu"] = sorted({r for k, v in EXTRAS.items() if k not in ("gpu", "dev") for r in v})

setup(
    name="scidfm-megatron",
    version="0.1.0",
    description="Train, convert and evaluate SciDFM-style science MoE LLMs on megatron-core "
                "(TP/PP/EP/DP; CPU+gloo to multi-node GPUs)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["scidfm_megatron", "scidfm_megatron.*", "megatron_patches"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "scidfm-info=scidfm_megatron.cli.info:main",
        "scidfm-build-tokenizer=scidfm_megatron.cli.build_tokenizer:main",
        "scidfm-preprocess=scidfm_megatron.cli.preprocess:main",
        "scidfm-mixture=scidfm_megatron.cli.mixture:main",
        "scidfm-prepare-data=scidfm_megatron.data.prepare:main",
        "scidfm-train=scidfm_megatron.cli.stages:train",
        "scidfm-pretrain=scidfm_megatron.cli.stages:pretrain",
        "scidfm-sft=scidfm_megatron.cli.stages:sft",
        "scidfm-convert=scidfm_megatron.cli.convert:main",
        "scidfm-evaluate=scidfm_megatron.eval.harness:main",
        "scidfm-eval-data=scidfm_megatron.eval.converters:main",
        "scidfm-analyze-experts=scidfm_megatron.eval.experts:main",
    ]},
    license="Apache-2.0",
)
