"""The training loop.

One optimizer step: `accum` micro-batches (gradient sync on the last only, under DDP), each
forward under autocast, backward through the GradScaler (fp16 only), then unscale, clip,
AdamW, learning rate from `schedule.lr_at`. Every log interval: a console line and a
metrics.jsonl record; every eval interval (and at the end): train/val loss on fixed batches,
out/ckpt.pt when val loss improves, out/resume.pt always.

Before any work: the device, dtype, kernels, seed and a memory estimate are checked, then
--out_dir is created, checked and locked for the run (tsfast.train.outdir).

Stops early, always at a step boundary and on every rank at the same step:
- SIGINT / SIGTERM / SIGHUP: writes out/resume.pt, exit code 128 + the signal number; a
  second signal stops at once, without saving, with the same code (tsfast.train.signals);
- stdout closed by its reader (`train.py | head`): like a signal, SIGPIPE's 141;
- a non-finite loss: `NonFiniteLoss` naming the step, nothing written (the last good
  checkpoints stay). Losses are checked on the device every step and read back at log and
  eval steps, so no step waits on a host sync for it;
- a failing write into --out_dir (disk full, permission): `OutputError`, one line, exit code
  3; the last good checkpoints stay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from tsfast import flops, ops
from tsfast.config import SEED_MAX, ConfigError, TrainConfig
from tsfast.model import GPT
from tsfast.ops import selection
from tsfast.train import checkpoint as ckpt_io
from tsfast.train import data as data_mod
from tsfast.train import distributed, kernel_choice, outdir, runtime
from tsfast.train.ckpt_fields import CheckpointError, check_optimizer_state
from tsfast.train.logs import RunLog
from tsfast.train.outdir import OutputError
from tsfast.train.schedule import lr_at
from tsfast.train.signals import StopSignals

SAMPLE_PROMPT = "Once upon a time"
DEBUG_DUMP_ENV = "TSFAST_DEBUG_DUMP"  # test aid: a directory for one JSON per rank at the end


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""


@dataclass
class TrainResult:
    step: int
    best_val_loss: float | None
    val_loss: float | None
    stopped_by: str | None  # None when max_iters was reached, else "SIGINT", "SIGTERM", "SIGPIPE", ... or "stop_at"
    exit_code: int
    sample: str | None


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and the embedding) only, not on biases or LayerNorms."""
    params = list(model.parameters())  # the tied embedding once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu")
    )


def optimizer_step(model, optimizer, scaler, grad_clip: float) -> None:
    """Clip (after unscaling fp16 gradients), step, update the scaler, drop the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: dict | None = None):
        self.cfg = cfg
        self.dist = distributed.from_env()
        # Everything that can reject the run comes before any work.
        self.device = runtime.resolve_device(cfg.device, self.dist.local_rank)
        self.dtype = runtime.resolve_dtype(cfg.dtype, self.device)
        runtime.preflight_kernels(cfg.kernels, self.device, cfg.n_embd // cfg.n_head)
        if cfg.grad_accum % self.dist.world_size:
            raise ConfigError(
                f"grad_accum={cfg.grad_accum} must be a multiple of the {self.dist.world_size} "
                "processes (it counts micro-steps summed over all of them)"
            )
        if cfg.seed + self.dist.world_size - 1 > SEED_MAX:
            raise ConfigError(f"seed={cfg.seed}: process i uses seed + i, which must stay <= {SEED_MAX}")
        runtime.check_memory(cfg, self.device)
        self.accum = cfg.grad_accum // self.dist.world_size
        self.lock = outdir.open_out_dir(cfg.out_dir) if self.dist.is_main else None
        try:
            self._setup(resume)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _setup(self, resume: dict | None) -> None:
        cfg = self.cfg
        self.log = RunLog(cfg.out_dir, is_main=self.dist.is_main)
        fallback = runtime.auto_device_warning(cfg.device, self.device)
        if fallback:
            self.log.warn(fallback)
        distributed.init(self.dist, self.device)
        runtime.fast_math(self.device)

        if self.dist.is_main:  # rank 0 prepares the synthetic corpus if it must
            data_mod.pick_data_dir(cfg.data)
        distributed.barrier(self.dist)
        vocab_state = resume["vocab"] if resume is not None else None
        self.corpus = data_mod.open_corpus(cfg, vocab_state=vocab_state, prepare=False)
        self.sampler, self.eval_samplers = data_mod.samplers(self.corpus, cfg, rank=self.dist.rank, device=self.device)

        runtime.seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = GPT(cfg.model_config(self.corpus.vocab_size)).to(self.device)
        if cfg.init_from and resume is None:
            from tsfast.hf.load import init_weights

            init_weights(self.model, cfg.init_from)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.best_val_loss: float | None = None
        self.val_loss: float | None = None
        self.wandb_run_id = None
        runtime.seed_everything(cfg.seed + self.dist.rank)  # dropout differs per rank
        if resume is not None:
            self._restore(resume)

        self.train_model = torch.compile(self.model) if cfg.compile else self.model
        self.eval_model = self.train_model
        self.ddp = None
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.train_model, device_ids=ids)
            self.train_model = self.ddp
        self.debug_dir = os.environ.get(DEBUG_DUMP_ENV)
        self.sync_probe = distributed.GradSyncProbe(self.ddp) if self.debug_dir and self.ddp else None
        self.batch_hashes: list[str] = []
        self.saves = 0

        self.num_params = self.model.num_params()
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        self.flops_per_token = flops.gpt_flops_per_token(
            self.num_params, cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        )
        self.device_name = runtime.device_name(self.device)
        self.meter = None
        self.logged_choices: int | None = None  # kernel choices logged so far; None: none measured
        self.signals = StopSignals()

    # ------------------------------------------------------------------ state

    def _restore(self, ckpt: dict) -> None:
        where = "the resume checkpoint"
        ckpt_io.load_model_state(self.model, ckpt, where)
        part = "optimizer"
        try:  # the fields' types were checked on reading; these check them against the model
            self.optimizer.load_state_dict(ckpt["optimizer"])
            check_optimizer_state(self.optimizer, where)
            part = "scaler"
            self.scaler.load_state_dict(ckpt["scaler"])
            part = "rng"
            states = ckpt["rng"]
            ckpt_io.set_rng_state(states[self.dist.rank] if self.dist.rank < len(states) else states[0])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{where}'s {part} state does not fit this run ({first}); resume from another "
                "checkpoint or start fresh without --resume"
            ) from None
        self.step = int(ckpt["step"])
        self.best_val_loss = ckpt.get("best_val_loss")
        self.val_loss = ckpt.get("val_loss")
        self.wandb_run_id = ckpt.get("wandb_run_id")

    def _checkpoint(self, kind: str, rng_states: list | None = None) -> dict:
        state = {
            "format_version": ckpt_io.FORMAT_VERSION,
            "kind": kind,
            "model": self.model.state_dict(),
            "model_config": dataclasses.asdict(self.model.config),
            "train_config": dataclasses.asdict(self.cfg),
            "vocab": self.corpus.vocab.state_dict() if self.corpus.vocab is not None else None,
            "data_dir": str(self.corpus.data_dir),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "val_loss": self.val_loss,
            "num_params": self.num_params,
        }
        if kind == "resume":
            state.update(
                optimizer=self.optimizer.state_dict(),
                scaler=self.scaler.state_dict(),
                rng=rng_states,
                data_step=self.step * self.accum,
                world_size=self.dist.world_size,
                wandb_run_id=self.log.wandb_id or self.wandb_run_id,
            )
        return state

    def _gather_rng(self) -> list:
        """Every rank's RNG state (a collective: all ranks call it at the same step)."""
        mine = ckpt_io.rng_state()
        if not self.dist.enabled:
            return [mine]
        states = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, mine, group=self.dist.flag_group)
        return states

    def _write(self, kind: str, rng: list | None = None) -> OutputError | None:
        """Rank 0 writes one checkpoint; the error of a failing write is returned, so that
        every rank can learn of it (`_agree`) before any of them stops."""
        name = "resume.pt" if kind == "resume" else "ckpt.pt"
        try:
            ckpt_io.save_checkpoint(self._checkpoint(kind, rng), Path(self.cfg.out_dir) / name)
        except OutputError as e:
            return e
        self.saves += 1
        return None

    def _agree(self, error: Exception | None) -> None:
        """Raise on every rank if a write (or the log) failed on rank 0."""
        if distributed.any_rank(self.dist, error is not None):
            raise error or OutputError("rank 0 could not write into --out_dir; its message says why")

    def save_resume(self, error: OutputError | None = None) -> None:
        rng = self._gather_rng()
        if self.dist.is_main and error is None:
            error = self._write("resume", rng)
        self._agree(error)

    # ------------------------------------------------------------------ steps

    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step; returns (mean loss over the micro-steps, on device; lr)."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y, doc_ids = self.sampler.batch(self.step * self.accum + micro)
            if self.debug_dir and self.step == 0:
                self.batch_hashes.append(hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest())
            last = micro == self.accum - 1
            if self.sync_probe is not None:
                self.sync_probe.where = (self.step, micro)
            no_sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with no_sync:
                with runtime.autocast(self.device, self.dtype):
                    _, loss = self.train_model(x, y, doc_ids=doc_ids)
                self.scaler.scale(loss / self.accum).backward()
            total += loss.detach().float()
        optimizer_step(self.model, self.optimizer, self.scaler, self.cfg.grad_clip)
        return total / self.accum, lr

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed eval batches of each split (their own streams)."""
        self.eval_model.eval()
        out = {}
        for split, sampler in self.eval_samplers.items():
            losses = torch.zeros(self.cfg.eval_iters, device=self.device)
            for i in range(self.cfg.eval_iters):
                x, y, doc_ids = sampler.batch(i)  # doc_ids as in training (cfg.doc_mask)
                with runtime.autocast(self.device, self.dtype):
                    losses[i] = self.eval_model(x, y, doc_ids=doc_ids)[1].float()
            out[split] = losses.mean().item()
        self.eval_model.train()
        return out

    def check_finite(self, first_bad: torch.Tensor) -> None:
        bad_step = int(first_bad.item())
        if distributed.any_rank(self.dist, bad_step >= 0):
            where = f"iteration {bad_step}" if bad_step >= 0 else f"an iteration up to {self.step} (on another process)"
            out = Path(self.cfg.out_dir)
            kept = [str(out / n) for n in ("ckpt.pt", "resume.pt") if (out / n).is_file()]
            raise NonFiniteLoss(
                f"the loss is not finite (NaN or inf) at {where}: stopping without saving. "
                + (f"The last good checkpoints stay: {', '.join(kept)}. " if kept else "No checkpoint was written yet. ")
                + f"Lower --lr (now {self.cfg.lr:g}), raise --warmup_iters, or check --grad_clip "
                f"(now {self.cfg.grad_clip:g}) and --weight_decay (now {self.cfg.weight_decay:g})."
            )

    def log_interval(self, loss_sum: torch.Tensor, steps: int, lr: float, seconds: float) -> None:
        loss = (loss_sum / steps).item()
        tokens_per_s = self.tokens_per_step * steps / seconds
        flops_per_s = self.flops_per_token * tokens_per_s
        mfu = flops.mfu(flops_per_s, self.device_name, self.dist.world_size) if self.device.type == "cuda" else None
        rec = {
            "step": self.step, "loss": loss, "lr": lr, "ms": 1e3 * seconds / steps,
            "tokens_per_s": tokens_per_s, "tflops": flops_per_s / 1e12, "mfu": mfu,
        }
        lines, metrics = [], None
        if self.meter is not None:
            lines, metrics = self.meter.lines(seconds), self.meter.metrics(seconds)
            self.meter.reset()
        self.log.train(rec, lines, metrics)

    def eval_and_save(self) -> None:
        error = None
        if self.dist.is_main:
            losses = self.evaluate()
            self.val_loss = losses["val"]
            improved = self.best_val_loss is None or self.val_loss < self.best_val_loss
            if improved:
                self.best_val_loss = self.val_loss
            self.log.eval({"step": self.step, "train_loss": losses["train"], "val_loss": self.val_loss,
                           "best_val_loss": self.best_val_loss})
            if improved:
                error = self._write("best")
            self.log_new_choices()
        self.save_resume(error)

    # ------------------------------------------------------------------ run

    def choose_kernels(self) -> None:
        """--kernels auto on CUDA: measure the candidates of every op before the first step
        (tsfast/train/kernel_choice.py), and log the choices."""
        records = kernel_choice.select(self.model, self.cfg.batch_size, self.cfg.block_size,
                                       self.device, self.dtype, self.dist, self.cfg.doc_mask)
        if records is not None:
            self.logged_choices = 0
            self.log_new_choices()

    def log_new_choices(self) -> None:
        """Log choices made since the last call (a shape first met later, in sampling say)."""
        if not self.dist.is_main or self.logged_choices is None:
            return
        new = selection.current().records()[self.logged_choices:]
        self.logged_choices += len(new)
        self.log.kernels(self.step, new, selection.format_table(new))

    def announce(self) -> None:
        cfg = self.cfg
        say = self.log.say
        say(self.corpus.why)
        if self.lock is not None and self.lock.warning:
            self.log.warn(self.lock.warning)
        say(f"model: {cfg.name}, {self.num_params:,} parameters ({self.num_params / 1e6:.2f}M), "
            f"{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, context {cfg.block_size}, "
            f"vocabulary {self.corpus.vocab_size} (padded to {self.model.config.padded_vocab_size}), "
            f"document masking {'on' if cfg.doc_mask else 'off'}")
        dtype = str(self.dtype).removeprefix("torch.")
        say(f"device: {self.device_name} ({self.device}), {dtype}"
            f"{' with GradScaler' if self.scaler.is_enabled() else ''}, kernels {cfg.kernels}, "
            f"compile {'on' if cfg.compile else 'off'}, {self.dist.world_size} process(es)")
        say(f"batch: {cfg.batch_size} x {cfg.block_size} tokens x {cfg.grad_accum} micro-steps = "
            f"{self.tokens_per_step:,} tokens per iteration; {cfg.max_iters} iterations")
        if self.step:
            say(f"resuming at iteration {self.step} (best val loss {self.best_val_loss})")

    def run(self, *, stop_at: int | None = None) -> TrainResult:
        cfg = self.cfg
        self.announce()
        self.log.open(append=self.step > 0)
        if cfg.wandb:
            self.log.start_wandb(project=cfg.wandb_project, name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                 config=dataclasses.asdict(cfg), run_id=self.wandb_run_id)
        self.choose_kernels()
        if cfg.meter:
            from tsfast import meter

            self.meter = meter.enable()
        self.signals.install()
        stopped_by, signum = None, None
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        loss_sum, steps, seconds = torch.zeros((), device=self.device), 0, 0.0
        start_step, train_seconds, t_start = self.step, 0.0, time.perf_counter()
        t0 = time.perf_counter()
        while self.step < cfg.max_iters:
            loss, lr = self.train_step()
            self.step += 1
            loss_sum += loss
            steps += 1
            first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, self.step)
            done = self.step == cfg.max_iters
            if self.step % cfg.log_interval == 0 or done:
                self.check_finite(first_bad)
                loss_sum.item()  # wait for the device before reading the clock
                seconds += time.perf_counter() - t0
                self.log_interval(loss_sum, steps, lr, seconds)
                train_seconds += seconds
                loss_sum, steps, seconds = torch.zeros((), device=self.device), 0, 0.0
                t0 = time.perf_counter()
            saved = False
            if self.step % cfg.eval_interval == 0 or done:
                self.check_finite(first_bad)
                seconds += time.perf_counter() - t0  # evaluation is not training time
                self.eval_and_save()
                saved = True
                if self.meter is not None:
                    self.meter.reset()
                t0 = time.perf_counter()
            signum = self.signals.signum or (signal.SIGPIPE if self.log.pipe_closed else None)
            if distributed.any_rank(self.dist, signum is not None or self.step == stop_at
                                    or self.log.error is not None):
                self._agree(self.log.error)
                self.check_finite(first_bad)
                stopped_by = signal.Signals(signum).name if signum is not None else "signal on another process"
                if self.step == stop_at and signum is None:
                    stopped_by = "stop_at"
                if not saved:
                    self.save_resume()
                self.log.say(f"stopped at iteration {self.step} ({stopped_by}); "
                             f"continue with --resume (it reads {Path(cfg.out_dir) / 'resume.pt'})")
                break
        self.signals.restore()
        train_seconds += seconds + (time.perf_counter() - t0)
        self.log.say(
            f"trained iterations {start_step + 1}-{self.step} in {train_seconds:.1f} s "
            f"({time.perf_counter() - t_start:.1f} s with evaluation and checkpoints); "
            f"best val loss {self.best_val_loss}"
        )
        sample = None
        if stopped_by is None and cfg.sample_at_end and self.dist.is_main:
            sample = self.sample()
            self.log.say(f"sample after {self.step} iterations:\n{sample}")
            self.log_new_choices()
        self.dump_debug()
        code = 0
        if stopped_by not in (None, "stop_at"):
            code = 128 + (signum or signal.SIGTERM)
        return TrainResult(self.step, self.best_val_loss, self.val_loss, stopped_by, code, sample)

    def sample(self, max_new_tokens: int = 200) -> str:
        from tsfast.data.tokenizer import decode, encode
        from tsfast.generate import generate

        self.model.eval()
        ids = generate(self.model, encode(SAMPLE_PROMPT), max_new_tokens=max_new_tokens, temperature=0.8,
                       top_k=50, seed=self.cfg.seed, vocab=self.corpus.vocab)
        self.model.train()
        return SAMPLE_PROMPT + decode(ids)

    def dump_debug(self) -> None:
        """Test aid ($TSFAST_DEBUG_DUMP): this rank's parameter checksum, first batches,
        where gradients were all-reduced, and how many checkpoints it wrote."""
        if not self.debug_dir:
            return
        digest = hashlib.sha256()
        for p in self.model.parameters():
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        record = {
            "rank": self.dist.rank, "world_size": self.dist.world_size, "step": self.step,
            "params_sha256": digest.hexdigest(), "first_batches": self.batch_hashes,
            "grad_syncs": self.sync_probe.calls if self.sync_probe else None,
            "accum": self.accum, "saves": self.saves,
        }
        path = Path(self.debug_dir) / f"rank{self.dist.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))

    def close(self, finished: bool = False) -> None:
        self.signals.restore()
        try:
            self.log.close()
        finally:
            if self.meter is not None:
                from tsfast import meter

                meter.disable()
            distributed.shutdown(self.dist, wait_for_peers=finished)
            if self.lock is not None:
                self.lock.release()


def train(cfg: TrainConfig, *, resume: dict | None = None, stop_at: int | None = None) -> TrainResult:
    """Train with `cfg` (continuing from the resume checkpoint dict `resume`). `stop_at`: stop
    after that iteration as a signal would (write resume.pt), e.g. to test resuming."""
    with ops.use(cfg.kernels):  # --kernels, for this run only
        trainer = Trainer(cfg, resume=resume)
        finished = False
        try:
            result = trainer.run(stop_at=stop_at)
            finished = True
            return result
        finally:
            trainer.close(finished=finished)
