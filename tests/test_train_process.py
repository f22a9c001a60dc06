"""train.py as a real process: SIGTERM writes a resume checkpoint; a 2-process gloo DDP run
under torchrun keeps every rank's parameters identical."""

import hashlib
import json
import signal
import subprocess
import sys

import pytest
from train_helpers import TRAIN_PY, child_env, read_metrics, small_args

from tsfast.train import checkpoint as ckpt_io

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_sigterm_writes_a_resume_checkpoint(corpus, tmp_path):
    out = tmp_path / "out"
    args = small_args(corpus, out, max_iters=100_000, eval_interval=100_000)
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *args], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter "):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest + err
    assert "stopped at iteration" in rest and "SIGTERM" in rest and "--resume" in rest
    ckpt = ckpt_io.read_checkpoint(out / "resume.pt", resume=True)
    assert ckpt["step"] >= 1 and ckpt["step"] == read_metrics(out)[-1]["step"]
    assert not (out / "ckpt.pt").exists()  # no evaluation ran: no best model claimed


def test_ddp_two_processes_on_gloo(corpus, tmp_path):
    out, dump, logs = tmp_path / "out", tmp_path / "dump", tmp_path / "logs"
    args = small_args(corpus, out, max_iters=3, eval_interval=3, grad_accum=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--redirects", "3", "--log-dir", str(logs), str(TRAIN_PY), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(TSFAST_DEBUG_DUMP=str(dump)),
                          capture_output=True, text=True, timeout=300)
    rank_out = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + str(rank_out)
    r0, r1 = (json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1))
    # the same weights on both ranks, and in the checkpoint rank 0 saved
    assert r0["world_size"] == 2 and r0["step"] == r1["step"] == 3
    assert r0["params_sha256"] == r1["params_sha256"]
    saved = ckpt_io.load_for_inference(out / "ckpt.pt", device="cpu").model
    assert _sha(saved) == r0["params_sha256"]
    # each rank draws its own batches: grad_accum 4 over 2 ranks = 2 micro-steps each
    assert r0["accum"] == r1["accum"] == 2
    assert len(r0["first_batches"]) == 2 and not set(r0["first_batches"]) & set(r1["first_batches"])
    # gradients are all-reduced on the last micro-step only, every step
    for r in (r0, r1):
        assert r["grad_syncs"] and {micro for _, micro in r["grad_syncs"]} == {1}
        assert {step for step, _ in r["grad_syncs"]} == {0, 1, 2}
    # only rank 0 logs, evaluates and saves
    assert r0["saves"] == 2 and r1["saves"] == 0
    assert "iter      3" in rank_out[0] and "eval at iter 3" in rank_out[0]
    assert rank_out[1].strip() == ""
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def _sha(model) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()
