"""Where the time of batched decoding and of the demo goes: the measurements behind
BENCHMARKS.md section 5 that are not benchmark rows.

    uv run python benchmarks/batched_parts.py output-layer        # 1 vs 8 rows, F.linear vs packed
    uv run python benchmarks/batched_parts.py step-profile [--rows 8] [--new-tokens 200]
    uv run python benchmarks/batched_parts.py demo-cpu [--model baby_cpu]
    uv run python benchmarks/batched_parts.py lock [--work-ms 1.5]
    uv run python benchmarks/batched_parts.py tls

- output-layer: the tied output layer of baby_cpu (50304 x 256 fp32), median of 30 calls,
  with the weight hot in the caches and with a 400 MB write between calls (cold); and what
  packing it costs once (time, resident memory).
- step-profile: torch.profiler over a BatchDecoder run (random baby_cpu weights, 16-token
  prompts, top-k 50), the ops by self CPU time.
- demo-cpu: CPU seconds of the demo server process and of the 8 gradio_client users over
  one round of test_generate.py's demo benchmark, for --max-batch 1 and 8.
- lock: a BatchServer serving 8 x 64 tokens to 8 reader threads that each spend
  --work-ms of Python per token under one lock (a stand-in for a web server's work per
  update), against readers that do nothing.
- tls: the CPU time of one TLS context with the certificate bundle loaded, which httpx
  builds for every client gradio_client opens unless it is given one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_generate as bench  # noqa: E402  (the benchmark's random-weight models and demo users)


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

    weight = bench.model_for("baby_cpu").wte.weight.detach()
    rss, start = psutil.Process().memory_info().rss, time.perf_counter()
    packed = OutputLayer(weight, weight.shape[0], rows=8)
    print(f"packing: {1e3 * (time.perf_counter() - start):.0f} ms, "
          f"resident memory +{(psutil.Process().memory_info().rss - rss) / 2**20:.0f} MiB")
    junk = torch.empty(100_000_000)  # 400 MB: more than the shared L3
    one, eight = torch.randn(1, weight.shape[1]), torch.randn(8, weight.shape[1])
    for label, flush in (("hot", None), ("cold", junk)):
        print(f"{label}: F.linear 1 row {_median_ms(lambda: F.linear(one, weight), flush=flush):.2f} ms, "
              f"8 rows {_median_ms(lambda: F.linear(eight, weight), flush=flush):.2f} ms; "
              f"packed 8 rows {_median_ms(lambda: packed(eight), flush=flush):.2f} ms (packs: {packed.packs})")


def step_profile(args) -> None:
    from torch.profiler import profile

    from tsfast.batching import Request, generate_many

    model = bench.model_for("baby_cpu")
    requests = [Request(prompt, args.new_tokens, top_k=50, seed=i, eos_id=None)
                for i, prompt in enumerate(bench._prompts(model, args.rows))]

    def run():
        for _ in generate_many(model, requests, batch_size=args.rows):
            pass

    run()
    with profile() as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def demo_cpu(args) -> None:
    def cpu_seconds(pid: int) -> float:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system

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

    server = BatchServer(bench.model_for("baby_cpu"), max_batch=8)
    web = threading.Lock()  # one event loop: the readers' work is serialized

    def reader(seed: int, work_s: float):
        for _ in server.submit(Request(bench.PROMPT[:3], 64, top_k=200, seed=seed, eos_id=None)):
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


def tls(args) -> None:
    import ssl

    import certifi

    times = []
    for _ in range(20):  # what httpx does for every client gradio_client opens (verify=True)
        start = time.process_time()
        ssl.create_default_context(cafile=certifi.where())
        times.append(time.process_time() - start)
    print(f"a TLS context with the certificate bundle: {1e3 * statistics.median(times):.1f} ms of CPU (median of 20)")


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
    sub.add_parser("tls")
    args = parser.parse_args()
    {"output-layer": output_layer, "step-profile": step_profile, "demo-cpu": demo_cpu, "lock": lock,
     "tls": tls}[args.what](args)


if __name__ == "__main__":
    main()
