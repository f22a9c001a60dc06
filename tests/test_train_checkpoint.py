"""Atomic checkpoint writes and `load_for_inference`'s errors."""

import os
import signal
import time
import types

import pytest
import torch
from train_helpers import save_edited, small_config

from tsfast.train import checkpoint as ckpt_io
from tsfast.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

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
def ckpt_path(corpus, tmp_path_factory):
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


# ----------------------------------------------------------------------------- integrity


def damage_tensor_bytes(path, tensor: torch.Tensor, count: int = 400) -> None:
    """XOR 0xFF `count` bytes inside `tensor`'s data in the file (found by its bytes): the
    zip structure and pickle stay valid, so torch.load reads the damaged values silently."""
    raw = bytearray(path.read_bytes())
    data = tensor.contiguous().numpy().tobytes()
    start = raw.find(data)
    assert start >= 0 and len(data) >= count
    offset = start + (len(data) - count) // 2
    raw[offset : offset + count] = bytes(b ^ 0xFF for b in raw[offset : offset + count])
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_refused(ckpt_path, tmp_path):
    damaged = tmp_path / "ckpt.pt"
    damaged.write_bytes(ckpt_path.read_bytes())
    ckpt = torch.load(ckpt_path, weights_only=True)
    damage_tensor_bytes(damaged, ckpt["model"]["wte.weight"])
    assert torch.load(damaged, weights_only=True)["step"] == ckpt["step"]  # torch alone notices nothing
    with pytest.raises(ckpt_io.CheckpointError) as err:
        ckpt_io.load_for_inference(damaged, device="cpu")
    message = str(err.value)
    assert message == (f"{damaged} is damaged: its contents do not match the checksum stored in it (changed "
                       "after it was written: a disk or copy error, or an edit); use the other checkpoint "
                       "(ckpt.pt / resume.pt) or train again")


def test_every_save_carries_a_checksum_of_its_contents(ckpt_path):
    for name in ("ckpt.pt", "resume.pt"):
        ckpt = torch.load(ckpt_path.parent / name, weights_only=True)
        assert ckpt["format_version"] == 2
        assert ckpt[ckpt_io.CHECKSUM_KEY] == ckpt_io.payload_sha256(ckpt)
        assert len(ckpt[ckpt_io.CHECKSUM_KEY]) == 64


def test_a_checkpoint_from_before_checksums_loads_with_one_note(ckpt_path, tmp_path):
    old = tmp_path / "old.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt[ckpt_io.CHECKSUM_KEY]
    torch.save({**ckpt, "format_version": 1}, old)
    notes = []
    loaded = ckpt_io.load_for_inference(old, device="cpu", note=notes.append)
    assert loaded.step == ckpt["step"]
    assert notes == [f"{old} was written before tsfast checkpoints carried a checksum: it loads, unverified"]
    torch.save({**ckpt, "format_version": 2}, old)  # a new file without its checksum: edited
    with pytest.raises(ckpt_io.CheckpointError, match="has format version 2 but lacks its checksum"):
        ckpt_io.read_checkpoint(old)


def _nan_weight(ckpt):
    model = dict(ckpt["model"])
    weight = model["wte.weight"].clone()
    weight[torch.randint(0, weight.shape[0], ())] = float("nan")
    return {"model": model | {"wte.weight": weight}}


# (name, edit of the checkpoint dict, words the message must hold); each is resealed, so
# only the field checks can catch it
EDITS = [
    ("val_loss as text", lambda c: {"val_loss": "1.5"}, "val_loss is '1.5', expected None or a finite number >= 0"),
    ("format_version as text", lambda c: {"format_version": "2"}, "format_version is '2', expected a whole number >= 1"),
    ("NaN weights", _nan_weight, "model weight wte.weight holds NaN or inf values"),
    ("vocab None", lambda c: {"vocab": None}, "vocab is None, expected the compact vocabulary map"),
    ("step as text", lambda c: {"step": "abc"}, "step is 'abc', expected a whole number >= 0"),
    ("empty rng", lambda c: {"rng": []}, "rng is [], expected a non-empty list of random generator states"),
    ("negative loss", lambda c: {"best_val_loss": -1.0}, "best_val_loss is -1.0"),
    ("lr as text", lambda c: {"train_config": {**c["train_config"], "lr": "fast"}}, "train_config['lr'] is 'fast', expected a float"),
    ("unknown config key", lambda c: {"model_config": {**c["model_config"], "depth": 3}}, "model_config key 'depth'"),
    ("optimizer not a dict", lambda c: {"optimizer": [1, 2]}, "optimizer is [1, 2], expected an AdamW state dict"),
    ("scaler with text", lambda c: {"scaler": {"scale": "big"}}, "scaler is {'scale': 'big'}"),
    ("kind", lambda c: {"kind": "latest"}, "kind is 'latest', expected 'best' or 'resume'"),
]


@pytest.mark.parametrize("name, edit, words", EDITS, ids=[e[0] for e in EDITS])
def test_every_field_is_type_and_range_checked(ckpt_path, tmp_path, name, edit, words):
    ckpt = torch.load(ckpt_path.parent / "resume.pt", weights_only=True)
    path = save_edited(tmp_path / "resume.pt", ckpt, **edit(ckpt))
    with pytest.raises(ckpt_io.CheckpointError) as err:
        ckpt_io.read_checkpoint(path, resume=True)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message
    assert message.endswith("use the other checkpoint (ckpt.pt / resume.pt) or train again")


def test_save_checkpoint_checks_the_free_disk_first(tmp_path, monkeypatch):
    from tsfast.train import outdir

    path = tmp_path / "resume.pt"
    ckpt_io.save_checkpoint({"gen": 0, "data": _payload(0)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    with pytest.raises(outdir.OutputError) as err:
        ckpt_io.save_checkpoint({"gen": 1, "data": _payload(1)}, path)
    assert str(err.value) == (f"not enough free disk to write {path}: it needs 16.26 MiB, 1000 B is free; "
                              "free some space, then continue with --resume")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]


def test_a_failing_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    from tsfast.train import outdir

    path = tmp_path / "ckpt.pt"
    ckpt_io.save_checkpoint({"gen": 0}, path)
    before = path.read_bytes()

    def full_disk(obj, f):  # what torch's zip writer raises when the disk fills up mid-write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 4480 vs 4374\nmore")

    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)
    with pytest.raises(outdir.OutputError) as err:
        ckpt_io.save_checkpoint({"gen": 1}, path)
    assert str(err.value) == (
        f"could not write {path} ([enforce fail at inline_container.cc:671] . unexpected pos 4480 vs 4374); "
        "the previous ckpt.pt is unchanged. Free some disk space or fix the directory's permissions, "
        "then continue with --resume"
    )
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
