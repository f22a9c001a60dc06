"""Which corpus a run trains on, its vocabulary, and the batch samplers.

Batches come from `tsfast.data.loader.BatchSampler`, deterministic in (seed, rank, stream,
index), so the data position of a run is just its step:

    train       stream "train", rank = the process' rank, index = step * accum + micro-step
    eval train  stream "eval_train" over the train split, indices 0 .. eval_iters-1
    eval val    stream "val" over the val split, indices 0 .. eval_iters-1

Evaluation therefore never draws from the training stream, and a resumed run draws exactly
the batches the uninterrupted run would have. With `doc_mask` every sampler (training and
evaluation alike) also gives the batch's document ids, from the end-of-text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tsfast.config import TrainConfig

TINYSTORIES_DIR = Path("data/tinystories")
DATA_ROOT = Path("data")


@dataclass
class Corpus:
    data_dir: Path
    tokens: object  # tsfast.data.loader.TokenData
    vocab: object  # tsfast.data.vocab.CompactVocab, or None for GPT-2's 50257 ids
    why: str  # which corpus and why, for the log

    @property
    def vocab_size(self) -> int:
        return self.vocab.size if self.vocab is not None else 50257

    def token_map(self):
        return self.vocab.lookup_table() if self.vocab is not None else None


def pick_data_dir(spec: str, *, prepare: bool = True) -> tuple[Path, str]:
    """--data: a directory, or "auto" = data/tinystories if prepared, else the synthetic corpus
    (prepared now if missing, when `prepare`)."""
    if spec != "auto":
        return Path(spec), f"data: {spec} (--data)"
    if (TINYSTORIES_DIR / "meta.json").is_file():
        return TINYSTORIES_DIR, f"data: {TINYSTORIES_DIR} (prepared TinyStories)"
    synthetic = DATA_ROOT / "synthetic"
    if prepare:
        from tsfast.data.prepare import ensure_synthetic

        synthetic = ensure_synthetic(DATA_ROOT)
    return synthetic, (
        f"data: {synthetic}, the built-in synthetic corpus, because TinyStories is not prepared "
        f"({TINYSTORIES_DIR} is missing; `uv run python -m tsfast.data.prepare` downloads it)"
    )


def open_corpus(cfg: TrainConfig, *, vocab_state: dict | None = None, prepare: bool = True) -> Corpus:
    """The prepared data and the vocabulary (from the checkpoint when resuming)."""
    from tsfast.data.loader import TokenData

    data_dir, why = pick_data_dir(cfg.data, prepare=prepare)
    tokens = TokenData(data_dir)
    vocab = None
    if cfg.vocab == "compact":
        from tsfast.data.vocab import CompactVocab

        if vocab_state is not None:
            vocab = CompactVocab.from_state_dict(vocab_state)
        else:
            vocab = CompactVocab.from_prepared(data_dir)
        why += f"; compact vocabulary of {vocab.size} ids"
    return Corpus(data_dir=data_dir, tokens=tokens, vocab=vocab, why=why)


def samplers(corpus: Corpus, cfg: TrainConfig, *, rank: int, device: torch.device):
    """(train sampler for this rank, {"train": eval-train sampler, "val": val sampler})."""
    from tsfast.data.loader import BatchSampler
    from tsfast.data.tokenizer import EOT

    token_map = corpus.token_map()
    eot_token = EOT if cfg.doc_mask else None

    def make(split, stream, r):
        return BatchSampler.for_split(
            corpus.tokens, split, cfg.batch_size, cfg.block_size, seed=cfg.seed, rank=r,
            stream=stream, device=device, token_map=token_map, eot_token=eot_token,
        )

    train = make("train", "train", rank)
    evals = {"train": make("train", "eval_train", 0), "val": make("val", "val", 0)}
    return train, evals
