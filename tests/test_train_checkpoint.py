"""Atomic checkpoint writes and `load_for_inference`'s errors."""

import os
import signal
import time

import pytest
import torch
from train_helpers import corpus, one_thread, save_edited, small_config  # noqa: F401

from tsfast.train import checkpoint as ckpt_io
from tsfast.train.loop import train

PAYLOAD = 4_000_000  # floats: 16 MB, so a save takes a while


def _payload(gen: int) -> torch.Tensor:
    return torch.arange(PAYLOAD, dtype=torch.float32) + gen


def _writer(path, mode: str):
    """Fork a child (torch is already loaded) that writes generation 0, then, with `mode`
    "replace" or "fsync", is killed inside its next save (before the rename, or before the
    data is synced); with "loop", rewrites newer generations until killed, telling each
    finished one through a pipe. Returns (pid, readable end of the pipe)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_fd)
            ckpt_io.save_atomic({"gen": 0, "data": _payload(0)}, path)
            if mode == "replace":
                ckpt_io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
            if mode == "fsync":
                ckpt_io.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
            gen = 0
            while True:
                os.write(write_fd, f"{gen}\n".encode())
                gen += 1
                ckpt_io.save_atomic({"gen": gen, "data": _payload(gen)}, path)
        finally:
            os._exit(1)  # never return into pytest
    os.close(write_fd)
    return pid, os.fdopen(read_fd)


@pytest.mark.parametrize("mode", ["replace", "fsync"])
def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, mode):
    path = tmp_path / "ckpt.pt"
    pid, pipe = _writer(path, mode)
    assert pipe.readline().strip() == "0"
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["gen"] == 0 and torch.equal(ckpt["data"], _payload(0))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.pt"]
    assert all(name.startswith(".ckpt.pt.tmp-") for name in leftovers)


def test_kill_at_a_random_moment_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    pid, pipe = _writer(path, "loop")
    while int(pipe.readline()) < 2:
        pass
    time.sleep(0.2 * torch.rand(()).item())  # most of a save is spent writing: likely mid-write
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["gen"] >= 2 and torch.equal(ckpt["data"], _payload(ckpt["gen"]))


@pytest.fixture(scope="module")
def ckpt_path(corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("out")
    train(small_config(corpus, out, max_iters=2, eval_interval=2))
    return out / "ckpt.pt"


def test_load_for_inference(ckpt_path):
    loaded = ckpt_io.load_for_inference(ckpt_path, device="cpu")
    assert isinstance(loaded, ckpt_io.LoadedModel)
    assert loaded.name == "tiny" and loaded.step == 2 and loaded.config["n_embd"] == 32
    assert loaded.num_params == sum(p.numel() for p in loaded.model.parameters())
    assert not loaded.model.training and loaded.model.wte.weight.dtype == torch.float32
    assert loaded.vocab.size == loaded.model.config.vocab_size
    ids = torch.randint(0, loaded.vocab.size, (1, 5))
    with torch.no_grad():
        logits, _ = loaded.model(ids)
    assert logits.shape == (1, 1, loaded.vocab.size)


def test_load_for_inference_errors(ckpt_path, tmp_path):
    with pytest.raises(ckpt_io.CheckpointError, match="no checkpoint at"):
        ckpt_io.load_for_inference(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt_path.read_bytes()[:1000])
    with pytest.raises(ckpt_io.CheckpointError, match="not a readable checkpoint"):
        ckpt_io.load_for_inference(broken)
    ckpt = torch.load(ckpt_path, weights_only=True)
    other = tmp_path / "other.pt"
    save_edited(other, ckpt, model_config={**ckpt["model_config"], "n_layer": 3})
    with pytest.raises(ckpt_io.CheckpointError, match="does not fit the model"):
        ckpt_io.load_for_inference(other)
    save_edited(other, {k: v for k, v in ckpt.items() if k != "model"})
    with pytest.raises(ckpt_io.CheckpointError, match="lacks model"):
        ckpt_io.load_for_inference(other)
    save_edited(other, ckpt, format_version=99)
    with pytest.raises(ckpt_io.CheckpointError, match="update tsfast"):
        ckpt_io.load_for_inference(other)
    assert issubclass(ckpt_io.CheckpointError, ValueError)
