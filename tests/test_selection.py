"""Measured selection (tsfast/ops/selection.py) on CPU, with an injected timer: the faster
candidate wins, the in-memory and on-disk cache (hit, miss, shape buckets, stale and corrupt
files, an unwritable directory), a choice fixed for the run, candidates that do not fit or
fail, forced backends, the table; and the ops choosing inside torch.compile."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tsfast import ops
from tsfast.ops import _backend, attention, losses, selection
from tsfast.ops.selection import Candidate, Family, Selector
from tsfast.testing import interpreter_ready

CPU = torch.device("cpu")


RAN: list[str] = []  # the toy candidates append their name when they run


def _impl(name, factor):
    def impl(x, w):
        RAN.append(name)
        return (x * factor) @ w

    return impl


def _bench_inputs(call, device):
    N, C, dtype, grad = call
    x = torch.randn(N, C, dtype=getattr(torch, dtype), device=device, requires_grad=grad)
    w = torch.randn(C, 3, dtype=getattr(torch, dtype), device=device, requires_grad=grad)
    return (x, w), ([x, w] if grad else [])


def _family(fits=None):
    return Family("toy", (Candidate("triton", "triton", _impl("triton", 2.0)),
                          Candidate("torch", "torch", _impl("torch", 3.0)),
                          Candidate("torch_alt", "torch", _impl("torch_alt", 4.0), fits=fits)),
                  fields=("N", "C", "dtype", "grad"), bucketed=("N",), bench_inputs=_bench_inputs)


ALL = ("triton", "torch", "torch_alt")


class FakeTimer:
    """Runs the timed callable once and returns the figure set for the candidate that ran."""

    def __init__(self, ms: dict[str, float]):
        self.ms = ms
        self.calls: list[str] = []

    def __call__(self, fn) -> float:
        RAN.clear()
        fn()
        self.calls.append(RAN[-1])
        return self.ms[RAN[-1]]


def _selector(cache_dir, ms, fits=None, **kw):
    timer = FakeTimer(ms)
    return Selector(timer=timer, cache_dir=cache_dir, **kw), timer, _family(fits)


def test_the_fastest_candidate_wins_and_each_is_timed_once(tmp_path):
    sel, timer, fam = _selector(tmp_path, {"triton": 2.0, "torch": 1.0, "torch_alt": 3.0})
    assert sel.pick(fam, CPU, (100, 16, "float32", True), ALL, None) == "torch"
    assert sorted(timer.calls) == sorted(ALL)
    (rec,) = sel.records()
    assert rec["ms"] == {"triton": 2.0, "torch": 1.0, "torch_alt": 3.0}
    assert rec["source"] == "measured" and rec["mode"] == "fwd+bwd" and rec["shape"] == "N=100 C=16 dtype=float32"


@pytest.mark.parametrize("grad", [True, False])
def test_the_timed_callable_runs_backward_only_when_gradients_are_wanted(tmp_path, grad):
    def timer(fn):
        fn()
        return 1.0

    fam = _family()
    backward_ran = []
    fam.candidates = (Candidate("triton", "triton", lambda x, w: _Probe.apply(x @ w, backward_ran)),) + fam.candidates[1:]
    fam._by_name["triton"] = fam.candidates[0]
    Selector(timer=timer, cache_dir=None).pick(fam, CPU, (5, 4, "float32", grad), ("triton", "torch"), None)
    assert bool(backward_ran) == grad


class _Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, log):
        ctx.log = log
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.log.append("backward")
        return g, None


def test_ties_go_to_the_earlier_candidate(tmp_path):
    sel, _, fam = _selector(tmp_path, {"triton": 1.0, "torch": 1.0, "torch_alt": 1.0})
    assert sel.pick(fam, CPU, (7, 8, "float32", False), ALL, None) == "triton"


def test_disk_cache_hit_miss_and_buckets(tmp_path):
    ms = {"triton": 5.0, "torch": 1.0, "torch_alt": 3.0}
    first, _, fam = _selector(tmp_path, ms)
    assert first.pick(fam, CPU, (100, 16, "float32", True), ALL, None) == "torch"
    (path,) = tmp_path.glob("kernel-choices-*.json")
    data = json.loads(path.read_text())
    assert data["env"] == selection.environment(CPU) and len(data["choices"]) == 1

    # A new process: the same bucket (N=100 and N=120 both round up to 128) is a hit.
    second, timer, fam = _selector(tmp_path, {"triton": 0.1, "torch": 9.0, "torch_alt": 9.0})
    assert second.pick(fam, CPU, (120, 16, "float32", True), ALL, None) == "torch"
    assert timer.calls == [] and second.records()[0]["source"] == "cache"
    # Another bucket, dtype, gradient mode or autocast dtype is a miss, measured and saved.
    assert second.pick(fam, CPU, (129, 16, "float32", True), ALL, None) == "triton"
    assert second.pick(fam, CPU, (100, 16, "float32", False), ALL, None) == "triton"
    assert second.pick(fam, CPU, (100, 16, "float32", True), ALL, "bfloat16") == "triton"
    assert len(timer.calls) == 9
    assert len(json.loads(path.read_text())["choices"]) == 4


def test_a_choice_is_fixed_for_the_run(tmp_path):
    sel, timer, fam = _selector(tmp_path, {"triton": 1.0, "torch": 2.0, "torch_alt": 3.0})
    call = (64, 16, "float32", True)
    assert sel.pick(fam, CPU, call, ALL, None) == "triton"
    timer.ms = {"triton": 9.0, "torch": 1.0, "torch_alt": 9.0}
    for path in tmp_path.glob("*.json"):
        path.write_text("{}")  # even a changed file does not move a choice already made
    assert [sel.pick(fam, CPU, call, ALL, None) for _ in range(3)] == ["triton"] * 3
    assert len(timer.calls) == 3


def test_a_malformed_entry_in_a_valid_file_is_measured_again(tmp_path):
    sel, timer, fam = _selector(tmp_path, {"triton": 1.0, "torch": 2.0, "torch_alt": 3.0})
    key = fam.key((64, 16, "float32", True), "cpu", None, ALL)
    path = sel._cache_file(CPU)
    path.write_text(json.dumps({"format": selection.FORMAT, "env": selection.environment(CPU),
                                "choices": {key: {"chosen": "torch", "ms": "fast"}}}))
    assert sel.pick(fam, CPU, (64, 16, "float32", True), ALL, None) == "triton"
    assert len(timer.calls) == 3 and selection.format_table(sel.records())


@pytest.mark.parametrize("content, says", [
    ("{not json", "unreadable"),
    ("[1, 2]", "unreadable"),
    (b"\xff\xfe\x00garbage", "unreadable"),
    ("stale", "stale"),
])
def test_stale_or_corrupt_cache_is_ignored_with_one_line(tmp_path, caplog, content, says):
    sel, timer, fam = _selector(tmp_path, {"triton": 1.0, "torch": 2.0, "torch_alt": 3.0})
    path = sel._cache_file(CPU)
    if content == "stale":
        env = {**selection.environment(CPU), "torch": "1.0.0"}
        key = fam.key((64, 16, "float32", True), "cpu", None, ALL)
        content = json.dumps({"format": selection.FORMAT, "env": env, "choices": {key: {"chosen": "torch"}}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        assert sel.pick(fam, CPU, (64, 16, "float32", True), ALL, None) == "triton"
        assert sel.pick(fam, CPU, (300, 16, "float32", True), ALL, None) == "triton"
    assert len(caplog.records) == 1 and says in caplog.records[0].getMessage()
    assert str(path) in caplog.records[0].getMessage()
    assert len(timer.calls) == 6  # both keys measured, the file's entry not trusted
    data = json.loads(path.read_text())  # rewritten, for this environment
    assert data["env"] == selection.environment(CPU) and len(data["choices"]) == 2


def test_unwritable_cache_dir_warns_once_and_keeps_choices_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would be")
    sel, _, fam = _selector(blocker / "sub", {"triton": 2.0, "torch": 1.0, "torch_alt": 3.0})
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        for n in (10, 100, 1000):
            assert sel.pick(fam, CPU, (n, 8, "float32", True), ALL, None) == "torch"
    assert [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()].__len__() == 1
    assert len(sel.records()) == 3


def test_candidate_that_does_not_fit_or_fails_is_left_out(tmp_path, caplog):
    sel, timer, fam = _selector(tmp_path, {"triton": 3.0, "torch": 2.0, "torch_alt": 1.0},
                                fits=lambda call, free: "too big" if call[0] > 50 else None)
    assert sel.pick(fam, CPU, (64, 8, "float32", True), ALL, None) == "torch"
    rec = sel.records()[0]
    assert rec["skipped"] == {"torch_alt": "too big"} and "torch_alt" not in timer.calls

    def broken(x, w):
        raise RuntimeError("no kernel for this")

    fam.candidates = (Candidate("triton", "triton", broken),) + fam.candidates[1:]
    fam._by_name["triton"] = fam.candidates[0]
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        assert sel.pick(fam, CPU, (8, 8, "float32", True), ALL, None) == "torch_alt"
    assert "no kernel for this" in sel.records()[1]["skipped"]["triton"]
    assert any("timing triton for toy failed" in r.getMessage() for r in caplog.records)


def test_every_candidate_failing_runs_the_first(tmp_path):
    sel = Selector(timer=lambda fn: fn(), cache_dir=None)

    def broken(x, w):
        raise RuntimeError("broken")

    fam = Family("toy", (Candidate("a", "triton", broken), Candidate("b", "torch", broken)),
                 fields=("N", "C", "dtype", "grad"), bucketed=("N",), bench_inputs=_bench_inputs)
    assert sel.pick(fam, CPU, (4, 4, "float32", True), ("a", "b"), None) == "a"


def test_without_measuring_a_new_key_takes_the_default_and_installed_choices_hold(caplog):
    rank0 = Selector(timer=lambda fn: 1.0, cache_dir=None)
    fam = _family()
    rank0.pick(fam, CPU, (16, 8, "float32", True), ("torch", "torch_alt"), None)
    other = Selector(timer=lambda fn: pytest.fail("rank 1 must not measure"), cache_dir=None, measure=False)
    other.install(rank0.records())
    assert other.pick(fam, CPU, (16, 8, "float32", True), ("torch", "torch_alt"), None) == "torch"
    assert other.records()[0]["source"] == "rank 0"
    with caplog.at_level(logging.WARNING, logger="tsfast.ops"):
        assert other.pick(fam, CPU, (999, 8, "float32", True), ALL, None) == "triton"
    assert "was not chosen on rank 0" in caplog.records[0].getMessage()


def test_format_table_and_speedup():
    records = [
        {"op": "layernorm_linear", "shape": "N=32768 C=384 F=1536", "mode": "fwd+bwd", "source": "measured",
         "candidates": ["triton", "torch"], "backends": ["triton", "torch"], "chosen": "triton",
         "ms": {"triton": 1.0, "torch": 1.5}, "skipped": {}},
        {"op": "linear_cross_entropy", "shape": "N=32768 C=384 V=50304", "mode": "fwd", "source": "cache",
         "candidates": ["triton", "torch", "torch_full"], "backends": ["triton", "torch", "torch"],
         "chosen": "torch", "ms": {"triton": 4.0, "torch": 2.0}, "skipped": {"torch_full": "too big"}},
    ]
    lines = selection.format_table(records)
    assert lines[0].split()[:3] == ["op", "shape", "chosen"] and "speedup" in lines[0]
    assert "1.50x" in lines[1] and "fwd+bwd, measured" in lines[1]
    assert "1.00x" in lines[2] and "skipped" in lines[2] and "fwd, cache" in lines[2]
    assert selection.speedup(records[0]) == 1.5


# ----------------------------------------------------------------------------- through the ops


@pytest.fixture
def measuring_on_cpu(monkeypatch, tmp_path):
    """auto measures on CPU tensors too (it does on CUDA only): the ops' own candidates,
    timed by a fake timer that makes the full-logits loss the fastest."""
    calls = []

    def timer(fn):
        calls.append(fn)
        fn()
        return 1.0 if len(calls) % 2 == 0 else 2.0  # the second of each pair wins

    sel = Selector(timer=timer, cache_dir=tmp_path)
    monkeypatch.setattr(selection, "_current", sel)
    monkeypatch.setattr(_backend, "measures", lambda device: True)
    monkeypatch.setattr(_backend, "_selected", None)
    monkeypatch.delenv("TSFAST_KERNELS", raising=False)
    return sel, calls


def test_auto_runs_the_measured_candidate(measuring_on_cpu, monkeypatch):
    sel, calls = measuring_on_cpu
    ran = []
    monkeypatch.setattr(losses, "_cross_entropy_torch", lambda *a, real=losses._cross_entropy_torch: ran.append(a[0].shape) or real(*a))
    h, w = torch.randn(9, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True)
    t = torch.randint(0, 37, (9,))
    ops.linear_cross_entropy(h, w, t)
    ran.clear()
    loss = ops.linear_cross_entropy(h, w, t)
    assert ran == [(9, 37)]  # the full logits went to the loss
    (rec,) = sel.records()
    assert rec["op"] == "linear_cross_entropy" and rec["candidates"] == ["torch", "torch_full"]
    assert rec["chosen"] == "torch_full" and len(calls) == 2
    want = torch.nn.functional.cross_entropy(h @ w.t(), t)
    torch.testing.assert_close(loss, want)
    with ops.use("torch"):  # forced: the first torch candidate, nothing measured
        ops.linear_cross_entropy(h, w, t)
    assert len(calls) == 2


def test_choice_is_made_while_tracing_and_compiled_in(measuring_on_cpu):
    """A key first met while torch.compile traces is measured there (real tensors, outside
    the graph) and the choice is a constant of the graph: no graph break."""
    sel, calls = measuring_on_cpu
    h, w = torch.randn(9, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True)
    t = torch.randint(0, 37, (9,))

    def step(h, w, t):
        return ops.linear_cross_entropy(h, w, t, reduction="sum")

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(h, w, t)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert len(calls) == 2 and sel.records()[0]["chosen"] == "torch_full"
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(h, w, t)
    loss.backward()
    assert len(calls) == 2  # looked up, not measured again
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum"))


def test_choose_is_a_dynamo_constant():
    probe = torch.compiler.assume_constant_result(lambda: None)
    marks = [a for a in vars(probe) if a.startswith("_dynamo")]
    assert marks and all(getattr(_backend.choose, a) for a in marks)


# ----------------------------------------------------------------------------- document masks


@pytest.mark.skipif(interpreter_ready() is not None, reason=str(interpreter_ready()))
def test_masked_attention_is_keyed_and_timed_apart(measuring_on_cpu, monkeypatch):
    """A call with doc_ids and one without are two keys; the masked one is timed on packed
    stories (bench_doc_ids), the unmasked one without a mask."""
    sel, calls = measuring_on_cpu
    monkeypatch.setattr(_backend, "use_triton", lambda op, device, declined=None: declined is None)
    timed_masks = []
    real_inputs = attention.FAMILY.bench_inputs

    def spy(call, device):
        args, wrt = real_inputs(call, device)
        timed_masks.append(args[5])
        return args, wrt

    monkeypatch.setattr(attention.FAMILY, "bench_inputs", spy)
    B, H, T, D = 2, 2, 150, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    cos, sin = ops.rope_cos_sin(T, D)
    doc_ids = torch.repeat_interleave(torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([40, 70, 40]), dim=1)
    ops.rope_attention(q, k, v, cos, sin)
    ops.rope_attention(q, k, v, cos, sin, doc_ids=doc_ids)
    ops.rope_attention(q, k, v, cos, sin, doc_ids=doc_ids + 5)  # other stories, same key
    plain, masked = sel.records()
    assert "docs=False" in plain["shape"] and "docs=True" in masked["shape"]
    assert plain["key"] != masked["key"] and len(calls) == 4  # two keys, two candidates each
    assert timed_masks[0] is None
    torch.testing.assert_close(timed_masks[1], attention.bench_doc_ids(B, T))


@pytest.mark.parametrize("batch, length", [(1, 1), (3, 127), (5, 1000)])
def test_bench_doc_ids_are_packed_stories(batch, length):
    ids = attention.bench_doc_ids(batch, length)
    assert ids.shape == (batch, length) and ids.dtype == torch.int64
    assert bool((ids[:, 1:] >= ids[:, :-1]).all())  # what the op's validation asks
    for row in ids:
        _, counts = torch.unique_consecutive(row, return_counts=True)
        assert int(counts.max()) <= attention.BENCH_DOC_TOKENS
        if length >= 2 * attention.BENCH_DOC_TOKENS:  # whole stories between the row's ends
            assert set(counts[1:-1].tolist()) == {attention.BENCH_DOC_TOKENS}
    if batch > 1 and length > attention.BENCH_DOC_TOKENS:  # rows start inside different stories
        firsts = [int((row == row[0]).sum()) for row in ids]
        assert len(set(firsts)) == batch
