"""Where the time of batched decoding and of the demo goes: the measurements behind
BENCHMARKS.md section 5 that are not benchmark rows.

    uv run python benchmarks/batched_parts.py output-layer        # 1 vs 8 rows, F.linear vs packed
    uv run python benchmarks/batched_parts.py step-profile [--rows 8] [--new-tokens 200]
    uv run python benchmarks/batched_parts.py demo-cpu [--model baby_cpu]
    uv run python benchmarks/batched_parts.py lock [--work-ms 1.5]

- output-layer: the tied output layer of baby_cpu (50304 x 256 fp32), median of 30 calls,
  with the weight hot in the caches and with a 400 MB write between calls (cold).
- step-profile: torch.profiler over a BatchDecoder run (random baby_cpu weights, 16-token
  prompts, top-k 50), the ops by self CPU time.
- demo-cpu: CPU seconds of the demo server process and of the 8 gradio_client users over
  one round of test_generate.py's demo benchmark, for --max-batch 1 and 8.
- lock: a BatchServer serving 8 x 64 tokens to 8 reader threads that each spend
  --work-ms of Python per token under one lock (a stand-in for a web server's work per
  update), against readers that do nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _model(name: str = "baby_cpu"):
    from test_generate import model_for  # the benchmark's random-weight model

    return model_for(name)


def _median_ms(fn, calls: int = 30, flush: torch.Tensor | None = None) -> float:
    fn()
    times = []
    for _ in range(calls):
        if flush is not None:
            flush.fill_(1.0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def output_layer(args) -> None:
    import torch.nn.functional as F

    from tsfast.output_layer import OutputLayer

    weight = _model().wte.weight.detach()
    packed = OutputLayer(weight, weight.shape[0], rows=8)
    junk = torch.empty(100_000_000)  # 400 MB: more than the shared L3
    one, eight = torch.randn(1, weight.shape[1]), torch.randn(8, weight.shape[1])
    for label, flush in (("hot", None), ("cold", junk)):
        print(f"{label}: F.linear 1 row {_median_ms(lambda: F.linear(one, weight), flush=flush):.2f} ms, "
              f"8 rows {_median_ms(lambda: F.linear(eight, weight), flush=flush):.2f} ms; "
              f"packed 8 rows {_median_ms(lambda: packed(eight), flush=flush):.2f} ms (packs: {packed.packs})")


def step_profile(args) -> None:
    from torch.profiler import profile

    from tsfast.batching import BatchDecoder, Request

    model = _model()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50257, (16,), generator=gen).tolist() for _ in range(args.rows)]

    def run():
        decoder = BatchDecoder(model, max_batch=args.rows)
        for i, prompt in enumerate(prompts):
            decoder.add(Request(prompt, args.new_tokens, top_k=50, seed=i, eos_id=None))
        while decoder.busy:
            decoder.step()

    run()
    with profile() as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def demo_cpu(args) -> None:
    import test_generate as bench

    def cpu_seconds(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    for max_batch in (1, bench.DEMO_USERS):
        with bench.demo_process(args.model, max_batch) as (proc, url):
            clients = bench.demo_users(url)
            bench._serve_users(clients[:1], 16)
            for _ in range(2):
                server, ours = cpu_seconds(proc.pid), time.process_time()
                wall = bench._serve_users(clients, args.new_tokens)
                print(f"--max-batch {max_batch}: {wall:.2f} s wall; CPU: server {cpu_seconds(proc.pid) - server:.2f} s,"
                      f" clients {time.process_time() - ours:.2f} s")


def lock(args) -> None:
    from tsfast.batching import BatchServer, Request

    server = BatchServer(_model(), max_batch=8)
    web = threading.Lock()  # one event loop: the readers' work is serialized

    def reader(seed: int, work_s: float):
        for _ in server.submit(Request([464, 3290, 373], 64, top_k=200, seed=seed, eos_id=None)):
            with web:
                until = time.perf_counter() + work_s
                while time.perf_counter() < until:
                    pass

    for work_ms in (0.0, args.work_ms):
        for _ in range(3):
            threads = [threading.Thread(target=reader, args=(i, work_ms / 1e3)) for i in range(8)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print(f"{work_ms} ms of reader work per token: 8 x 64 tokens in {time.perf_counter() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("output-layer")
    p = sub.add_parser("step-profile")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=200)
    p = sub.add_parser("demo-cpu")
    p.add_argument("--model", default="baby_cpu")
    p.add_argument("--new-tokens", type=int, default=64)
    p = sub.add_parser("lock")
    p.add_argument("--work-ms", type=float, default=1.5)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    {"output-layer": output_layer, "step-profile": step_profile, "demo-cpu": demo_cpu, "lock": lock}[args.what](args)


if __name__ == "__main__":
    main()
