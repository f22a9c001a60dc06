"""demo.py through gradio_client: the streaming endpoint, queueing, and every bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import random
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager

import pytest
import requests
import torch
from gradio_client import Client
from train_helpers import save_edited
from trained_checkpoint import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GOOD = {"max_new_tokens": 20, "temperature": 0.8, "top_k": 200, "top_p": 1.0, "seed": 7}


@pytest.fixture(scope="module")
def demo_mod():
    spec = importlib.util.spec_from_file_location("demo_app", REPO / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(demo_mod, ckpt):
    app = demo_mod.build_app(ckpt, device="cpu")
    port = free_port()
    app.queue(max_size=16).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def updates(stream) -> list[tuple[str, str]]:
    """Every (story, status) update of the demo's handler (an async generator)."""
    async def collect():
        return [update async for update in stream]
    return asyncio.run(collect())


def ask(client, prompt="Once upon a time", **changes):
    options = GOOD | changes
    return client.predict(prompt, options["max_new_tokens"], options["temperature"], options["top_k"],
                          options["top_p"], options["seed"], api_name="/generate")


def page_info(url: str) -> str:
    config = requests.get(url + "config", timeout=30).json()
    return next(c["props"]["value"] for c in config["components"] if c.get("props", {}).get("elem_id") == "model-info")


@pytest.fixture(scope="module")
def server(demo_mod, trained_ckpt):
    with serving(demo_mod, trained_ckpt) as both:
        yield both


FINAL = re.compile(r"^(\d+) tokens in [\d.]+ s · \*\*([\d.]+) tokens/s\*\* · (reached Max New Tokens|the story ended) · "
                   r"model \*\*tiny\*\* · [\d.]+M parameters · val loss [\d.]+ \(step \d+\) · cpu")


def test_streams_token_by_token(server):
    client, url = server
    assert "model **tiny**" in page_info(url) and "context 128 tokens" in page_info(url)
    job = client.submit("Once upon a time", 30, 0.8, 200, 1.0, random.randint(0, 10**6), api_name="/generate")
    story, status = job.result(timeout=120)
    outputs = job.outputs()
    final = FINAL.match(status)
    assert final, status
    tokens = int(final.group(1))
    assert 1 <= tokens <= 30 and float(final.group(2)) > 0
    streamed = [o for o in outputs if o[1].startswith("Generating")]
    assert len(streamed) >= min(tokens, 3)
    texts = [o[0] for o in outputs]
    assert all(a == b[: len(a)] for a, b in zip(texts, texts[1:], strict=False))  # each extends the last
    assert texts[0].startswith("Once upon a time") and story == texts[-1] and len(story) > len("Once upon a time")
    counts = [int(re.match(r"Generating… (\d+) tokens", s).group(1)) for _, s in streamed]
    assert counts == list(range(1, len(counts) + 1))


def test_same_seed_same_story_and_users_never_mix(server):
    client, _ = server
    seeds = random.sample(range(10**6), 2)
    alone = [ask(client, seed=s, max_new_tokens=25)[0] for s in seeds]
    assert ask(client, seed=seeds[0], max_new_tokens=25)[0] == alone[0]
    assert alone[0] != alone[1]
    jobs = [client.submit("Once upon a time", 25, 0.8, 200, 1.0, s, api_name="/generate") for s in seeds * 2]
    assert [j.result(timeout=120)[0] for j in jobs] == alone * 2


@pytest.mark.parametrize(
    "prompt, changes, message",
    [
        ("", {}, "The prompt is empty"),
        ("   \n ", {}, "The prompt is empty"),
        ("x" * 20_001, {}, "at most 20,000"),
        ("Hi", {"max_new_tokens": 9}, "Max New Tokens must be a whole number from 10 to 500; got 9"),
        ("Hi", {"max_new_tokens": 501}, "Max New Tokens must be a whole number from 10 to 500"),
        ("Hi", {"max_new_tokens": 20.5}, "Max New Tokens must be a whole number"),
        ("Hi", {"temperature": 0.0}, r"Temperature must be a number from 0\.1 to 2\.0; got 0\.0"),
        ("Hi", {"temperature": 2.5}, "Temperature must be a number from 0.1 to 2.0"),
        ("Hi", {"temperature": "hot"}, "Temperature must be a number .* got 'hot'"),
        ("Hi", {"top_k": -1}, "Top-k must be a whole number from 0 to 500"),
        ("Hi", {"top_k": 501}, "Top-k must be a whole number from 0 to 500"),
        ("Hi", {"top_p": 0.0}, r"Top-p must be a number from 0\.05 to 1\.0"),
        ("Hi", {"top_p": 1.2}, r"Top-p must be a number from 0\.05 to 1\.0"),
        ("Hi", {"seed": 1.5}, "Seed must be a whole number from -1 to 2147483647"),
        ("Hi", {"seed": -2}, "Seed must be a whole number from -1"),
    ],
)
def test_bad_input_gets_a_message_and_the_server_keeps_serving(server, prompt, changes, message):
    client, _ = server
    story, status = ask(client, prompt, **changes)
    assert story == "" and status.startswith("⚠️") and re.search(message, status), status
    assert FINAL.match(ask(client, max_new_tokens=10)[1])


def test_typed_text_of_every_kind(server):
    client, _ = server
    prompt = random.choice(["Lily 🐶 said こんにちは to Tom", "Мама <|endoftext|> 🙂 and the"])
    story, status = ask(client, prompt)
    assert story.startswith(prompt) and FINAL.match(status)
    assert "not in this model's vocabulary" in status


def test_prompt_longer_than_the_context_is_cut_from_the_left(server):
    client, _ = server
    prompt = "Tom had a red ball. " * 40
    story, status = ask(client, prompt, max_new_tokens=10)
    assert story.startswith(prompt) and FINAL.match(status)
    assert re.search(r"the prompt has \d+ tokens; the context holds 128, so the model saw only its last 96", status)


def test_missing_checkpoint_page_and_late_training(demo_mod, trained_ckpt, tmp_path):
    path = tmp_path / "out" / "ckpt.pt"
    with serving(demo_mod, path) as (client, url):
        info = page_info(url)
        assert "No model to run" in info and "uv run train.py" in info and str(path) in info
        story, status = ask(client)
        assert story == "" and "uv run train.py" in status
        path.parent.mkdir()
        shutil.copy(trained_ckpt, path)  # trained while the demo runs: the next click loads it
        assert FINAL.match(ask(client)[1])


def test_incompatible_checkpoints(demo_mod, trained_ckpt, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(random.randbytes(2000))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    mismatched = tmp_path / "mismatched.pt"
    ckpt = torch.load(trained_ckpt, weights_only=True)
    save_edited(mismatched, ckpt, model_config=dict(ckpt["model_config"], n_embd=2 * ckpt["model_config"]["n_embd"]))
    expected = {junk: "not a readable checkpoint", other: "not a tsfast checkpoint", mismatched: "does not fit"}
    for path, message in expected.items():
        with serving(demo_mod, path) as (client, url):
            assert message in page_info(url)
            story, status = ask(client)
            assert story == "" and message in status and "uv run train.py" in status


@pytest.fixture
def produced(monkeypatch) -> list[int]:
    """The tokens the server generates, recorded; and no end-of-text, so a story runs
    until Max New Tokens or a stop (a model trained a few steps often ends one at once).
    `produced.batches` gets the number of stories in every decoding step."""
    from tsfast.batching import BatchDecoder

    tokens = ProducedTokens()
    real_add, real_step = BatchDecoder.add, BatchDecoder.step

    def add(self, request, key=None):
        return real_add(self, dataclasses.replace(request, eos_id=None), key)

    def step(self):
        tokens.batches.append(len(self.rows) + len(self.pending))
        events = real_step(self)
        tokens.extend(ev.token for ev in events if ev.token is not None)
        return events

    monkeypatch.setattr(BatchDecoder, "add", add)
    monkeypatch.setattr(BatchDecoder, "step", step)
    return tokens


class ProducedTokens(list):
    def __init__(self):
        super().__init__()
        self.batches: list[int] = []


def settles(produced: list) -> int:
    """The number of tokens produced once the server has stopped producing them."""
    time.sleep(1.0)
    settled = len(produced)
    time.sleep(1.0)
    assert settled == len(produced)
    return settled


def test_cancel_from_the_client_stops_the_server(server, produced):
    client, _ = server
    job = client.submit("Once upon a time", 500, 0.8, 200, 1.0, 3, api_name="/generate")
    while len(produced) < 3 and not job.done():
        time.sleep(0.02)
    job.cancel()
    assert 3 <= settles(produced) < 500  # the server stopped generating
    assert FINAL.match(ask(client, max_new_tokens=10)[1])  # and serves the next request


def test_damaged_or_edited_checkpoints_are_named_in_the_page(demo_mod, trained_ckpt, tmp_path):
    from test_train_checkpoint import damage_tensor_bytes

    ckpt = torch.load(trained_ckpt, weights_only=True)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(trained_ckpt.read_bytes())
    damage_tensor_bytes(damaged, ckpt["model"]["wte.weight"])
    no_vocab = save_edited(tmp_path / "no_vocab.pt", ckpt, vocab=None)
    text_loss = save_edited(tmp_path / "text_loss.pt", ckpt, val_loss="low")
    expected = {damaged: "is damaged: its contents do not match the checksum",
                no_vocab: "vocab is None, expected the compact vocabulary map",
                text_loss: "val_loss is 'low', expected None or a finite number >= 0"}
    for path, message in expected.items():
        teller = demo_mod.StoryTeller(path, "cpu")
        assert message in teller.info() and "No model to run" in teller.info()
        story, status = updates(teller.stream("Once upon a time", **GOOD))[-1]
        assert story == "" and message in status


def test_command_line_errors(demo_mod, capsys, trained_ckpt):
    assert demo_mod.main(["--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    assert demo_mod.main(["--port", "70000"]) == 2
    assert "--port must be from 1 to 65535" in capsys.readouterr().err
    assert demo_mod.main(["--host", "256.1.1.1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host '256.1.1.1' is not an IP address or a name this machine can resolve")
    assert "Cannot find empty port" not in err and err.count("\n") == 1
    assert demo_mod.main(["--host", "192.0.2.1", "--device", "cpu"]) == 2  # TEST-NET-1: nobody's address
    assert capsys.readouterr().err.startswith("error: --host 192.0.2.1 is not an address of this machine")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert demo_mod.main(["--ckpt", str(trained_ckpt), "--device", "cpu", "--port", str(port)]) == 1
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


def test_stop_flag_ends_the_stream_with_a_final_status(demo_mod, trained_ckpt, produced):
    teller = demo_mod.StoryTeller(trained_ckpt, device="cpu")
    teller.request_stop()
    assert updates(teller.stream("Once upon a time", 50, 0.8, 200, 1.0, 1)) == [("", "Stopped before it started.")]
    teller.begin()

    async def stop_after_three():
        stream = teller.stream("Once upon a time", 500, 0.8, 200, 1.0, random.randint(0, 10**6))
        first = [await anext(stream) for _ in range(3)]
        teller.request_stop()
        return first, [update async for update in stream]

    first, rest = asyncio.run(stop_after_three())
    assert [s for _, s in first][-1].startswith("Generating… 3 tokens")
    assert len(rest) == 1 and 4 <= settles(produced) < 500  # the batch may run ahead of the reader
    story, status = rest[0]
    assert re.match(r"4 tokens in [\d.]+ s · \*\*[\d.]+ tokens/s\*\* · stopped · model \*\*tiny\*\*", status), status
    assert story.startswith(first[-1][0])
    teller.request_stop()  # a Stop after the end is forgotten by the next Generate
    teller.begin()
    assert FINAL.match(updates(teller.stream("Once upon a time", 10, 0.8, 200, 1.0, 1))[-1][1])


def test_eight_users_at_once_one_stops_one_sends_a_bad_value_one_fails(server, produced, monkeypatch):
    """8 gradio_client users at the same time, each its own session: their stories are decoded
    together and equal the ones each seed gives alone; one presses Stop (only its story
    ends), one sends a bad value and one's prompt breaks the model: each of them gets its
    own message and nobody else notices."""
    from tsfast.model import GPT

    client, url = server
    from tsfast.data.tokenizer import encode

    boom = "Boom! goes the model, and the story is over before it started."
    boom_len = len(encode(boom))  # the prefill of this length fails (the others are 4 and 96 long)
    assert boom_len not in (len(encode("Once upon a time")), 96)
    real_hidden = GPT.hidden

    def hidden(self, idx, *args, **kwargs):
        if idx.shape[1] == boom_len:
            raise RuntimeError("this prompt breaks the model")
        return real_hidden(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "hidden", hidden)
    seeds = random.sample(range(10**6), 5)
    alone = [ask(client, seed=s, max_new_tokens=40)[0] for s in seeds]
    users = [Client(url, verbose=False) for _ in range(8)]
    produced.batches.clear()
    jobs = [users[i].submit("Once upon a time", 40, 0.8, 200, 1.0, s, api_name="/generate") for i, s in enumerate(seeds)]
    stopper = users[5].submit("Once upon a time", 500, 0.8, 200, 1.0, 1, api_name="/generate")
    bad = users[6].submit("Once upon a time", 40, 0.8, 200, 1.0, 1.5, api_name="/generate")
    failing = users[7].submit(boom, 40, 0.8, 200, 1.0, 1, api_name="/generate")
    while sum(o[1].startswith("Generating") for o in stopper.outputs()) < 3:
        time.sleep(0.02)
    users[5].predict(api_name="/stop")
    results = [job.result(timeout=120) for job in jobs]
    assert [story for story, _ in results] == alone
    assert all(FINAL.match(status) for _, status in results)
    story, status = stopper.result(timeout=120)
    assert "· stopped ·" in status and 3 <= int(status.split()[0]) < 500
    assert bad.result(timeout=120) == ("", "⚠️ Seed must be a whole number from -1 to 2147483647; got 1.5.")
    story, status = failing.result(timeout=120)
    assert story == boom and status.startswith("⚠️ Generation failed (RuntimeError: this prompt breaks the model)")
    assert max(produced.batches) >= 4  # decoded together, not one after another
    assert FINAL.match(ask(client, max_new_tokens=10)[1])  # and the server serves on
