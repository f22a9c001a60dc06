"""Command line of train.py: flags -> TrainConfig -> `loop.train`, and exit codes.

    --config NAME       a preset (tiny, baby_cpu, baby_gpu, gpt2); default: baby_gpu on a CUDA
                        machine, else tiny
    --set KEY=VALUE     any config field (repeatable); also --KEY VALUE for every field
    --resume [PATH]     continue from PATH (default: <out_dir>/resume.pt)

Exit codes: 0 done; 1 the loss became non-finite; 2 bad input (one message, nothing written);
128 + N stopped by signal N after writing resume.pt (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from tsfast.config import (
    GPU_PRESETS,
    PRESETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    overridable_fields,
    preset,
)

EXIT_NONFINITE = 1
EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """A flag argparse rejected."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one message and exit code 2, raised so main() reports it
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py",
        description="Train a GPT on TinyStories (or the synthetic corpus).",
        epilog="Exit codes: 0 done, 1 non-finite loss, 2 bad input, 128+N stopped by signal N "
        "(resume.pt written). Several processes: torchrun --standalone --nproc_per_node=N train.py ...",
        allow_abbrev=False,
    )
    p.add_argument("--config", help=f"preset: {', '.join(PRESETS)} (default: baby_gpu with CUDA, else tiny)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue from a resume checkpoint (default: <out_dir>/resume.pt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in overridable_fields():
        flag = "--" + name
        if fields[name].type in ("bool", bool):
            p.add_argument(flag, dest=name, nargs="?", const="true", metavar="BOOL")
            p.add_argument("--no-" + name, "--no_" + name, dest=name, action="store_const", const="false",
                           help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=name, metavar=name.upper())
    return p


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse(argv: list[str] | None) -> tuple[TrainConfig, dict | None, list[str]]:
    """(config, resume checkpoint dict or None, lines saying what was chosen and why).

    Raises ConfigError / UsageError / CheckpointError for bad input."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise ConfigError(
            f"unknown option {flag!r}; the options are --config, --resume, --set KEY=VALUE and "
            f"--KEY VALUE for KEY in: {', '.join(overridable_fields())}"
        )
    overrides: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r} needs the form key=value, e.g. --set lr=3e-4")
        overrides[key.strip()] = value.strip()
    for name in overridable_fields():
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    notes = []
    resume = None
    if args.resume is not None:
        from tsfast.train import checkpoint as ckpt_io

        out_dir = overrides.get("out_dir", "out")
        path = Path(out_dir) / "resume.pt" if args.resume == "auto" else Path(args.resume)
        resume = ckpt_io.read_checkpoint(path, resume=True)
        if args.config is None:
            try:
                base = TrainConfig(**ckpt_io.saved_train_config(resume))
            except TypeError as e:
                raise ckpt_io.CheckpointError(f"{path} has a train config this tsfast cannot read: {e}") from None
            notes.append(f"resuming {path}: config {base.name} from the checkpoint")
        else:
            base = preset(args.config)
            notes.append(f"resuming {path} with --config {args.config}")
        cfg = apply_overrides(base, overrides)
        ckpt_io.check_same_architecture(resume, dataclasses.asdict(cfg), path)
        return cfg, resume, notes
    if args.config is not None:
        cfg = apply_overrides(preset(args.config), overrides)
        notes.append(f"config: {cfg.name} (--config)")
    else:
        on_cuda = overrides.get("device") in (None, "auto", "cuda") and _cuda_available()
        name = "baby_gpu" if on_cuda else "tiny"
        why = "a CUDA GPU is available" if on_cuda else "no CUDA GPU here (it trains in a few minutes on a CPU)"
        cfg = apply_overrides(preset(name), overrides)
        notes.append(f"config: {name}, because {why}; choose with --config {{{','.join(PRESETS)}}}")
    if "compile" not in overrides and cfg.name in GPU_PRESETS and cfg.compile:
        notes.append("torch.compile: on (GPU preset; --no-compile turns it off)")
    return cfg, resume, notes


def main(argv: list[str] | None = None) -> int:
    from tsfast.ops import BackendUnavailable
    from tsfast.train.checkpoint import CheckpointError
    from tsfast.train.loop import NonFiniteLoss, train
    from tsfast.train.runtime import DeviceError

    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        from tsfast.data.meta import DataError
    except ImportError:  # the data package is absent: nothing raises its error
        DataError = ConfigError
    try:
        cfg, resume, notes = parse(argv)
        if is_main:
            for line in notes:
                print(line, flush=True)
        result = train(cfg, resume=resume)
    except (UsageError, ConfigError, CheckpointError, DeviceError, BackendUnavailable, DataError) as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as e:
        print(f"train.py: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except KeyboardInterrupt:
        print("train.py: interrupted (a second signal stops at once, without saving)", file=sys.stderr, flush=True)
        return 130
    return result.exit_code
