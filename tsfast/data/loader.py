"""Read a prepared corpus (tsfast.data.meta format) and draw training batches from it.

`TokenData(dir)` checks the directory against its meta.json (file sizes, dtype, token ids
below 50257, and the sha256 of each .bin) and opens train.bin and val.bin as read-only
np.memmap arrays. The id check reads every token anyway, so the checksum costs only the
hashing: about 1 GB/s on one core with SHA extensions (0.97 GB/s measured on a shared
2-core x86 machine), about 1 s for the ~1.1 GB of full TinyStories V2 tokens (estimated:
2.2 GB of text at ~4 bytes a token).

`BatchSampler` draws random windows nanoGPT style: B offsets uniform in
[0, len - block_size - 1], x = tokens[i : i+T], y = tokens[i+1 : i+T+1]; no padding, and
windows may cross story boundaries (the EOT token marks them). Given `eot_token`, `batch()`
also returns x's document ids (`doc_ids_from_eot`) for document-masked attention.

Determinism: batch `step` is drawn by a Philox counter-based generator whose key is a hash
of (seed, rank, stream) and whose counter starts at `step`. Batch k is therefore a pure
function of (seed, rank, stream, k): a run resumed at step k, or the same rank in another
process, draws exactly the batches an uninterrupted run would, and different ranks and
streams ("train", "val", ...) draw different ones.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from tsfast.data.meta import DTYPE, SPLITS, DataError, load_counts, prepare_command, validate
from tsfast.data.tokenizer import VOCAB_SIZE


class TokenData:
    """A validated prepared corpus: `.meta`, `.train`, `.val` (uint16 memmaps), `.vocab_size`."""

    def __init__(self, data_dir: str | Path, *, check_tokens: bool = True, check_sha256: bool = True):
        self.dir = Path(data_dir)
        self.meta = validate(self.dir, check_tokens=check_tokens, check_sha256=check_sha256)
        self.vocab_size: int = self.meta["vocab_size"]
        for split in SPLITS:
            info = self.meta["splits"][split]
            path = self.dir / info.get("file", f"{split}.bin")
            setattr(self, split, np.memmap(path, dtype=DTYPE, mode="r", shape=(info["tokens"],)))

    @property
    def name(self) -> str:
        return self.meta.get("name", self.dir.name)

    def split(self, name: str) -> np.memmap:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def path(self, split: str) -> Path:
        return self.dir / self.meta["splits"][split].get("file", f"{split}.bin")

    def counts(self) -> np.ndarray:
        """Train-split token frequencies, (50257,) int64 (for CompactVocab.from_counts)."""
        return load_counts(self.dir)

    def __repr__(self) -> str:
        return f"TokenData({str(self.dir)!r}, train={len(self.train):,}, val={len(self.val):,} tokens)"


def stream_key(seed: int, rank: int, stream: str) -> np.ndarray:
    """Philox key (2 x uint64) for one (seed, rank, stream)."""
    digest = hashlib.sha256(f"tsfast-batches:{seed}:{rank}:{stream}".encode()).digest()
    return np.frombuffer(digest[:16], dtype="<u8").copy()


def doc_ids_from_eot(windows: np.ndarray, eot_token: int) -> np.ndarray:
    """(B, T) int32 document ids of token windows (B, T), non-decreasing along T.

    The end-of-text token belongs to the story it ends, so a new document starts right after
    each one: a token's id is the number of EOTs before it in its row. A row that starts
    mid-story begins with document 0; one that ends on an EOT starts no new document."""
    ends = np.asarray(windows) == eot_token
    ids = np.zeros(ends.shape, dtype=np.int32)
    np.cumsum(ends[:, :-1], axis=1, out=ids[:, 1:])
    return ids


class BatchSampler:
    """Random (x, y) windows of `tokens`, a pure function of (seed, rank, stream, step)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, *, seed: int,
                 rank: int = 0, stream: str = "train", device: str | torch.device = "cpu",
                 token_map: np.ndarray | None = None, source: str | Path | None = None,
                 eot_token: int | None = None):
        where = source or f"the {stream} tokens"
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if len(tokens) < block_size + 1:
            fix = (f"prepare a bigger corpus (`{prepare_command(Path(source).parent)}` with more "
                   "stories)" if source else "use more text")
            raise DataError(
                f"{where}: {len(tokens):,} tokens, but block_size {block_size} needs at least "
                f"{block_size + 1} (one window plus its next token); lower block_size or {fix}"
            )
        if token_map is not None:
            token_map = np.asarray(token_map)
            if token_map.shape != (VOCAB_SIZE,) or token_map.dtype.kind not in "iu":
                raise ValueError(f"token_map must be an integer array of shape ({VOCAB_SIZE},), "
                                 f"got {token_map.dtype} {token_map.shape} (use CompactVocab.lookup_table())")
            token_map = token_map.astype(np.int64, copy=False)
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = torch.device(device)
        self.token_map = token_map
        self.eot_token = eot_token  # GPT-2 id (before token_map) that ends each story, or None
        self.key = stream_key(seed, rank, stream)
        self._window = np.arange(block_size + 1)

    @classmethod
    def for_split(cls, data: TokenData, split: str, batch_size: int, block_size: int, **kwargs) -> BatchSampler:
        """A sampler over one split of `data`; its stream defaults to the split name."""
        kwargs.setdefault("stream", split)
        return cls(data.split(split), batch_size, block_size, source=data.path(split), **kwargs)

    def offsets(self, step: int) -> np.ndarray:
        """The B window starts of batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        counter = np.array([0, 0, step, 0], dtype=np.uint64)  # draws advance word 0 only
        generator = np.random.Generator(np.random.Philox(counter=counter, key=self.key))
        return generator.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 tensors (B, T) on the sampler's device, y = x shifted by one."""
        x, y, _ = self.batch(step)
        return x, y

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x, y, doc_ids): get()'s x and y, and with `eot_token` set x's (B, T) int32 document
        ids (`doc_ids_from_eot`) on the same device, else None."""
        windows = self.tokens[self.offsets(step)[:, None] + self._window]
        docs = None
        if self.eot_token is not None:
            docs = torch.from_numpy(doc_ids_from_eot(windows[:, :-1], self.eot_token))
        windows = self.token_map[windows] if self.token_map is not None else windows.astype(np.int64)
        x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
        return self._to_device(x), self._to_device(y), None if docs is None else self._to_device(docs)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)
