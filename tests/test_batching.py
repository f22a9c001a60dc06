"""tsfast.batching on small random models (CPU): batched decoding against one sequence at a
time for the same seeds (mixed prompt lengths, early ends, windows sliding past the
context, requests joining a running batch), the batch shrinking, failures staying with
their request, and the threaded server."""

from __future__ import annotations

import gc
import random
import threading
import time

import pytest
import torch
from test_generate import BLOCK, assert_same_or_tie, random_model, window_logits

from tsfast.batching import BatchDecoder, BatchServer, Request, generate_many
from tsfast.generate import generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def single(model, r: Request) -> list[int]:
    return generate(model, r.prompt_ids, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                    top_k=r.top_k, top_p=r.top_p, seed=r.seed, eos_id=r.eos_id)


def random_request(V: int, prompt_len: int, max_new_tokens: int, **changes) -> Request:
    options = dict(temperature=random.choice([0.0, 0.7, 1.0]), top_k=random.choice([None, 0, 5, 50]),
                   top_p=random.choice([None, 0.9]), seed=random.randint(0, 2**31), eos_id=None)
    return Request(torch.randint(0, V, (prompt_len,)).tolist(), max_new_tokens, **(options | changes))


def collect(events) -> tuple[dict, dict]:
    """tokens and end of every key; no event may follow a key's end."""
    tokens, ends = {}, {}
    for ev in events:
        assert ev.key not in ends, f"event after the end of {ev.key}: {ev}"
        if ev.error is not None:
            raise ev.error
        if ev.token is not None:
            tokens.setdefault(ev.key, []).append(ev.token)
        if ev.end is not None:
            ends[ev.key] = ev.end
    return tokens, ends


def recording_forward(model) -> list[tuple[int, int]]:
    """(batch, tokens) of every forward the model runs from now on (batched decoding runs
    `model.hidden` and its own output layer)."""
    shapes = []
    real = model.hidden

    def forward(idx, *args, **kwargs):
        shapes.append(tuple(idx.shape))
        return real(idx, *args, **kwargs)

    model.hidden = forward
    return shapes


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_batched_equals_one_at_a_time_for_the_same_seeds(pos):
    """Mixed prompt lengths (1 to past the context), one sequence ending early at its
    end-of-text, one sliding twice past the context, more requests than the batch holds
    (the later ones join a running batch as others finish)."""
    model = random_model(pos)
    V = model.config.vocab_size
    lengths = [1, 7, 17, BLOCK, BLOCK + random.randint(1, 20)]
    random.shuffle(lengths)
    requests = [random_request(V, n, random.choice([5, 17, 40])) for n in lengths]
    requests[0] = random_request(V, lengths[0], 2 * BLOCK + 5)  # slides past the context twice
    greedy = random_request(V, 11, 30, temperature=0.0)
    out = single(model, greedy)
    stop = max(i for i, t in enumerate(out) if out.index(t) == i and i < 20)  # ends early at this token
    requests.append(Request(greedy.prompt_ids, 30, temperature=0.0, eos_id=out[stop]))
    tokens, ends = collect(generate_many(model, requests, batch_size=3))
    for i, r in enumerate(requests):
        alone = single(model, r)
        assert len(tokens.get(i, [])) == len(alone)
        assert_same_or_tie(model, r.prompt_ids, tokens.get(i, []), alone)
    assert ends[len(requests) - 1] == "end_of_text" and tokens.get(len(requests) - 1, []) == out[:stop]
    assert all(ends[i] == "max_new_tokens" for i in range(len(requests) - 1))


def test_every_row_sees_the_logits_of_its_own_window():
    """After every step, each running row's next-token logits equal the model run on that
    row's window alone: padding, compaction, hops and joins leave no trace."""
    model = random_model("rope")
    V = model.config.vocab_size
    dec = BatchDecoder(model, max_batch=5)
    for n in (3, 1, 5):
        dec.add(random_request(V, n, 3 * BLOCK))
    for step in range(BLOCK + BLOCK // 4):
        if step in (5, BLOCK // 2):  # joins: a window longer than all (every row shifts right)
            dec.add(random_request(V, BLOCK - 1 if step == 5 else BLOCK + 3, 3 * BLOCK))
        collect(dec.step())
        if step == 5:
            assert dec.length == BLOCK  # the joined window (BLOCK - 1) and its first new token
        for row in dec.rows:
            window = row.tokens[row.start :]
            assert len(window) <= BLOCK and row.n == len(window)
            torch.testing.assert_close(row.logits, window_logits(model, window), rtol=1e-4, atol=1e-4)
    assert len(dec.rows) == 5 and dec.length <= BLOCK


def test_finished_sequences_leave_the_batch_and_identical_prompts_share_a_prefill():
    model = random_model("rope")
    prompt = torch.randint(0, model.config.vocab_size, (13,)).tolist()
    requests = [Request(prompt, n, temperature=1.0, seed=random.randint(0, 2**31), eos_id=None) for n in (4, 9, 20)]
    shapes = recording_forward(model)
    tokens, _ = collect(generate_many(model, requests, batch_size=8))
    assert shapes[0] == (1, 13)  # one prefill for the three rows
    steps = [b for b, t in shapes if t == 1]
    assert steps == [3] * 3 + [2] * 5 + [1] * 11  # a row leaves after its last token
    del model.hidden
    for i, r in enumerate(requests):
        assert_same_or_tie(model, prompt, tokens[i], single(model, r))


def test_cancel_and_a_failing_request_leave_the_others_alone(monkeypatch):
    model = random_model("rope")
    V = model.config.vocab_size
    bad = [7, 1, 2]
    good = [random_request(V, n, 30) for n in (5, 9)]
    real = model.hidden

    def forward(idx, *args, **kwargs):
        if bad in idx.tolist():
            raise RuntimeError("this prompt breaks the model")
        return real(idx, *args, **kwargs)

    model.hidden = forward
    dec = BatchDecoder(model, max_batch=4)
    keys = [dec.add(r) for r in good]
    doomed = dec.add(random_request(V, 4, 30))
    events = dec.step() + dec.step()
    dec.cancel(doomed)
    failing = dec.add(Request(bad, 30, seed=1))
    same_length = Request([8, 1, 2], 30, temperature=0.0)  # its prefill runs in one batch with the failing one
    keys.append(dec.add(same_length))
    good.append(same_length)
    events += dec.step()
    failure = [ev for ev in events if ev.key == failing]
    assert len(failure) == 1 and failure[0].end == "error" and "breaks the model" in str(failure[0].error)
    events = [ev for ev in events if ev.key != failing]
    while dec.busy:
        events += dec.step()
    tokens, ends = collect(events)
    assert len(tokens[doomed]) == 2 and doomed not in ends
    for key, r in zip(keys, good, strict=True):
        assert ends[key] == "max_new_tokens"
        assert_same_or_tie(model, r.prompt_ids, tokens[key], single(model, r))

    # A failure of the shared forward ends the rows of that step; the decoder serves on.
    dec.add(random_request(V, 5, 30))
    collect(dec.step())

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    model.hidden = out_of_memory
    token, failed = dec.step()  # the token sampled before the forward, then the failure
    assert token.token is not None and failed.end == "error" and "out of memory" in str(failed.error)
    assert not dec.busy
    model.hidden = real
    r = random_request(V, 5, 10)
    dec.add(r, key="again")
    events = []
    while dec.busy:
        events += dec.step()
    assert_same_or_tie(model, r.prompt_ids, collect(events)[0]["again"], single(model, r))


def test_bad_requests_are_refused_before_decoding():
    model = random_model("rope", vocab_size=100)
    with pytest.raises(ValueError, match="max_batch"):
        BatchDecoder(model, max_batch=0)
    dec = BatchDecoder(model)
    with pytest.raises(ValueError, match="top_p"):
        dec.add(Request([1, 2], 5, top_p=0.0))
    with pytest.raises(ValueError, match="empty"):
        dec.add(Request([], 5))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        dec.add(Request([1, 100], 5))
    dec.add(Request([1], 5), key="a")
    with pytest.raises(ValueError, match="already running"):
        dec.add(Request([2], 5), key="a")
    with pytest.raises(ValueError, match="batch_size"):
        list(generate_many(model, [Request([1], 5)], batch_size=0))
    with pytest.raises(ValueError, match="temperature"):
        list(generate_many(model, [Request([1], 5), Request([1], 5, temperature=-1)]))
    assert collect(generate_many(model, [Request([1], 0)])) == ({}, {0: "max_new_tokens"})


def test_server_serves_threads_together_and_stops_when_idle():
    model = random_model("rope")
    V = model.config.vocab_size
    server = BatchServer(model, max_batch=3)
    requests = [random_request(V, random.randint(1, 20), random.randint(5, 40)) for _ in range(5)]
    results: dict[int, list[int]] = {}

    def user(i):
        results[i] = [ev.token for ev in server.submit(requests[i]) if ev.token is not None]

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    stream = server.submit(random_request(V, 3, 500))
    first = next(iter(stream))
    stream.cancel()
    assert first.token is not None and [ev.end for ev in stream] == []
    dropped = server.submit(random_request(V, 3, 200))
    del dropped  # a caller that goes away stops its generation too
    gc.collect()
    for t in threads:
        t.join(timeout=60)
    for i, r in enumerate(requests):
        assert_same_or_tie(model, r.prompt_ids, results[i], single(model, r))
    with pytest.raises(ValueError, match="top_k"):
        server.submit(Request([1], 5, top_k=-1))
    deadline = time.monotonic() + 10
    while any(t.name == "tsfast-batch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.decoder.busy
    assert not any(t.name == "tsfast-batch" for t in threading.enumerate())


def test_server_serves_asyncio_readers_on_one_event_loop():
    """`async for` over streams: several readers on one loop, none holding a thread while it
    waits; one cancels after its first token and its reader stops at once."""
    import asyncio

    model = random_model("rope")
    V = model.config.vocab_size
    server = BatchServer(model, max_batch=3)
    requests = [random_request(V, random.randint(1, 20), random.randint(5, 40)) for _ in range(4)]

    async def read(request):
        return [ev.token async for ev in server.submit(request) if ev.token is not None]

    async def read_one_then_cancel():
        stream = server.submit(random_request(V, 3, 500))
        seen = []
        async for ev in stream:
            seen.append(ev)
            stream.cancel()
        return seen

    async def main():
        threads_before = threading.active_count()
        tasks = [asyncio.create_task(read(r)) for r in requests] + [asyncio.create_task(read_one_then_cancel())]
        await asyncio.sleep(0.05)
        assert threading.active_count() <= threads_before + 1  # the decoding thread, no reader threads
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)

    *results, cancelled = asyncio.run(main())
    for r, tokens in zip(requests, results, strict=True):
        assert_same_or_tie(model, r.prompt_ids, tokens, single(model, r))
    assert len(cancelled) == 1 and cancelled[0].token is not None


def test_a_cancel_between_steps_moves_a_row_and_its_logits():
    """Cancelling a middle row moves the last row into its slot; the next step samples the
    moved row from its own logits, not from the slot's old ones."""
    model = random_model("learned")
    V = model.config.vocab_size
    requests = [random_request(V, random.randint(1, 12), 25, temperature=0.0)  # greedy: wrong logits show
                for _ in range(4)]
    dec = BatchDecoder(model, max_batch=4)
    keys = [dec.add(r) for r in requests]
    events = dec.step() + dec.step()
    dec.cancel(keys[1])
    while dec.busy:
        events += dec.step()
    tokens, ends = collect(ev for ev in events if ev.key != keys[1])
    for key, r in zip(keys, requests, strict=True):
        if key != keys[1]:
            assert ends[key] == "max_new_tokens"
            assert_same_or_tie(model, r.prompt_ids, tokens[key], single(model, r))
