"""The training pipeline behind `train.py`.

    cli.py          flags -> TrainConfig; main() maps bad input to one message and exit code 2
    runtime.py      device, dtype and autocast, seeding, the --kernels preflight, memory estimate
    distributed.py  torchrun / DDP setup, rank agreement on stopping
    data.py         which corpus, the compact vocabulary, the batch samplers
    schedule.py     learning rate: linear warmup, then cosine decay
    checkpoint.py   atomic, checksummed saves, resume state, `read_checkpoint` (verifies every
                    load) and `load_for_inference` for sample.py and the demo
    ckpt_fields.py  the type and range checks of every checkpoint field
    outdir.py       --out_dir preflight and lock, free-disk check, mid-run write errors
    signals.py      SIGINT/SIGTERM/SIGHUP: stop after the step, or at once on a second one
    logs.py         console lines, out/metrics.jsonl, Weights & Biases
    loop.py         the training loop: accumulation, mixed precision, eval, checkpoints, signals

Importing this package imports none of them.
"""
