"""Measured kernel selection in a training run (tsfast/train/kernel_choice.py), on CPU with
an injected timer and measuring switched on for CPU tensors (it is on for CUDA only): the
choices are made before the first step, printed as a table and written to metrics.jsonl,
leave the run's random numbers alone, and under DDP (2 gloo processes) rank 0 measures and
every rank runs its choices."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_helpers import child_env, read_metrics, small_config

from tsfast.ops import _backend, selection
from tsfast.train.loop import train


def _run_with_selection(monkeypatch, corpus, out, ms, **changes):
    calls = []

    def timer(fn):
        fn()
        calls.append(fn)
        return ms[len(calls) % 2]  # candidates come in pairs here: torch, torch_full

    monkeypatch.setattr(selection, "_current", selection.Selector(timer=timer, cache_dir=None))
    monkeypatch.setattr(_backend, "measures", lambda device: True)
    result = train(small_config(corpus, out, kernels="auto", max_iters=2, eval_interval=2, seed=3, dropout=0.1,
                                **changes))
    return result, calls


def _params(out):
    return torch.load(out / "resume.pt", map_location="cpu", weights_only=False)["model"]


def test_choices_are_made_before_the_first_step_logged_and_change_no_random_number(
        corpus, tmp_path, monkeypatch, capsys):
    # The default candidate (the chunked torch loss) measured fastest: the run takes the same
    # paths as a run with nothing measured, so the weights must match it bit for bit.
    result, calls = _run_with_selection(monkeypatch, corpus, tmp_path / "sel", {1: 1.0, 0: 2.0})
    text = capsys.readouterr().out
    assert result.exit_code == 0 and len(calls) == 4  # train and eval mode, two candidates each
    assert text.index("kernel selection") < text.index("iter      1")
    assert "linear_cross_entropy" in text and "fwd+bwd, measured" in text and "fwd, measured" in text
    (rec,) = read_metrics(tmp_path / "sel", "kernels")
    assert rec["step"] == 0 and [c["chosen"] for c in rec["choices"]] == ["torch", "torch"]
    assert [c["mode"] for c in rec["choices"]] == ["fwd+bwd", "fwd"]

    monkeypatch.setattr(_backend, "measures", lambda device: False)
    plain = train(small_config(corpus, tmp_path / "plain", kernels="auto", max_iters=2, eval_interval=2, seed=3, dropout=0.1))
    assert plain.exit_code == 0 and not read_metrics(tmp_path / "plain", "kernels")
    for (name, a), b in zip(_params(tmp_path / "sel").items(), _params(tmp_path / "plain").values(), strict=True):
        assert torch.equal(a, b), name


def test_the_measured_choice_runs_in_training(corpus, tmp_path, monkeypatch):
    from tsfast.ops import losses

    ran = []  # the full-logits candidate is the only caller of the torch cross-entropy here
    real = losses._cross_entropy_torch
    monkeypatch.setattr(losses, "_cross_entropy_torch", lambda *a: ran.append(torch.is_grad_enabled()) or real(*a))
    result, calls = _run_with_selection(monkeypatch, corpus, tmp_path, {1: 2.0, 0: 1.0})
    (rec,) = read_metrics(tmp_path, "kernels")
    assert [c["chosen"] for c in rec["choices"]] == ["torch_full", "torch_full"]
    assert result.exit_code == 0 and ran.count(True) >= 2  # the measured impl ran in the steps


_DDP_CHILD = r"""
import json, os, sys
import torch
from tsfast.config import GPTConfig
from tsfast.model import GPT
from tsfast.ops import _backend, selection
from tsfast.train import distributed, kernel_choice

out = sys.argv[1]
d = distributed.from_env()
distributed.init(d, torch.device("cpu"))
_backend.measures = lambda device: True
timed = []

def timer(fn):
    fn()
    timed.append(1)
    # rank 0 finds the full-logits loss faster; rank 1, were it to measure, the chunked one
    return (2.0 if len(timed) % 2 else 1.0) if d.is_main else (1.0 if len(timed) % 2 else 2.0)

selection.set_current(selection.Selector(timer=timer, cache_dir=None))
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=97))
records = kernel_choice.select(model, 2, 16, torch.device("cpu"), torch.float32, d)
idx = torch.randint(0, 97, (2, 16))
model(idx, idx)  # a training step's forward: a lookup, on every rank
mine = selection.current().records()
with open(os.path.join(out, f"rank{d.rank}.json"), "w") as f:
    json.dump({"timed": len(timed), "broadcast": [r["chosen"] for r in records],
               "chosen": [r["chosen"] for r in mine], "sources": [r["source"] for r in mine]}, f)
distributed.shutdown(d, wait_for_peers=True)
"""


def test_ddp_rank0_measures_and_every_rank_runs_its_choices(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_DDP_CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["timed"] == 4 and r1["timed"] == 0
    assert r0["chosen"] == r1["chosen"] == r0["broadcast"] == r1["broadcast"] == ["torch_full", "torch_full"]
    assert set(r1["sources"]) == {"rank 0"} and set(r0["sources"]) == {"measured"}


@pytest.mark.parametrize("backend, device, measured", [
    ("torch", "cuda", False), ("triton", "cuda", False), ("auto", "cpu", False), ("auto", "mps", False),
    ("auto", "cuda", True),
])
def test_only_auto_on_cuda_measures(backend, device, measured, monkeypatch):
    monkeypatch.setattr(_backend, "_selected", backend)
    monkeypatch.setattr(_backend, "triton_missing", lambda: None)
    assert _backend.measures(torch.device(device)) == measured
    monkeypatch.setattr(_backend, "triton_missing", lambda: "Triton does not import")
    assert not _backend.measures(torch.device(device))  # do_bench comes with Triton


@pytest.mark.parametrize("doc_mask", [False, True])
def test_warm_up_masks_documents_when_the_run_does(doc_mask, corpus, tmp_path, monkeypatch):
    """Under --doc_mask true the warm-up's attention calls carry bench_doc_ids, so the masked
    calls the steps make are measured before the first step, as the unmasked ones are."""
    from tsfast import ops
    from tsfast.ops.attention import bench_doc_ids
    from tsfast.train import kernel_choice

    seen, warm_ups = [], []
    real_attention, real_warm_up = ops.rope_attention, kernel_choice.warm_up
    monkeypatch.setattr(ops, "rope_attention", lambda *a, **kw: seen.append(kw["doc_ids"]) or real_attention(*a, **kw))
    monkeypatch.setattr(kernel_choice, "warm_up", lambda *a: warm_ups.append(len(seen)) or real_warm_up(*a))
    result, _ = _run_with_selection(monkeypatch, corpus, tmp_path, {1: 1.0, 0: 2.0}, doc_mask=doc_mask)
    assert result.exit_code == 0 and warm_ups == [0]
    cfg = small_config(corpus, tmp_path)
    warm = seen[:2 * cfg.n_layer]  # the warm-up: a training and an evaluation forward
    if doc_mask:
        want = bench_doc_ids(cfg.batch_size, cfg.block_size)
        assert all(torch.equal(d, want) for d in warm)
        assert all(d is not None for d in seen[2 * cfg.n_layer:])  # the steps are masked too
    else:
        assert all(d is None for d in seen)
