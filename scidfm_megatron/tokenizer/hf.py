"""Hugging Face tokenizer files for an extended science tokenizer.

``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)`` loads them: the tokenizer code is
``core.py`` of this package copied as ``tokenization_scidfm.py`` (it needs only sentencepiece), because
span-aware segmentation is not expressible in a ``tokenizer.json`` pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import core

HF_CODE_FILE = "tokenization_scidfm.py"


def write_hf_tokenizer_files(directory: str | Path, tok: "core.ScienceTokenizer", model_max_length: int = 8192) -> None:
    d = Path(directory)
    shutil.copyfile(Path(core.__file__), d / HF_CODE_FILE)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": core.PAD}
    config = {
        "tokenizer_class": "SciDFMTokenizer",
        "auto_map": {"AutoTokenizer": [f"{HF_CODE_FILE[:-3]}.SciDFMTokenizer", None]},
        "add_bos_token": True,
        "model_max_length": model_max_length,
        "chat_template": core.CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": [core.EOD, core.SYSTEM, core.USER, core.ASSISTANT],
        **specials,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps(
        dict(specials, additional_special_tokens=[core.EOD, core.SYSTEM, core.USER, core.ASSISTANT]), indent=2))
