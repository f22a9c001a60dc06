# `uv run sample.py` reads this block (PEP 723) and sets up an environment with only what
# sampling needs; add an extra with `--with`, e.g. `uv run --with 'tinystories-fast[hf]' sample.py`.
# /// script
# requires-python = ">=3.11"
# dependencies = ["tinystories-fast"]
#
# [tool.uv.sources]
# tinystories-fast = { path = ".", editable = true }
# ///
"""Sample stories from a trained checkpoint, printing tokens as they arrive.

    uv run sample.py --prompt "Once upon a time" --num-samples 3 --max-new-tokens 200 \\
        --temperature 0.8 --top-k 200 --seed 1 [--ckpt out/ckpt.pt] [--device auto]

--ckpt also takes a Hugging Face directory (`python -m tsfast.export` writes one), GPT-2
(gpt2, gpt2-medium, ...) or a Hub repo id OWNER/NAME (`tsfast.hf.load`; needs the hf extra).

Sample i uses seed + i, so a run with the same flags prints the same stories, whatever
`--batch-size`. The samples are decoded together, up to `--batch-size` at a time (a finished
one's place goes to the next; tsfast/batching.py), and printed in order: the first streams
token by token, the others appear as their turn comes. The last line gives the speed in
generated tokens per second over the whole run (prompt processing included). `--no-cache`
decodes one sample at a time, re-running the whole context for every token (to compare).

Exit codes: 0 done, 1 no usable checkpoint (missing, damaged, or a field out of range),
2 bad arguments, 130 interrupted (Ctrl-C, start-up included), 141 stdout closed (`| head`).
"""

from __future__ import annotations

import argparse
import sys
import time

from tsfast.clitools import quiet_exits

EXIT_CHECKPOINT, EXIT_USAGE = 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sample text from a tsfast checkpoint.",
        epilog="Exit codes: 0 done, 1 no usable checkpoint, 2 bad arguments, 130 interrupted, "
        "141 stdout closed.",
    )
    p.add_argument("--prompt", default="Once upon a time", help="text to continue (default: %(default)r)")
    p.add_argument("--num-samples", type=int, default=3, help="how many samples (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="samples decoded together at most; each holds a KV cache of 2 x layers x context x "
                        "width values (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens per sample at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=200, help="keep the k likeliest tokens, 0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="sample i uses seed + i (default: %(default)s)")
    p.add_argument("--ckpt", default="out/ckpt.pt",
                   help="a checkpoint, an exported directory or a Hub repo id (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cuda, mps or cpu (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole context for every token (slow; for comparison)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, worded for the user, or None."""
    from tsfast.config import SEED_MAX, SEED_MIN
    from tsfast.generate import check_sampling

    if not SEED_MIN <= args.seed <= SEED_MAX - max(args.num_samples - 1, 0):
        return (f"--seed must be a whole number from {SEED_MIN} to {SEED_MAX} (sample i uses seed + i), "
                f"got {args.seed}")
    if not args.prompt.strip():
        return '--prompt is empty: give some text to continue, e.g. --prompt "Once upon a time"'
    if args.num_samples < 1:
        return f"--num-samples must be at least 1, got {args.num_samples}"
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be at least 1, got {args.max_new_tokens}"
    try:
        check_sampling(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
        )
    except ValueError as e:
        return "--" + str(e).replace("_", "-")
    return None


def describe(loaded, device) -> str:
    val = f"val loss {loaded.val_loss:.4f}" if loaded.val_loss is not None else "no val loss"
    vocab = f"compact vocabulary of {loaded.vocab.size}" if loaded.vocab is not None else "GPT-2 vocabulary"
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return (
        f"model: {loaded.name}, {loaded.num_params / 1e6:.2f}M parameters, {val} at step {loaded.step}, "
        f"{vocab}, context {loaded.model.config.block_size}, {device} {dtype}"
    )


def prompt_notes(loaded, prompt_ids: list[int]) -> list[str]:
    from tsfast.generate import prompt_fit

    dropped, unknown = prompt_fit(loaded.model, prompt_ids, loaded.vocab)
    notes = []
    if dropped:
        notes.append(
            f"note: the prompt has {len(prompt_ids)} tokens and the context holds "
            f"{loaded.model.config.block_size}: only its last {len(prompt_ids) - dropped} tokens are used"
        )
    if unknown:
        notes.append(
            f"note: {unknown} prompt token(s) are not in this model's vocabulary "
            "(it was trained without them); the model sees them as one unknown token"
        )
    return notes


def write_samples(args: argparse.Namespace, loaded, prompt_ids: list[int]) -> int:
    """Decode the samples together and print them in order, each under its header; returns
    the tokens generated. Sample i's text is held back until samples 0 .. i-1 are printed."""
    from tsfast.batching import Request, generate_many
    from tsfast.generate import IncrementalDetokenizer

    n = args.num_samples
    requests = [
        Request(prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed + i)
        for i in range(n)
    ]
    detoks = [IncrementalDetokenizer() for _ in range(n)]
    held = [""] * n  # text of samples not yet on screen
    ended = [False] * n
    shown, tokens = 0, 0

    def begin(i: int) -> None:
        print(f"--- sample {i + 1} (seed {args.seed + i}) ---", flush=True)
        sys.stdout.write(args.prompt + held[i])
        sys.stdout.flush()

    begin(0)
    events = generate_many(loaded.model, requests, batch_size=args.batch_size, vocab=loaded.vocab,
                           use_cache=not args.no_cache)
    for event in events:
        i, text = event.key, ""
        if event.error is not None:
            raise event.error
        if event.token is not None:
            tokens += 1
            text = detoks[i].push(event.token)
        if event.end is not None:
            text += detoks[i].flush()
            ended[i] = True
        if i == shown:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            held[i] += text
        while ended[shown] and shown + 1 < n:
            print(flush=True)
            shown += 1
            begin(shown)
    print(flush=True)
    return tokens


@quiet_exits
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE

    from tsfast.data.tokenizer import encode
    from tsfast.hf.load import load_model
    from tsfast.train.checkpoint import CheckpointError

    try:
        loaded = load_model(args.ckpt, device=args.device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except ValueError as e:  # a device that is not there
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    device = next(loaded.model.parameters()).device
    print(describe(loaded, device), file=sys.stderr)
    prompt_ids = encode(args.prompt)
    for note in prompt_notes(loaded, prompt_ids):
        print(note, file=sys.stderr)

    start = time.perf_counter()
    total_tokens = write_samples(args, loaded, prompt_ids)  # Ctrl-C: quiet_exits
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    total_time = time.perf_counter() - start
    rate = total_tokens / total_time if total_time > 0 else 0.0
    how = "no KV cache, one at a time" if args.no_cache else f"KV cache, batch {min(args.batch_size, args.num_samples)}"
    print(
        f"{args.num_samples} sample(s), {total_tokens} tokens in {total_time:.2f} s: "
        f"{rate:.1f} tokens/s ({how}, {device})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
