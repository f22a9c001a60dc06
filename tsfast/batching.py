"""Batched KV-cache decoding: many sequences, one forward per step (sample.py, demo.py).

    for event in generate_many(model, [Request(ids, max_new_tokens=200, seed=s) for s in seeds]):
        ...  # Event(key=request index, token=GPT-2 id or None, end=None or why it ended)

`BatchDecoder` decodes up to `max_batch` sequences together; each has its own prompt
length, sampling settings and `torch.Generator` (seeded as `tsfast.generate` seeds one), so
a seed gives the same story alone or in a batch (the same tokens up to float rounding, the
tolerance of cached vs uncached decoding). `add` queues a request at any time: it joins at
the next `step` (continuous batching). `BatchServer` runs a decoder in a background thread
for concurrent callers (the demo).

The cache layout: left padding, expressed through `doc_ids`.
- One `KVCache` of (layers, max_batch, heads, block_size, head_dim) with one length L for all
  rows. Row r's window (the tokens its model sees, as `tsfast.generate.Decoder` keeps it)
  fills the last n_r positions, right-aligned at L; the positions before are padding.
  A step's forward passes doc_ids (B, L): 0 on padding, 1 on text (None when no row has
  padding). `ops.rope_attention` then masks padding keys out of real queries and counts
  each row's rotary (or learned) positions from its first real token: the op needs nothing
  beyond its contract. The
  alternative, per-row lengths with right padding, writes each row's new token at its own
  position: the queries would no longer be the last positions of the keys (the op's KV-cache
  contract), so every step would need a per-row query position in the op.
- Compaction: L grows by one per step. When it would pass the context, every row shifts left
  by the padding all rows share (one copy of the active rows; a cached key is rotated at
  its position in its own row, counted from the row's first real token, which a shift
  keeps, so nothing is recomputed). After that L is the longest row's
  length and grows with it, so the next compaction comes only after the longest row hops
  (below) or ends.
- Joining: a new request's window is run (prefill) without padding, the computation of the
  single-sequence Decoder, and its keys and values are copied into its row of the cache,
  right-aligned at L; a window longer than L first shifts every row right. The windows
  that join in one step run as one batch per length (so 8 prompts of one length read the
  output layer once, not 8 times), and identical windows (sample.py's N samples of one
  prompt) run once. Windows of different lengths are not padded into one batch: that
  would compute the padding too.
- The sliding window, per row, as a single sequence slides: when a row's window would pass
  the context, it keeps its newest `block_size - block_size // 4` tokens and re-runs them as
  a prefill into its row; that step it sits out the batched forward (a padding token in its
  row). Same windows as alone, so the same logits.
- Finished sequences (end-of-text, max_new_tokens, `cancel`) leave at once: the last row
  moves into the freed one (a copy of one row) and the batch shrinks, so they cost nothing.

Sampling draws every row's token as `tsfast.generate.sample_next` would, with one top-k for
the rows that share their settings (`sample_rows`). The output layer runs once per step
for all rows on a weight packed once (`tsfast.output_layer`: on a CPU, 8 rows then cost
about 1.2x one row instead of 2.8x).

Failures: a request whose prefill fails (the only work that depends on what a request holds)
ends with an error event and the others go on; a failure of the shared forward or sampling
ends every row of that step with the error, and the decoder stays usable for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tsfast.data.tokenizer import EOT
from tsfast.generate import (
    _check_prompt,
    _make_generator,
    _model_eos,
    _to_model_ids,
    check_sampling,
    iter_tokens,
    sample_rows,
    window_start,
)
from tsfast.model import GPT, KVCache
from tsfast.output_layer import OutputLayer

__all__ = ["BatchDecoder", "BatchServer", "Event", "Request", "Stream", "generate_many"]

log = logging.getLogger("tsfast.batching")
PAD, TEXT = 0, 1  # doc ids: padding sorts before the text, as doc_ids must be non-decreasing


@dataclass(frozen=True)
class Request:
    """One sequence to generate: GPT-2 prompt ids and its sampling settings (as `generate`)."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_id: int | None = EOT


@dataclass(frozen=True)
class Event:
    """One step's news for one request: a new GPT-2 `token` and/or its `end`: "end_of_text",
    "max_new_tokens", "error" (then `error` is the exception) or, from a `Stream`,
    "cancelled". No events after an end."""

    key: Hashable
    token: int | None = None
    end: str | None = None
    error: Exception | None = None


class _Row:
    """One sequence: its tokens (model ids), window start, cached positions, next logits."""

    def __init__(self, key: Hashable, request: Request, tokens: list[int], eos: int | None, generator):
        self.key, self.request, self.tokens, self.eos, self.generator = key, request, tokens, eos, generator
        self.start = 0  # the model sees tokens[start:]
        self.n = 0  # positions this row holds in the cache (the last n before L)
        self.slot = -1
        self.produced = 0
        self.logits: torch.Tensor | None = None


class BatchDecoder:
    """Decodes up to `max_batch` requests together (see the module docstring).

    `add(request)` queues one and returns its key; `step()` takes queued requests in while
    there is room, samples one token for every running request and returns the `Event`s;
    `cancel(key)` drops a request. Not thread-safe: `BatchServer` serializes the calls.
    """

    def __init__(self, model: GPT, *, max_batch: int = 8, vocab=None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
        self.model, self.vocab, self.max_batch = model, vocab, max_batch
        self.block_size = model.config.block_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache(model.config, max_batch, device=param.device, dtype=param.dtype)
        self.head = OutputLayer(model.wte.weight, model.config.vocab_size, max_batch)
        self.length = 0  # L: every row's window ends here
        self.rows: list[_Row] = []  # running, in slot order
        self.pending: deque[_Row] = deque()
        self._step_logits: torch.Tensor | None = None  # (B, V): every row's, in slot order, when one step made them all
        self._auto_keys = itertools.count()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.pending)

    def check(self, request: Request) -> list[int]:
        """The request's prompt as model ids, or ValueError naming its first bad setting."""
        r = request
        check_sampling(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
        return _check_prompt(_to_model_ids(r.prompt_ids, self.vocab), self.model.config.vocab_size)

    def add(self, request: Request, key: Hashable = None) -> Hashable:
        """Queue a request (ValueError for bad settings or prompt ids); returns its key (the
        given one, or 0, 1, 2, ... in order of adding)."""
        r = request
        tokens = self.check(r)
        if key is None:
            key = next(self._auto_keys)
        if any(row.key == key for row in itertools.chain(self.rows, self.pending)):
            raise ValueError(f"a request with key {key!r} is already running")
        row = _Row(key, r, tokens, _model_eos(r.eos_id, self.vocab), _make_generator(r.seed, self.device))
        row.start = window_start(len(tokens), 0, self.block_size)  # a prompt longer than the context: its newest
        self.pending.append(row)
        return key

    def cancel(self, key: Hashable) -> None:
        """Drop the request (running or queued); no more events for it. Unknown keys are ignored."""
        self.pending = deque(row for row in self.pending if row.key != key)
        self._remove([row for row in self.rows if row.key == key])

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One token for every running request (taking queued ones in first); never raises."""
        events: list[Event] = []
        try:
            self._admit(events)
            self._remove(self._sample(events))
            self._advance(events)
        except Exception as e:  # the shared forward or sampling: it ends every row it was for
            log.exception("batched decoding step failed")
            events += [Event(row.key, end="error", error=e) for row in self.rows]
            self.rows, self.length = [], 0
        return events

    # -------------------------------------------------------------------- the step's parts

    def _admit(self, events: list[Event]) -> None:
        joined = []
        while self.pending and len(self.rows) < self.max_batch:
            row = self.pending.popleft()
            if row.request.max_new_tokens == 0:
                events.append(Event(row.key, end="max_new_tokens"))
                continue
            row.slot = len(self.rows)
            self.rows.append(row)
            joined.append(row)
        self._prefill(joined, events)

    def _sample(self, events: list[Event]) -> list[_Row]:
        """Draw each row's token; returns the rows that ended."""
        if not self.rows:
            return []
        logits, self._step_logits = self._step_logits, None
        if logits is None:  # rows that joined or hopped have their own logits
            logits = torch.stack([row.logits for row in self.rows])
        tokens = sample_rows(logits,
                             [(row.request.temperature, row.request.top_k, row.request.top_p) for row in self.rows],
                             [row.generator for row in self.rows])
        gpt2_ids = self.vocab.to_gpt2(tokens).tolist() if self.vocab is not None else tokens  # one lookup a step
        ended = []
        for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            row.produced += 1
            if row.eos is not None and token == row.eos:
                events.append(Event(row.key, end="end_of_text"))
                ended.append(row)
                continue
            gpt2 = gpt2_ids[i]
            if row.produced >= row.request.max_new_tokens:
                events.append(Event(row.key, token=gpt2, end="max_new_tokens"))
                ended.append(row)
                continue
            events.append(Event(row.key, token=gpt2))
            row.tokens.append(token)
        return ended

    def _advance(self, events: list[Event]) -> None:
        """Feed every row its new token: one batched forward, and a prefill for each row
        whose window hops."""
        if not self.rows:
            self.length = 0
            return
        hops = []
        for row in self.rows:
            start = window_start(len(row.tokens), row.start, self.block_size)
            if start != row.start:
                row.start, row.n = start, 0  # its cached positions are dropped
                hops.append(row)
        steps = [row for row in self.rows if row.n]
        if steps:
            if self.length + 1 > self.block_size:
                self._realign(max(row.n for row in steps))
            L = self.length + 1
            idx = torch.tensor([[row.tokens[-1] if row.n else 0] for row in self.rows], device=self.device)
            text = [row.n + 1 if row.n else 0 for row in self.rows]  # a hopping row is all padding
            doc_ids = None  # when every row's text fills the cache there is no padding to mask
            if any(n != L for n in text):
                n = torch.tensor(text, device=self.device)
                doc_ids = torch.where(torch.arange(L, device=self.device) >= L - n[:, None], TEXT, PAD)
            view = self.cache.view(len(self.rows), self.length)
            logits = self.head(self.model.hidden(idx, kv_cache=view, doc_ids=doc_ids)[:, -1]).float()
            self.length = L
            for row in steps:
                row.n += 1
                row.logits = logits[row.slot]
            if len(steps) == len(self.rows):
                self._step_logits = logits
        self._prefill(hops, events)

    def _prefill(self, rows: list[_Row], events: list[Event]) -> None:
        """Run each row's window into its cache row, right-aligned at L. Windows of one
        length run as one batch (no padding needed), identical ones once. When a batch
        fails, its windows run one by one, so that only the rows whose own run fails end
        (with an error event)."""
        by_length: dict[int, dict[tuple[int, ...], list[_Row]]] = {}
        for row in rows:
            window = tuple(row.tokens[row.start :])
            by_length.setdefault(len(window), {}).setdefault(window, []).append(row)
        failed: list[_Row] = []
        for windows in by_length.values():
            try:
                self._run_windows(windows)
            except Exception:  # find the windows that fail: each alone
                for window, group in windows.items():
                    try:
                        self._run_windows({window: group})
                    except Exception as e:
                        log.exception("prefill failed for request(s) %r", [row.key for row in group])
                        events += [Event(row.key, end="error", error=e) for row in group]
                        failed += group
        self._remove(failed)

    def _run_windows(self, windows: dict[tuple[int, ...], list[_Row]]) -> None:
        """One forward over distinct windows of one length; each row gets its window's keys
        and values and next-token logits."""
        w = len(next(iter(windows)))
        self._step_logits = None
        if w > self.length:
            self._realign(w)
        L = self.length
        cache = KVCache(self.model.config, len(windows), device=self.device, dtype=self.dtype, max_len=w)
        hidden = self.model.hidden(torch.tensor(list(windows), device=self.device), kv_cache=cache)
        logits = self.head(hidden[:, -1]).float()
        for j, group in enumerate(windows.values()):
            for row in group:
                self.cache.k[:, row.slot, :, L - w : L] = cache.k[:, j]
                self.cache.v[:, row.slot, :, L - w : L] = cache.v[:, j]
                row.n, row.logits = w, logits[j]

    def _realign(self, length: int) -> None:
        """Move every row's window to end at `length` (each row's n <= length)."""
        B, L = len(self.rows), self.length
        m = min(L, length)
        if B and m and length != L:
            for buf in (self.cache.k, self.cache.v):
                buf[:, :B, :, length - m : length] = buf[:, :B, :, L - m : L].clone()
        self.length = length

    def _remove(self, rows: list[_Row]) -> None:
        """Drop rows from the batch: the last rows move into the freed slots."""
        if not rows:
            return
        self._step_logits = None  # slots move
        keep = [row for row in self.rows if row not in rows]
        B, L = len(keep), self.length
        holes = sorted(row.slot for row in rows if row.slot < B)
        movers = [row for row in keep if row.slot >= B]
        for hole, row in zip(holes, movers, strict=True):
            for buf in (self.cache.k, self.cache.v):
                buf[:, hole, :, L - row.n : L] = buf[:, row.slot, :, L - row.n : L]
            row.slot = hole
        self.rows = sorted(keep, key=lambda row: row.slot)
        if not self.rows:
            self.length = 0


def generate_many(model: GPT, requests: Iterable[Request], *, batch_size: int = 8, vocab=None,
                  use_cache: bool = True) -> Iterator[Event]:
    """The events of every request, keyed by its index, decoded `batch_size` at a time (a
    finished request's place goes to the next one). Bad settings raise ValueError before any
    decoding. `use_cache=False` runs the requests one at a time without a cache (to compare)."""
    requests = list(requests)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if not use_cache:
        for r in requests:
            check_sampling(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
        for i, r in enumerate(requests):
            count = 0
            for token in iter_tokens(model, r.prompt_ids, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                     top_k=r.top_k, top_p=r.top_p, seed=r.seed, eos_id=r.eos_id, vocab=vocab,
                                     use_cache=False):
                count += 1
                yield Event(i, token=token)
            yield Event(i, end="max_new_tokens" if count == r.max_new_tokens else "end_of_text")
        return
    decoder = BatchDecoder(model, max_batch=min(batch_size, max(1, len(requests))), vocab=vocab)
    for i, r in enumerate(requests):
        decoder.add(r, key=i)
    while decoder.busy:
        yield from decoder.step()


class Stream:
    """The events of one request given to a `BatchServer`, in order: iterating blocks for
    the next one and stops after its end; `async for` does the same on an event loop.
    `cancel()` (or dropping the stream) ends it."""

    def __init__(self, server: BatchServer, key: int):
        self.key = key
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # an asyncio reader's
        self._cancel = weakref.finalize(self, server._cancel, key)

    def _put(self, event: Event) -> None:
        self._queue.put(event)
        if self._waker is not None:
            loop, ready = self._waker
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody is reading
                loop.call_soon_threadsafe(ready.set)

    def __iter__(self) -> Iterator[Event]:
        while self._cancel.alive:
            yield self._seen(self._queue.get())

    async def __aiter__(self) -> AsyncIterator[Event]:
        """The same events to a reader on an asyncio event loop (the demo's Gradio handler),
        without holding a thread while it waits. It stops without a "cancelled" event when
        the stream is cancelled while it waits."""
        ready = asyncio.Event()
        self._waker = (asyncio.get_running_loop(), ready)
        while self._cancel.alive:
            ready.clear()  # before looking, so that an event put after the look wakes us
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                await ready.wait()
                continue
            yield self._seen(event)

    def _seen(self, event: Event) -> Event:
        if event.end is not None:
            self._cancel.detach()
        return event

    def cancel(self) -> None:
        """End the stream: the request leaves the batch at the next step."""
        if self._cancel.alive:
            self._cancel()
            self._put(Event(self.key, end="cancelled"))  # wakes a reader waiting in another thread


class BatchServer:
    """Continuous batching for concurrent callers: `submit` (from any thread) returns the
    request's `Stream`; one background thread steps a `BatchDecoder`, taking requests in at
    the next step (up to `max_batch` at once; the rest wait their turn), and runs only
    while there is work. A bad request raises ValueError in `submit`; a failing one ends
    its own stream with an error event and never the others'."""

    def __init__(self, model: GPT, *, max_batch: int = 8, vocab=None):
        self.decoder = BatchDecoder(model, max_batch=max_batch, vocab=vocab)
        self._lock = threading.Lock()
        self._inbox: list[tuple[Request, Stream]] = []
        self._cancels: list[int] = []
        self._streams: dict[int, weakref.ref[Stream]] = {}  # running or queued in the decoder
        self._keys = itertools.count()
        self._running = False

    def submit(self, request: Request) -> Stream:
        self.decoder.check(request)
        with self._lock:
            stream = Stream(self, next(self._keys))
            self._inbox.append((request, stream))
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name="tsfast-batch", daemon=True).start()
        return stream

    def _cancel(self, key: int) -> None:
        with self._lock:
            self._cancels.append(key)
            self._inbox = [(r, s) for r, s in self._inbox if s.key != key]

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    for key in self._cancels:
                        self.decoder.cancel(key)
                        self._streams.pop(key, None)
                    for request, stream in self._inbox:
                        try:
                            self.decoder.add(request, key=stream.key)
                            self._streams[stream.key] = weakref.ref(stream)
                        except ValueError as e:
                            stream._put(Event(stream.key, end="error", error=e))
                    self._cancels, self._inbox = [], []
                    if not self.decoder.busy:
                        self._running = False
                        return
                for event in self.decoder.step():
                    self._deliver(event)
        except Exception as e:  # a bug here must not leave callers waiting forever
            log.exception("the batching thread failed")
            with self._lock:
                self._running = False
                keys = list(self._streams) + [s.key for _, s in self._inbox]
                for key in keys:
                    self.decoder.cancel(key)
                for _, stream in self._inbox:
                    stream._put(Event(stream.key, end="error", error=e))
                for key in list(self._streams):
                    self._deliver(Event(key, end="error", error=e))
                self._inbox = []

    def _deliver(self, event: Event) -> None:
        ref = self._streams.get(event.key)
        stream = ref() if ref is not None else None
        if event.end is not None:
            self._streams.pop(event.key, None)
        if stream is None:  # dropped by its caller: stop decoding it
            self.decoder.cancel(event.key)
        else:
            stream._put(event)
