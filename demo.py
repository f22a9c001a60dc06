# `uv run demo.py` reads this block (PEP 723) and sets up an environment with Gradio for it;
# to `python demo.py` and the tests it is a comment.
# /// script
# requires-python = ">=3.11"
# dependencies = ["tinystories-fast[demo,hf]"]
#
# [tool.uv.sources]
# tinystories-fast = { path = ".", editable = true }
# ///
"""Gradio demo: type the start of a story and watch a trained model continue it.

    uv run demo.py [--ckpt out/ckpt.pt] [--device auto] [--max-batch 8] [--host 127.0.0.1] [--port 7870] [--share]

The page streams the story token by token and ends with a status line: tokens/s and the
model's name, size and validation loss. Without a checkpoint the page still comes up and
shows the command that trains one (`uv run train.py`); Generate tries to load it again, so
a model trained while the demo runs is picked up.

Users are served together: up to `--max-batch` stories are decoded as one batch, and a
request that arrives while others are generating joins it at the next token (continuous
batching, tsfast/batching.py); more users wait in the queue. Each story has its own row of
the cache and its own random generator, so stories never mix and a seed gives the same
story alone or together. Stop ends only that user's story. Bad input never breaks the
server: an empty prompt, a value out of a control's range (possible through the API), or a
missing/incompatible checkpoint gives a message in the status line, and a request that
fails while generating ends with a message without touching the others. A prompt longer than the context is cut from the left
(the model sees its newest tokens) and the status line says so. Typed `<|endoftext|>`,
emoji and other scripts are ordinary text; tokens a compact-vocabulary model never saw are
reported and shown to it as its one unknown token.

API (gradio_client): `Client(url).predict(prompt, max_new_tokens, temperature, top_k, top_p,
seed, api_name="/generate")` returns (story, status); `submit(...)` streams, and
`predict(api_name="/stop")` from the same Client is the Stop button.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from tsfast.clitools import check_bind, quiet_exits

DEFAULT_PORT = 7870
TRAIN_COMMAND = "uv run train.py"
MAX_PROMPT_CHARS = 20_000
EXAMPLES = [
    "Once upon a time",
    "One day, a little girl named Lily found a",
    "Tom and his dog went to the park. They",
    "The sun was shining and the birds were singing. Sam wanted to",
]
log = logging.getLogger("tsfast.demo")


def unchecked(component):
    """Let the component's value through as sent: `StoryTeller.stream` checks it and names
    the control (Gradio's own check says only "Value 900 is greater than maximum value
    500."). Done per instance: a Component subclass would make Gradio write a .pyi stub
    next to this file."""
    component.preprocess = lambda payload: payload
    return component


@dataclass(frozen=True)
class Control:
    label: str
    low: float
    high: float
    whole: bool  # whole numbers only

    def read(self, value):
        """The value as int/float, or ValueError naming this control and its range."""
        span = f"from {self.low} to {self.high}"
        kind = "a whole number" if self.whole else "a number"
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.whole:
            ok = float(value).is_integer()
        if not ok or not self.low <= value <= self.high:
            shown = repr(value)[:40]
            raise ValueError(f"{self.label} must be {kind} {span}; got {shown}.")
        return int(value) if self.whole else float(value)


MAX_TOKENS = Control("Max New Tokens", 10, 500, True)
TEMPERATURE = Control("Temperature", 0.1, 2.0, False)
TOP_K = Control("Top-k", 0, 500, True)
TOP_P = Control("Top-p", 0.05, 1.0, False)
SEED = Control("Seed", -1, 2_147_483_647, True)


def read_prompt(prompt) -> str:
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ValueError(f"The prompt must be text; got {type(prompt).__name__}.")
    if not prompt.strip():
        raise ValueError('The prompt is empty: type the beginning of a story, e.g. "Once upon a time".')
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"The prompt has {len(prompt):,} characters; the demo takes at most {MAX_PROMPT_CHARS:,} "
            "(and the model reads only the last part of a long prompt anyway)."
        )
    return prompt


class StoryTeller:
    """Holds the model (loaded lazily, retried until it loads) and streams stories."""

    def __init__(self, ckpt: str | Path, device: str = "auto", max_batch: int = 8):
        self.ckpt = str(ckpt)
        self.device = device
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self.loaded = None
        self.server = None  # a tsfast.batching.BatchServer once the model is loaded
        self.error: str | None = None
        self._stops: set[str | None] = set()  # sessions that pressed Stop

    def load(self):
        """The LoadedModel, or None with `self.error` set to why not."""
        from tsfast.batching import BatchServer
        from tsfast.hf.load import load_model
        from tsfast.train.checkpoint import CheckpointError

        with self._lock:
            if self.loaded is None:
                try:
                    loaded = load_model(self.ckpt, device=self.device)
                    self.server = BatchServer(loaded.model, max_batch=self.max_batch, vocab=loaded.vocab)
                    self.loaded, self.error = loaded, None
                except (CheckpointError, ValueError, OSError) as e:
                    self.error = str(e)
            return self.loaded

    def missing_model_markdown(self) -> str:
        return (
            f"**No model to run.** {self.error}\n\n"
            f"Train one (the `tiny` preset takes a few minutes on a CPU):\n\n"
            f"```\n{TRAIN_COMMAND}\n```\n\n"
            f"then press Generate again, or restart with `uv run demo.py --ckpt PATH`."
        )

    def model_line(self) -> str:
        m = self.loaded
        val = f"val loss {m.val_loss:.3f}" if m.val_loss is not None else "no val loss yet"
        device = next(m.model.parameters()).device
        return f"model **{m.name}** · {m.num_params / 1e6:.2f}M parameters · {val} (step {m.step}) · {device.type}"

    def info(self) -> str:
        """The line under the title: the model, or what to do without one."""
        if self.load() is None:
            return self.missing_model_markdown()
        m = self.loaded
        vocab = f"compact vocabulary of {m.vocab.size} tokens" if m.vocab is not None else "GPT-2 vocabulary"
        return f"{self.model_line()} · {vocab} · context {m.model.config.block_size} tokens"

    def prompt_notes(self, ids: list[int]) -> list[str]:
        from tsfast.generate import prompt_fit

        m = self.loaded
        dropped, unknown = prompt_fit(m.model, ids, m.vocab)
        notes = []
        if dropped:
            notes.append(
                f"the prompt has {len(ids)} tokens; the context holds {m.model.config.block_size}, "
                f"so the model saw only its last {len(ids) - dropped}"
            )
        if unknown:
            notes.append(f"{unknown} prompt token(s) are not in this model's vocabulary and were read as 'unknown'")
        return notes

    def begin(self, request: gr.Request = None) -> None:
        """Generate was pressed: forget an earlier Stop of this session."""
        self._stops.discard(_session(request))

    def request_stop(self, request: gr.Request = None) -> None:
        """Stop was pressed: the session's generation ends after its current token (or
        at once if it is still waiting in the queue), and says so in the status line."""
        self._stops.add(_session(request))

    async def stream(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, request: gr.Request = None):
        """Yield (story so far, status line) after every token. A coroutine, so that Gradio
        runs it on its event loop: a thread per user, woken for every token, would compete
        with the decoding thread for the interpreter lock."""
        try:
            prompt = read_prompt(prompt)
            settings = {
                "max_new_tokens": MAX_TOKENS.read(max_new_tokens),
                "temperature": TEMPERATURE.read(temperature),
                "top_k": TOP_K.read(top_k),
                "top_p": TOP_P.read(top_p),
            }
            seed = SEED.read(-1 if seed is None or seed == "" else seed)
        except ValueError as e:
            yield "", f"⚠️ {e}"
            return
        session = _session(request)
        if session in self._stops:
            self._stops.discard(session)
            yield "", "Stopped before it started."
            return
        if self.loaded is None and await asyncio.to_thread(self.load) is None:  # loading takes seconds
            yield "", self.missing_model_markdown()
            return
        async for update in self._generate(prompt, settings, None if seed < 0 else seed, session):
            yield update

    async def _generate(self, prompt: str, settings: dict, seed: int | None, session: str | None):
        from tsfast.batching import Request
        from tsfast.data.tokenizer import encode
        from tsfast.generate import IncrementalDetokenizer

        ids = encode(prompt)
        notes = self.prompt_notes(ids)
        story, detok, count, stopped = prompt, IncrementalDetokenizer(), 0, False
        start = time.perf_counter()
        stream = None
        try:
            stream = self.server.submit(Request(ids, seed=seed, **settings))
            async for event in stream:
                if event.error is not None:
                    raise event.error
                if event.token is None:
                    continue
                count += 1
                story += detok.push(event.token)
                if session in self._stops:
                    stopped = True
                    break
                yield story, f"Generating… {count} tokens · {count / (time.perf_counter() - start):.1f} tokens/s"
            story += detok.flush()
        except Exception as e:  # keep serving; the console gets the traceback
            log.exception("generation failed")
            yield story, f"⚠️ Generation failed ({type(e).__name__}: {e}). The server is still running."
            return
        finally:
            if stream is not None:
                stream.cancel()  # Stop, or the client went away: the story leaves the batch
            self._stops.discard(session)
        elapsed = time.perf_counter() - start
        if stopped:
            ended = "stopped"
        else:
            ended = "reached Max New Tokens" if count >= settings["max_new_tokens"] else "the story ended"
        status = f"{count} tokens in {elapsed:.2f} s · **{count / elapsed:.1f} tokens/s** · {ended} · {self.model_line()}"
        if notes:
            status += "\n\nNote: " + "; ".join(notes) + "."
        yield story, status


def _session(request: gr.Request | None) -> str | None:
    return request.session_hash if request is not None else None


def build_app(ckpt: str | Path = "out/ckpt.pt", device: str = "auto", max_batch: int = 8) -> gr.Blocks:
    """The demo's page (not launched); up to `max_batch` stories are generated together."""
    teller = StoryTeller(ckpt, device, max_batch)
    with gr.Blocks(title="tsfast · TinyStories") as app:
        gr.Markdown("# TinyStories, continued by a small GPT\nType the start of a story and press **Generate**.")
        info = gr.Markdown(teller.info(), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], lines=3, elem_id="prompt")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                story = gr.Textbox(label="Story", lines=14, interactive=False, elem_id="story")
                status = gr.Markdown(label="Status", elem_id="status")
            with gr.Column(scale=1):
                max_tokens = gr.Slider(10, 500, value=200, step=1, label=MAX_TOKENS.label, elem_id="max-new-tokens")
                temperature = gr.Slider(0.1, 2.0, value=0.8, step=0.05, label=TEMPERATURE.label)
                top_k = gr.Slider(0, 500, value=200, step=1, label=TOP_K.label, info="0 = off")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label=TOP_P.label, info="1 = off")
                seed = gr.Number(value=-1, precision=0, label=SEED.label, info="-1 = a new random story each time",
                                 elem_id="seed")
                for control in (max_tokens, temperature, top_k, top_p, seed):
                    unchecked(control)
        gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[prompt], label="Example prompts")
        # Stop is a flag the running generation reads after every token, so its last
        # status line (with the speed) always arrives; Gradio's `cancels` would cut the
        # stream off before it, racing with the Stop handler's own output.
        go.click(teller.begin, queue=False, api_name=False).then(
            teller.stream,
            inputs=[prompt, max_tokens, temperature, top_k, top_p, seed],
            outputs=[story, status],
            api_name="generate",
            concurrency_limit=max_batch,  # one batch row per running request; the rest queue
            # The handler yields plain strings, which is what the Textbox and Markdown would
            # make of them; skipping Gradio's postprocess spares two worker-thread round
            # trips per token (BENCHMARKS.md section 5).
            postprocess=False,
        )
        stop.click(teller.request_stop, queue=False, api_name="stop")
        app.load(teller.info, outputs=[info], api_name=False)
    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Gradio demo of a tsfast checkpoint.")
    p.add_argument("--ckpt", default="out/ckpt.pt",
                   help="a checkpoint, an exported directory or a Hub repo id (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cuda, mps or cpu (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="stories generated together at most; more users wait in the queue (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on; 0.0.0.0 for the network (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link (off by default)")
    return p.parse_args(argv)


@quiet_exits
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s")
    from tsfast.train.runtime import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        print(f"error: --port must be from 1 to 65535, got {args.port}", file=sys.stderr)
        return 2
    if args.max_batch < 1:
        print(f"error: --max-batch must be at least 1, got {args.max_batch}", file=sys.stderr)
        return 2
    problem = check_bind(args.host, args.port)
    if problem:
        print(f"error: {problem[1]}", file=sys.stderr)
        return problem[0]
    app = build_app(args.ckpt, args.device, args.max_batch)
    try:
        app.queue(max_size=64).launch(server_name=args.host, server_port=args.port, share=args.share)
    except OSError as e:
        print(f"error: cannot serve on {args.host}:{args.port} ({e}); pick another with --port", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
