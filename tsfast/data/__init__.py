"""Data path: GPT-2 tokenizer, TinyStories preparation, synthetic corpus, memmap loader.

    tokenizer    GPT-2 BPE through tiktoken, offline (encode, decode, EOT)
    synthetic    procedural children's stories (generate_stories, synthetic_text)
    sources      where stories come from: Hub download, text files, the generator
    prepare      CLI and API writing data/<name>/{train,val}.bin, counts.npy, meta.json
    meta         that on-disk format and its validation (DataError)
    loader       TokenData (memmaps) and the deterministic BatchSampler
    vocab        CompactVocab: only the tokens a corpus uses, plus unk

Submodules are imported on demand (`from tsfast.data.loader import TokenData`): importing
this package loads nothing, so tokenizing workers never pull in torch.
"""
