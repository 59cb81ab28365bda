"""Greedy generation from a converted Hugging Face folder through transformers alone (what a user of the
converted model runs; no scidfm-megatron code is imported).

    python tools/hf_generate.py --model runs/tiny/hf --prompt "What is the SMILES of ethanol?" [--chat]
"""
import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn (chat template)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    a = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(a.model, trust_remote_code=True)  # the science tokenizer's code
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()  # plain Mixtral
    for p in a.prompt:
        if a.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False)
        print(f"--- {p!r}\n{tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
