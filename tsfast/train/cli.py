"""Command line of train.py: flags -> TrainConfig -> `loop.train`, and exit codes.

    --config NAME       a preset (tiny, baby_cpu, baby_gpu, gpt2); default: baby_gpu on a CUDA
                        machine, else tiny
    --set KEY=VALUE     any config field (repeatable); also --KEY VALUE for every field
    --resume [PATH]     continue from PATH (default: <out_dir>/resume.pt)
    --init_from MODEL   start from a Hugging Face GPT-2 (gpt2, gpt2-medium, ..., OWNER/NAME or a
                        directory): its shape, the preset's training settings (tsfast.hf.load)

Exit codes: 0 done; 1 the loss became non-finite; 2 bad input (one message, nothing written:
flags, config, data, checkpoint, an --out_dir that is a file, not writable or in use by
another run, a run that cannot fit in memory); 3 a write into --out_dir failed mid-run (disk
full, permission; the last good checkpoints stay); 128 + N stopped by signal N after writing
resume.pt (129 SIGHUP, 130 SIGINT, 141 stdout closed, 143 SIGTERM), or at once, without
saving, on a second signal (the same code).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
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
EXIT_OUTPUT = 3


class UsageError(ValueError):
    """A flag argparse rejected."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one message and exit code 2, raised so main() reports it
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py",
        description="Train a GPT on TinyStories (or the synthetic corpus).",
        epilog="Exit codes: 0 done, 1 non-finite loss, 2 bad input, 3 a write into --out_dir failed "
        "mid-run, 128+N stopped by signal N (resume.pt written). Several processes: "
        "torchrun --standalone --nproc_per_node=N train.py ...",
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
        overrides[key.strip().replace("-", "_")] = value.strip()
    for name in overridable_fields():
        value = getattr(args, name)
        if value is not None:
            if name in overrides and overrides[name] != value:
                raise UsageError(f"{name} is given twice: --set {name}={overrides[name]} and --{name} "
                                 f"{value}; give it once")
            overrides[name] = value
    notes = []
    resume = None
    if args.resume is not None:
        from tsfast.train import checkpoint as ckpt_io

        out_dir = overrides.get("out_dir", "out")
        path = Path(out_dir) / "resume.pt" if args.resume == "auto" else Path(args.resume)
        resume = ckpt_io.read_checkpoint(path, resume=True, note=lambda line: notes.append(f"note: {line}"))
        if args.config is None:
            base = TrainConfig(**ckpt_io.saved_train_config(resume))  # read_checkpoint checked it
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
        if not on_cuda and overrides.get("device") in (None, "auto"):
            from tsfast.train.runtime import unusable_gpu

            if unusable_gpu():
                why = "the NVIDIA GPU here cannot be used by this PyTorch (see the warning that follows)"
        cfg = apply_overrides(preset(name), overrides)
        notes.append(f"config: {name}, because {why}; choose with --config {{{','.join(PRESETS)}}}")
    if cfg.init_from:
        from tsfast.hf.load import plan_init

        cfg, init_notes = plan_init(cfg, explicit=set(overrides))
        notes += init_notes
    if "compile" not in overrides and cfg.name in GPU_PRESETS and cfg.compile:
        notes.append("torch.compile: on (GPU preset; --no-compile turns it off)")
    return cfg, resume, notes


def check_optional_packages(cfg: TrainConfig) -> None:
    """A flag that needs a package a plain install leaves out: say how to get it, up front."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "--wandb needs the wandb package, which a plain install leaves out: run "
            "`uv run python train.py --wandb ...` (pip: pip install 'tinystories-fast[wandb]')"
        )


def main(argv: list[str] | None = None) -> int:
    from tsfast.clitools import EXIT_BROKEN_PIPE, silence_stdout
    from tsfast.ops import BackendUnavailable
    from tsfast.train.checkpoint import CheckpointError
    from tsfast.train.loop import NonFiniteLoss, train
    from tsfast.train.outdir import OutDirError, OutputError
    from tsfast.train.runtime import DeviceError
    from tsfast.train.signals import startup_signals

    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        from tsfast.data.meta import DataError
    except ImportError:  # the data package is absent: nothing raises its error
        DataError = ConfigError
    bad_input = (UsageError, ConfigError, CheckpointError, DeviceError, BackendUnavailable, DataError, OutDirError)
    try:
        with startup_signals():
            cfg, resume, notes = parse(argv)
            check_optional_packages(cfg)
            if is_main:
                for line in notes:
                    print(line, flush=True)
            result = train(cfg, resume=resume)
    except bad_input as e:
        return _fail(f"train.py: error: {e}", EXIT_BAD_INPUT)
    except NonFiniteLoss as e:
        return _fail(f"train.py: {e}", EXIT_NONFINITE)
    except OutputError as e:
        return _fail(f"train.py: error: {e}", EXIT_OUTPUT)
    except BrokenPipeError:  # stdout's reader left before the run started
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        return _fail(f"train.py: stopped by {signal.Signals(signum).name} without saving "
                     "(the last good checkpoints stay)", 128 + signum)
    return result.exit_code


def _fail(message: str, code: int) -> int:
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass
    return code
