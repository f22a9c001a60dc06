"""The training pipeline behind `train.py`.

    cli.py          flags -> TrainConfig; main() maps bad input to one message and exit code 2
    runtime.py      device, dtype and autocast, seeding, the --kernels preflight
    distributed.py  torchrun / DDP setup, rank agreement on stopping
    data.py         which corpus, the compact vocabulary, the batch samplers
    schedule.py     learning rate: linear warmup, then cosine decay
    checkpoint.py   atomic saves, resume state, `load_for_inference` for sample.py and the demo
    logs.py         console lines, out/metrics.jsonl, Weights & Biases
    loop.py         the training loop: accumulation, mixed precision, eval, checkpoints, signals

Importing this package imports none of them.
"""
