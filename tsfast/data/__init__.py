"""Data path: GPT-2 tokenizer, TinyStories preparation, synthetic corpus, memmap loader.

Submodules are imported on demand (`from tsfast.data.loader import TokenData`): importing
this package loads nothing, so tokenizer workers never pull in torch.
"""
