"""Compact vocabulary: only the GPT-2 tokens a corpus uses, plus one id for the rest.

TinyStories uses a small part of GPT-2's 50257 tokens (the synthetic corpus under a
thousand), so a model trained on it wastes most of its output layer. A CompactVocab keeps
the tokens seen in training (all of them, or the `max_size - 1` most frequent), always
keeps the end-of-text token, and maps every other GPT-2 token to one `unk_id`.

Ids: the kept GPT-2 ids in ascending order become compact ids 0 .. n-1, and unk_id = n,
so size = n + 1. Decoding maps unk back to GPT-2's "?" (id 30): visible in the text, a
single token, never a control token such as end-of-text.

The state_dict holds only ints and lists of ints, so it travels inside a checkpoint that
torch.load(..., weights_only=True) reads.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tsfast.data.tokenizer import EOT, VOCAB_SIZE

UNK_GPT2_ID = 30  # "?"
STATE_KIND = "tsfast-compact-vocab-v1"


class CompactVocab:
    """A gpt2 <-> compact id mapping; see the module docstring for the id layout."""

    def __init__(self, gpt2_ids: Sequence[int], unk_gpt2_id: int = UNK_GPT2_ID):
        ids = np.asarray(gpt2_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("gpt2_ids must be a non-empty list of GPT-2 token ids")
        if ids.min() < 0 or ids.max() >= VOCAB_SIZE:
            raise ValueError(f"gpt2_ids must lie in 0..{VOCAB_SIZE - 1}, got {ids.min()}..{ids.max()}")
        if np.any(np.diff(ids) <= 0):
            raise ValueError("gpt2_ids must be strictly increasing (sorted, no repeats)")
        if EOT not in ids:
            raise ValueError(f"gpt2_ids must include the end-of-text token {EOT}")
        if not 0 <= unk_gpt2_id < VOCAB_SIZE:
            raise ValueError(f"unk_gpt2_id must lie in 0..{VOCAB_SIZE - 1}, got {unk_gpt2_id}")
        self.gpt2_ids = ids
        self.unk_id = int(ids.size)
        self.unk_gpt2_id = int(unk_gpt2_id)
        self.size = self.unk_id + 1
        self.eot_id = int(np.searchsorted(ids, EOT))
        self._to_compact = np.full(VOCAB_SIZE, self.unk_id, dtype=np.int64)
        self._to_compact[ids] = np.arange(ids.size)
        self._to_gpt2 = np.append(ids, self.unk_gpt2_id)
        self._torch_tables: dict = {}

    @classmethod
    def from_counts(cls, counts: np.ndarray, max_size: int | None = None, min_count: int = 1) -> CompactVocab:
        """Keep tokens counted at least `min_count` times, the most frequent first when
        `max_size` (which counts EOT and unk) cuts the list; ties go to the lower id."""
        counts = np.asarray(counts)
        if counts.shape != (VOCAB_SIZE,):
            raise ValueError(f"counts must have shape ({VOCAB_SIZE},), got {counts.shape}")
        if max_size is not None and max_size < 2:
            raise ValueError(f"max_size={max_size}: must be at least 2 (end-of-text and unk)")
        candidates = np.flatnonzero(counts >= max(min_count, 1))
        candidates = candidates[candidates != EOT]
        if max_size is not None:
            order = np.lexsort((candidates, -counts[candidates]))  # count desc, then id asc
            candidates = candidates[order[: max_size - 2]]
        return cls(np.sort(np.append(candidates, EOT)))

    @classmethod
    def from_prepared(cls, data_dir: str | Path, max_size: int | None = None,
                      min_count: int = 1) -> CompactVocab:
        """From the train token counts of a prepared corpus (its counts.npy)."""
        from tsfast.data.meta import load_counts

        return cls.from_counts(load_counts(data_dir), max_size=max_size, min_count=min_count)

    def lookup_table(self) -> np.ndarray:
        """(50257,) int64: compact id of every GPT-2 id (unk_id for dropped ones)."""
        return self._to_compact.copy()

    def _map(self, ids, table: np.ndarray, limit: int, what: str):
        torch = sys.modules.get("torch")  # no tensor can exist unless torch is imported
        if torch is not None and isinstance(ids, torch.Tensor):  # map on the tensor's device
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
                raise ValueError(f"{what} ids must lie in 0..{limit - 1}, got {int(ids.min())}..{int(ids.max())}")
            key = (what, ids.device)
            if key not in self._torch_tables:
                self._torch_tables[key] = torch.as_tensor(table, device=ids.device)
            return self._torch_tables[key][ids.long()]
        array = np.asarray(ids)
        if array.size and (array.min() < 0 or array.max() >= limit):
            raise ValueError(f"{what} ids must lie in 0..{limit - 1}, got {array.min()}..{array.max()}")
        return table[array.astype(np.int64, copy=False)]

    def to_compact(self, ids):
        """GPT-2 ids (numpy array, tensor, list) -> compact ids, same kind (int64)."""
        return self._map(ids, self._to_compact, VOCAB_SIZE, "GPT-2")

    def to_gpt2(self, compact_ids):
        """Compact ids -> GPT-2 ids; unk becomes UNK_GPT2_ID."""
        return self._map(compact_ids, self._to_gpt2, self.size, "compact")

    def state_dict(self) -> dict:
        return {"kind": STATE_KIND, "gpt2_ids": self.gpt2_ids.tolist(), "unk_gpt2_id": self.unk_gpt2_id}

    @classmethod
    def from_state_dict(cls, state: dict) -> CompactVocab:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            found = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a compact vocabulary state (kind {found!r}, expected {STATE_KIND!r})")
        return cls(state["gpt2_ids"], unk_gpt2_id=state["unk_gpt2_id"])

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CompactVocab) and self.unk_gpt2_id == other.unk_gpt2_id
                and np.array_equal(self.gpt2_ids, other.gpt2_ids))

    def __repr__(self) -> str:
        return f"CompactVocab(size={self.size}, eot_id={self.eot_id}, unk_id={self.unk_id})"
