"""Run output: console lines, out/metrics.jsonl, and Weights & Biases.

Only rank 0 writes anything. metrics.jsonl gets one JSON object per line:

    {"type": "train", "step", "loss", "lr", "ms", "tokens_per_s", "tflops", "mfu"}   (mfu: null
                                                          where the device's peak is unknown)
    {"type": "eval", "step", "train_loss", "val_loss", "best_val_loss"}
    {"type": "kernels", "step", "choices": [...]}   (--kernels auto on CUDA: the measured
                                                          choices, tsfast/ops/selection.py)

WandB is imported only with --wandb. A WandB that fails to start or to log prints one warning
and the run goes on without it: losing a dashboard never costs a training run.

The console cannot stop a run with a traceback either: when stdout's reader goes away
(`train.py | head -3`) the rest of the output goes to /dev/null and `pipe_closed` asks the
loop to stop as SIGPIPE would (resume.pt written, exit code 141). A failing write to
metrics.jsonl (disk full) sets `error`, an OutputError the loop stops on (exit code 3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tsfast.clitools import silence_stdout
from tsfast.train.outdir import OutputError


def format_train_line(rec: dict) -> str:
    parts = [
        f"iter {rec['step']:>6d}",
        f"loss {rec['loss']:.4f}",
        f"lr {rec['lr']:.2e}",
        f"{rec['ms']:8.1f} ms/iter",
        f"{rec['tokens_per_s']:9,.0f} tok/s",
        f"{rec['tflops']:.3g} TFLOPS",
    ]
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


class WandbRun:
    """A thin, failure-proof wrapper around a wandb run."""

    def __init__(self, *, project: str, name: str, config: dict, run_id: str | None, say):
        self.say = say
        self.run = None
        try:
            import wandb

            self.run = wandb.init(project=project, name=name, config=config, id=run_id, resume="allow")
        except Exception as e:
            self.say(f"warning: WandB could not start ({type(e).__name__}: {e}); training goes on without it")

    @property
    def id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, data: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=step)
        except Exception as e:
            self.say(f"warning: WandB logging failed ({type(e).__name__}: {e}); WandB is off for the rest of the run")
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                self.say(f"warning: WandB finish failed ({type(e).__name__}: {e})")
            self.run = None


class RunLog:
    """Console, metrics.jsonl and (optionally) WandB for one process; silent off rank 0."""

    def __init__(self, out_dir: str | Path, *, is_main: bool):
        self.is_main = is_main
        self.path = Path(out_dir) / "metrics.jsonl"
        self.file = None
        self.wandb: WandbRun | None = None
        self.pipe_closed = False  # stdout's reader went away
        self.error: OutputError | None = None  # metrics.jsonl could not be written

    def say(self, message: str) -> None:
        if self.is_main:
            try:
                print(message, flush=True)
            except BrokenPipeError:
                self.pipe_closed = True
                silence_stdout()
            except OSError:  # a console that is gone (e.g. after a hangup): train on
                silence_stdout()

    def warn(self, message: str) -> None:
        if self.is_main:
            try:
                print(message, file=sys.stderr, flush=True)
            except OSError:
                pass

    def open(self, *, append: bool) -> None:
        """Start writing metrics.jsonl (a fresh file, or appended to when resuming)."""
        if self.is_main:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a" if append else "w", encoding="utf-8")
            except OSError as e:
                raise OutputError(f"cannot write {self.path} ({e.strerror or e}); fix the directory's "
                                  "permissions or pick another --out_dir") from None

    def start_wandb(self, *, project: str, name: str, config: dict, run_id: str | None) -> None:
        if self.is_main:
            self.wandb = WandbRun(project=project, name=name, config=config, run_id=run_id, say=self.warn)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def _write(self, rec: dict) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(rec) + "\n")
                self.file.flush()
            except OSError as e:
                try:
                    self.file.close()  # drops the buffer it could not flush
                except OSError:
                    pass
                self.file = None
                self.error = OutputError(f"could not write {self.path} ({e.strerror or e}); the "
                                         "checkpoints written so far stay. Free some disk space or "
                                         "fix the directory's permissions, then continue with --resume")

    def train(self, rec: dict, extra_lines: list[str] = (), extra_metrics: dict | None = None) -> None:
        if not self.is_main:
            return
        rec = {"type": "train", **rec}
        self.say(format_train_line(rec))
        for line in extra_lines:
            self.say("    " + line)
        self._write(rec)
        if self.wandb is not None:
            data = {f"train/{k}": v for k, v in rec.items() if k not in ("type", "step") and v is not None}
            self.wandb.log({**data, **(extra_metrics or {})}, step=rec["step"])

    def eval(self, rec: dict) -> None:
        if not self.is_main:
            return
        rec = {"type": "eval", **rec}
        self.say(
            f"eval at iter {rec['step']}: train loss {rec['train_loss']:.4f}, val loss "
            f"{rec['val_loss']:.4f} (best {rec['best_val_loss']:.4f})"
        )
        self._write(rec)
        if self.wandb is not None:
            self.wandb.log({"eval/train_loss": rec["train_loss"], "eval/val_loss": rec["val_loss"]}, step=rec["step"])

    def kernels(self, step: int, records: list[dict], lines: list[str]) -> None:
        """Kernel choices made under --kernels auto: a table on the console, one record."""
        if not self.is_main or not records:
            return
        self.say("kernel selection (--kernels auto; median ms of each candidate, forward+backward "
                 "or forward alone; speedup over the fastest plain-PyTorch way):")
        for line in lines:
            self.say("    " + line)
        self._write({"type": "kernels", "step": step, "choices": records})

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
