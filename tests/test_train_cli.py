"""train.py's flags, and every bad input: one clear message, exit code 2, nothing overwritten."""

import os
import signal
import subprocess
import sys
import types

import pytest
import torch
from train_helpers import (
    TRAIN_PY,
    child_env,
    read_metrics,
    small_args,
    small_config,
    snapshot,
)

from tsfast.train.cli import main, parse
from tsfast.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def trained_out(corpus, tmp_path):
    """An output dir holding ckpt.pt, resume.pt and metrics.jsonl from a 2-step run."""
    out = tmp_path / "out"
    train(small_config(corpus, out, max_iters=2, eval_interval=2))
    return out


def test_no_config_picks_tiny_without_cuda_and_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg, resume, notes = parse([])
    assert cfg.name == "tiny" and resume is None and cfg.data == "auto" and cfg.vocab == "compact"
    assert any("tiny" in n and "no CUDA GPU" in n for n in notes)


def test_every_field_is_a_flag_and_set_works():
    cfg, _, _ = parse(["--config", "baby_cpu", "--lr", "2e-4", "--set", "n_layer=3", "--set", "pos=learned",
                       "--no-compile", "--wandb", "--meter", "false", "--device", "cpu", "--kernels", "torch"])
    assert (cfg.name, cfg.lr, cfg.n_layer, cfg.pos) == ("baby_cpu", 2e-4, 3, "learned")
    assert cfg.compile is False and cfg.wandb is True and cfg.meter is False
    assert (cfg.device, cfg.kernels) == ("cpu", "torch")
    gpu, _, notes = parse(["--config", "baby_gpu"])
    assert gpu.compile is True and any("torch.compile: on" in n for n in notes)
    assert parse(["--config", "baby_gpu", "--no-compile"])[0].compile is False


BAD_INPUTS = [
    (["--config", "huge"], ["unknown preset 'huge'", "tiny, baby_cpu, baby_gpu, gpt2"]),
    (["--set", "n_layers=4"], ["unknown config key 'n_layers'", "n_layer"]),
    (["--set", "lr"], ["key=value"]),
    (["--n_layers", "4"], ["unknown option '--n_layers'", "n_layer"]),
    (["--lr", "fast"], ["bad value for lr", "'fast'"]),
    (["--batch_size", "-1"], ["batch_size"]),
    (["--kernels", "cuda"], ["bad value for kernels", "auto, triton, torch"]),
    (["--device", "tpu"], ["bad value for device", "auto, cuda, mps, cpu"]),
]


@pytest.mark.parametrize("argv, words", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_flags(argv, words, trained_out, capsys):
    before = snapshot(trained_out)
    assert main(argv + ["--out_dir", str(trained_out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err
    assert snapshot(trained_out) == before


def _bad_run(argv, trained_out, capsys) -> str:
    before = snapshot(trained_out)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert snapshot(trained_out) == before
    assert "iter " not in captured.out
    return captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device(corpus, trained_out, capsys):
    err = _bad_run(small_args(corpus, trained_out, device="cuda"), trained_out, capsys)
    assert "no CUDA GPU is visible" in err and "--device cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_kernels_triton_where_triton_cannot_run(corpus, trained_out, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    err = _bad_run(small_args(corpus, trained_out, kernels="triton"), trained_out, capsys)
    assert "--kernels triton" in err and "CUDA GPU" in err and "--kernels auto or torch" in err


def test_resume_without_a_checkpoint(corpus, tmp_path, capsys):
    assert main(small_args(corpus, tmp_path / "empty") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "no resume checkpoint at" in err and "resume.pt" in err
    assert not (tmp_path / "empty").exists()


def test_resume_from_a_corrupt_checkpoint(corpus, trained_out, capsys):
    resume = trained_out / "resume.pt"
    resume.write_bytes(resume.read_bytes()[: resume.stat().st_size // 2])
    err = _bad_run(small_args(corpus, trained_out) + ["--resume"], trained_out, capsys)
    assert "not a readable checkpoint" in err and str(resume) in err


def test_resume_from_ckpt_pt_says_to_use_resume_pt(corpus, trained_out, capsys):
    err = _bad_run(small_args(corpus, trained_out) + ["--resume", str(trained_out / "ckpt.pt")], trained_out, capsys)
    assert "lacks optimizer" in err and "resume.pt" in err


def test_resume_a_checkpoint_of_another_architecture(corpus, trained_out, capsys):
    err = _bad_run(small_args(corpus, trained_out, n_embd=64) + ["--resume"], trained_out, capsys)
    assert "another architecture" in err and "n_embd=32 in the checkpoint, 64 asked" in err


def test_missing_data_dir(tmp_path, trained_out, capsys):
    err = _bad_run(small_args(tmp_path / "nowhere", trained_out), trained_out, capsys)
    assert "nowhere" in err and "prepare" in err


def test_resume_continues_with_the_checkpoint_config(corpus, trained_out, capsys):
    """--resume without --config takes the saved config; new flags (max_iters) apply."""
    assert main(["--resume", "--out_dir", str(trained_out), "--max_iters", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "iter      3" in out and "iter      1 " not in out


def test_bad_input_through_the_script(tmp_path):
    """The real process: exit status 2 and one line on stderr."""
    proc = subprocess.run([sys.executable, str(TRAIN_PY), "--config", "nope", "--out_dir", str(tmp_path)],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train.py: error: unknown preset 'nope': choose one of tiny, baby_cpu, baby_gpu, gpt2"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- reliability


def _one_line_error(capsys, code: int, argv: list[str], prefix: str = "train.py: error: ") -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resume_from_a_damaged_checkpoint(corpus, trained_out, capsys):
    from test_train_checkpoint import damage_tensor_bytes

    resume = trained_out / "resume.pt"
    damage_tensor_bytes(resume, torch.load(resume, weights_only=True)["model"]["wte.weight"])
    before = snapshot(trained_out)
    err = _one_line_error(capsys, 2, small_args(corpus, trained_out) + ["--resume"])
    assert f"{resume} is damaged: its contents do not match the checksum" in err and "Lower --lr" not in err
    assert snapshot(trained_out) == before


def test_resume_with_an_optimizer_state_of_other_shapes(corpus, trained_out, capsys):
    from train_helpers import save_edited

    resume = trained_out / "resume.pt"
    ckpt = torch.load(resume, weights_only=True)
    state = {i: {k: (v[..., :1] if v.dim() else v) for k, v in s.items()} for i, s in ckpt["optimizer"]["state"].items()}
    save_edited(resume, ckpt, optimizer={**ckpt["optimizer"], "state": state})
    err = _one_line_error(capsys, 2, small_args(corpus, trained_out) + ["--resume"])
    assert "optimizer state exp_avg has shape" in err and "for a parameter of shape" in err


@pytest.mark.parametrize("argv, words", [
    (["--seed", "1e30"], "bad value for seed: 1000000000000000019884624838656; it must be a whole number from"),
    (["--lr", "inf"], "bad value for lr: inf; it must be a finite number"),
    (["--weight_decay", "inf"], "bad value for weight_decay: inf; it must be a finite number"),
    (["--max_iters", "inf"], "bad value for max_iters: 'inf' is not a int"),
    (["--max_iters", "2", "--set", "max_iters=3"], "max_iters is given twice: --set max_iters=3 and --max_iters 2"),
    (["--batch_size", "1e12"], "this run needs at least 991.36 PiB of memory"),
    (["--n_embd", "1048576"], "this run needs at least 384.90 TiB of memory"),
])
def test_bad_numbers_are_refused_before_any_work(corpus, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    args = ["--config", "tiny", "--data", str(corpus), "--device", "cpu", "--out_dir", str(out)]
    err = _one_line_error(capsys, 2, args + argv)
    assert words in err
    assert not out.exists()


def test_out_dir_that_is_a_file_or_under_one(corpus, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("keep me")
    err = _one_line_error(capsys, 2, small_args(corpus, file))
    assert err == f"train.py: error: --out_dir {file} is a file, not a directory; pick another --out_dir\n"
    err = _one_line_error(capsys, 2, small_args(corpus, file / "out"))
    assert f"--out_dir {file / 'out'} lies under {file}, which is a file" in err
    assert file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_out_dir_that_cannot_be_written(corpus, tmp_path, capsys, monkeypatch):
    from tsfast.train import outdir

    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:  # a real read-only directory (root writes into one regardless)
        out.chmod(0o500)
    else:
        monkeypatch.setattr(outdir.os, "access", lambda path, mode: False)
    try:
        err = _one_line_error(capsys, 2, small_args(corpus, out))
    finally:
        out.chmod(0o700)
    assert err == (f"train.py: error: cannot write in --out_dir {out} (permission denied); pick another "
                   "--out_dir or make it writable\n")
    assert list(out.iterdir()) == []


def test_a_second_run_into_the_same_out_dir_fails_at_once(corpus, tmp_path, capsys):
    """The lock names its holder; a holder killed with SIGKILL leaves no lock behind."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tsfast.train.outdir import open_out_dir; "
         f"open_out_dir({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _one_line_error(capsys, 2, small_args(corpus, out))
        assert err == (f"train.py: error: --out_dir {out} is in use by another training run (pid {holder.pid}, "
                       f"see {out / '.lock'}); wait for it to end, stop it, or pick another --out_dir\n")
    finally:
        holder.kill()
        holder.wait()
    assert main(small_args(corpus, out, max_iters=1, eval_interval=1)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.jsonl", "resume.pt"]


def test_temporaries_of_killed_runs_are_removed_at_start(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".resume.pt.tmp-{dead.pid}").write_bytes(b"x" * 1000)  # left by a kill -9
    (out / ".ckpt.pt.tmp-1").write_bytes(b"x")  # pid 1 is alive: never touched
    train(small_config(corpus, out, max_iters=1, eval_interval=1))
    assert sorted(p.name for p in out.iterdir()) == [".ckpt.pt.tmp-1", "ckpt.pt", "metrics.jsonl", "resume.pt"]


def _fail_on_save(monkeypatch, number: int, error: BaseException) -> None:
    """The `number`-th checkpoint write raises `error` (after the earlier ones succeeded)."""
    from tsfast.train import checkpoint as ckpt_io

    real, calls = ckpt_io.save_atomic, []

    def save(obj, path):
        calls.append(path)
        if len(calls) == number:
            raise error
        real(obj, path)

    monkeypatch.setattr(ckpt_io, "save_atomic", save)


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (PermissionError(13, "Permission denied"), "Permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 6528 vs 6416"), "unexpected pos"),
])
def test_a_write_failing_mid_run_stops_with_exit_3(corpus, tmp_path, capsys, monkeypatch, error, reason):
    out = tmp_path / "out"
    _fail_on_save(monkeypatch, 3, error)  # ckpt.pt and resume.pt at step 1, then ckpt.pt at step 2
    err = _one_line_error(capsys, 3, small_args(corpus, out, max_iters=4, eval_interval=1))
    assert f"could not write {out / 'ckpt.pt'} (" in err and reason in err
    assert "the previous ckpt.pt is unchanged" in err and "--resume" in err
    from tsfast.train import checkpoint as ckpt_io

    assert ckpt_io.read_checkpoint(out / "ckpt.pt")["step"] == 1
    assert ckpt_io.read_checkpoint(out / "resume.pt", resume=True)["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.jsonl", "resume.pt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_dir_made_read_only_mid_run(corpus, tmp_path, capsys, monkeypatch):
    from tsfast.train import checkpoint as ckpt_io

    out, real = tmp_path / "out", ckpt_io.save_atomic

    def save_then_lock_the_directory(obj, path):
        real(obj, path)
        if path.name == "resume.pt":
            out.chmod(0o500)

    monkeypatch.setattr(ckpt_io, "save_atomic", save_then_lock_the_directory)
    try:
        err = _one_line_error(capsys, 3, small_args(corpus, out, max_iters=4, eval_interval=1))
    finally:
        out.chmod(0o700)
    assert "Permission denied" in err and ckpt_io.read_checkpoint(out / "resume.pt", resume=True)["step"] == 1


def test_free_disk_is_checked_before_each_save(corpus, tmp_path, capsys, monkeypatch):
    from tsfast.train import outdir

    out, calls = tmp_path / "out", []
    real = outdir.shutil.disk_usage

    def disk_usage(path):
        calls.append(path)
        return real(path) if len(calls) <= 2 else types.SimpleNamespace(free=4096)

    monkeypatch.setattr(outdir.shutil, "disk_usage", disk_usage)
    err = _one_line_error(capsys, 3, small_args(corpus, out, max_iters=4, eval_interval=1))
    assert f"not enough free disk to write {out / 'ckpt.pt'}: it needs" in err and "4.00 KiB is free" in err
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.jsonl", "resume.pt"]


def test_metrics_write_failing_mid_run_stops_with_exit_3(corpus, tmp_path, capsys, monkeypatch):
    from tsfast.train.logs import RunLog

    real_open = RunLog.open

    class FullDisk:
        def __init__(self, file):
            self.file, self.lines = file, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 3:
                raise OSError(28, "No space left on device")
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    def open_full(self, *, append):
        real_open(self, append=append)
        self.file = FullDisk(self.file)

    monkeypatch.setattr(RunLog, "open", open_full)
    out = tmp_path / "out"
    err = _one_line_error(capsys, 3, small_args(corpus, out, max_iters=6, eval_interval=2))
    assert err.startswith(f"train.py: error: could not write {out / 'metrics.jsonl'} (No space left on device)")
    assert read_metrics(out)[-1]["step"] == 2


def test_a_second_signal_exits_at_once_with_its_own_code(corpus, tmp_path, capsys, monkeypatch):
    from tsfast.model import GPT

    real, calls = GPT.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # step 1 and its evaluation (2 forwards) are done: resume.pt holds step 1
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward)
    out = tmp_path / "out"
    assert main(small_args(corpus, out, max_iters=10, eval_interval=1, eval_iters=1)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err == "train.py: stopped by SIGTERM without saving (the last good checkpoints stay)\n"
    from tsfast.train import checkpoint as ckpt_io

    assert ckpt_io.read_checkpoint(out / "resume.pt", resume=True)["step"] == 1
    assert not (out / ".lock").exists() and not list(out.glob(".*.tmp-*"))


class _Head:
    """stdout piped into `head -n lines`: it reads `lines` lines, then the pipe is closed."""

    def __init__(self, lines: int):
        self.left, self.text = lines, []

    def write(self, text):
        if self.left <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.text.append(text)
        self.left -= text.count("\n")
        return len(text)

    def flush(self):
        if self.left < 0:
            raise BrokenPipeError(32, "Broken pipe")


def test_stdout_closed_by_its_reader_stops_like_sigpipe(corpus, tmp_path, capsys, monkeypatch):
    """train.py | head -3: the run stops at the step boundary, writes resume.pt and exits 141
    without a word (it used to die in the logger with a traceback and no checkpoint)."""
    head = _Head(3)
    monkeypatch.setattr(sys, "stdout", head)
    out = tmp_path / "out"
    code = main(small_args(corpus, out, max_iters=50, eval_interval=100))
    assert code == 128 + signal.SIGPIPE and capsys.readouterr().err == ""
    assert len("".join(head.text).splitlines()) == 3
    from tsfast.train import checkpoint as ckpt_io

    assert ckpt_io.read_checkpoint(out / "resume.pt", resume=True)["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "resume.pt"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_start_up_exits_128_plus_n(corpus, tmp_path, capsys, monkeypatch, signum):
    from tsfast.train import data as data_mod

    real = data_mod.open_corpus

    def open_corpus(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "open_corpus", open_corpus)
    out, handler = tmp_path / "out", signal.getsignal(signum)
    assert main(small_args(corpus, out)) == 128 + signum
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == f"train.py: stopped by {name} without saving (the last good checkpoints stay)\n"
    assert not out.exists() and signal.getsignal(signum) == handler  # the handlers are restored


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(corpus, tmp_path, capsys, monkeypatch):
    import errno

    from tsfast.train import outdir

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outdir.fcntl, "flock", no_locks)
    out = tmp_path / "out"
    assert main(small_args(corpus, out, max_iters=1, eval_interval=1)) == 0
    assert f"warning: {out} cannot be locked (No locks available): make sure no other run writes into it" \
        in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.jsonl", "resume.pt"]


def test_triton_preflight_names_a_head_dim_the_kernel_declines(monkeypatch):
    from tsfast import ops
    from tsfast.train import runtime

    monkeypatch.setattr(runtime.ops, "triton_cannot_run", lambda device: None)
    with pytest.raises(ops.BackendUnavailable, match=r"rope_attention for this model: head dim 48 is not one of"):
        runtime.preflight_kernels("triton", torch.device("cpu"), 48)
    runtime.preflight_kernels("triton", torch.device("cpu"), 32)
    runtime.preflight_kernels("auto", torch.device("cpu"), 48)  # auto sends such calls to torch
