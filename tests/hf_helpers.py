"""Shared by the Hugging Face tests: a randomly initialised small GPT2LMHeadModel saved with
`save_pretrained`, texts for the tokenizer, and logits/greedy helpers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tsfast.data.tokenizer import EOT

SHAPE = dict(n_positions=64, n_embd=48, n_layer=2, n_head=4)  # head dim 12
# Text the tokenizer tests never trained or tuned on: several scripts, emoji, odd spacing.
HELD_OUT = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "I love ice cream 🍦🍦 and 👩‍👩‍👧 families!",
    "日本語のテキストと中文文本",
    "Привет, как дела? Ελληνικά. العربية. हिन्दी. 한국어.",
    "tabs\tand\r\nwindows newlines   and  spaces\n\n\n  end   ",
    "It's 12:45 -- they'll say \"we've won\" 1234567 times... 'd 're",
]


def random_gpt2(seed: int):
    """A GPT2LMHeadModel with every parameter random (biases and LayerNorms too, so a
    mapping that drops or swaps one shows in the logits)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SHAPE)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif ".ln_" in name or "ln_f" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    seed = random.randrange(2**31)
    path = tmp_path_factory.mktemp("gpt2") / f"random-gpt2-seed{seed}"
    random_gpt2(seed).save_pretrained(str(path))
    return path


def random_ids(n: int, seed: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(random.randrange(2**31) if seed is None else seed)
    return torch.randint(0, EOT, (1, n), generator=g)


@torch.no_grad()
def max_logit_diff(tsfast_model, hf_model, ids: torch.Tensor) -> float:
    ours = tsfast_model(ids, all_logits=True)[0]
    theirs = hf_model(ids).logits
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


@torch.no_grad()
def greedy_both(tsfast_model, hf_model, prompt: list[int], n: int) -> tuple[list[int], list[int]]:
    """n greedy tokens from each model after `prompt`, cut at the first end-of-text."""
    from tsfast.generate import generate

    ours = generate(tsfast_model, prompt, max_new_tokens=n, temperature=0.0, eos_id=None)
    out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                            pad_token_id=EOT)
    theirs = out[0, len(prompt):].tolist()

    def cut(ids):
        return ids[: ids.index(EOT)] if EOT in ids else ids

    return cut(list(ours)), cut(theirs)
