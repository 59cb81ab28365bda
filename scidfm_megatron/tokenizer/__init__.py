"""Science tokenizer: SentencePiece BPE + molecule (SMILES) and protein spans. See core.py."""

from .core import (
    ASSISTANT,
    EOD,
    MOL_END,
    MOL_START,
    PAD,
    PROT_END,
    PROT_START,
    SYSTEM,
    USER,
    ScienceTokenizer,
    chat_segments,
    split_smiles,
    wrap_molecule,
    wrap_protein,
)

__all__ = ["ASSISTANT", "EOD", "MOL_END", "MOL_START", "PAD", "PROT_END", "PROT_START", "SYSTEM", "USER",
           "ScienceTokenizer", "chat_segments", "split_smiles", "wrap_molecule", "wrap_protein"]
