"""Hugging Face interop: start from GPT-2's weights, export to `transformers`, read exports back.

    convert.py    tsfast weights and config <-> GPT2LMHeadModel / GPTNeoXForCausalLM (torch only)
    load.py       a local directory or a Hub repo id -> a tsfast model (`--ckpt`, `--init_from`)
    tokenizer.py  GPT-2's tokenizer files for `AutoTokenizer`, rebuilt from tsfast's ranks
    card.py       the model card (README.md) of an export
`python -m tsfast.export` writes an export and pushes it to the Hub.

Reading needs `safetensors`, exporting `transformers` too: the `hf` extra
(`uv run python ...` in a checkout, whose environment has every extra, or `pip install 'tinystories-fast[hf]'`). Importing this package
imports none of them.
"""
