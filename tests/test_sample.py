"""sample.py end to end on a checkpoint that train.py trains for a few steps."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys

import pytest
import torch
from trained_checkpoint import REPO, quiet_env

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RATE_LINE = re.compile(r"^(\d+) sample\(s\), (\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s "
                       r"\((KV cache, batch \d+|no KV cache, one at a time), cpu\)$")


@pytest.fixture(scope="module")
def sample_mod():
    spec = importlib.util.spec_from_file_location("sample_cli", REPO / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_main(mod, capsys, *args: str) -> tuple[int, str, str]:
    code = mod.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_py_end_to_end(trained_ckpt):
    seed = str(random.randint(0, 10**6))
    cmd = [sys.executable, str(REPO / "sample.py"), "--prompt", "Once upon a time", "--num-samples", "2",
           "--max-new-tokens", "25", "--temperature", "0.8", "--top-k", "200", "--seed", seed,
           "--ckpt", str(trained_ckpt), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "model: tiny" in proc.stderr and "val loss" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"--- sample 1 (seed {seed}) ---"
    assert lines[1].startswith("Once upon a time") and len(lines[1]) > len("Once upon a time")
    assert f"--- sample 2 (seed {int(seed) + 1}) ---" in lines
    rate = RATE_LINE.match(lines[-1])
    assert rate, lines[-1]
    assert rate.group(1) == "2" and 0 < int(rate.group(2)) <= 50 and float(rate.group(3)) > 0
    assert rate.group(4) == "KV cache, batch 2"


def test_same_seed_same_stories(sample_mod, capsys, trained_ckpt):
    seed = str(random.randint(0, 10**6))
    args = ["--ckpt", str(trained_ckpt), "--device", "cpu", "--num-samples", "1", "--max-new-tokens", "30", "--temperature", "1.0"]
    _, a, _ = run_main(sample_mod, capsys, *args, "--seed", seed)
    _, b, _ = run_main(sample_mod, capsys, *args, "--seed", seed)
    _, c, _ = run_main(sample_mod, capsys, *args, "--seed", str(int(seed) + 7))
    story = lambda out: out.splitlines()[1]
    assert story(a) == story(b)
    assert story(a) != story(c)


def test_tokens_are_printed_as_they_arrive(sample_mod, trained_ckpt, monkeypatch):
    events = []

    class Recorder:
        def write(self, text):
            events.append(("w", text))

        def flush(self):
            events.append(("f", None))

    monkeypatch.setattr(sys, "stdout", Recorder())
    code = sample_mod.main(["--ckpt", str(trained_ckpt), "--device", "cpu", "--num-samples", "1",
                            "--max-new-tokens", "20", "--temperature", "1.0", "--seed", "3"])
    monkeypatch.undo()
    assert code == 0
    tokens = int(RATE_LINE.match("".join(t for k, t in events if k == "w").splitlines()[-1]).group(2))
    assert tokens > 1
    assert sum(k == "f" for k, _ in events) >= tokens  # a flush after every token


def test_typed_text_of_every_kind(sample_mod, capsys, trained_ckpt):
    prompt = "Lily 🙂 said こんにちは <|endoftext|> and"
    code, out, err = run_main(sample_mod, capsys, "--ckpt", str(trained_ckpt), "--device", "cpu", "--prompt", prompt,
                              "--num-samples", "1", "--max-new-tokens", "10")
    assert code == 0
    assert out.splitlines()[1].startswith(prompt)
    assert "not in this model's vocabulary" in err


def test_prompt_longer_than_the_context(sample_mod, capsys, trained_ckpt):
    prompt = "Once upon a time there was a dog. " * 40
    code, out, err = run_main(sample_mod, capsys, "--ckpt", str(trained_ckpt), "--device", "cpu", "--prompt", prompt,
                              "--num-samples", "1", "--max-new-tokens", "5")
    assert code == 0
    assert re.search(r"the prompt has \d+ tokens and the context holds 128: only its last 96 tokens are used", err)


def test_cache_and_no_cache_report_their_speed(sample_mod, capsys, trained_ckpt):
    args = ["--ckpt", str(trained_ckpt), "--device", "cpu", "--num-samples", "1", "--max-new-tokens", "8"]
    _, out, _ = run_main(sample_mod, capsys, *args, "--no-cache")
    assert RATE_LINE.match(out.splitlines()[-1]).group(4) == "no KV cache, one at a time"


def test_batch_size_changes_nothing_but_the_speed(sample_mod, capsys, trained_ckpt):
    """The samples of one run, decoded one at a time, all together, or 2 at a time (later
    ones joining as earlier ones end), and without the cache: the same stories in order."""
    args = ["--ckpt", str(trained_ckpt), "--device", "cpu", "--num-samples", "3", "--max-new-tokens",
            str(random.randint(10, 30)), "--temperature", "1.0", "--seed", str(random.randint(0, 10**6))]
    outs = []
    for extra in (["--batch-size", "1"], ["--batch-size", "3"], ["--batch-size", "2"], ["--no-cache"]):
        code, out, _ = run_main(sample_mod, capsys, *args, *extra)
        assert code == 0
        outs.append(out.splitlines()[:-1])  # all but the rate line
    assert outs[0] == outs[1] == outs[2] == outs[3]
    assert [line for line in outs[0] if line.startswith("---")] == [
        f"--- sample {i + 1} (seed {int(args[-1]) + i}) ---" for i in range(3)]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--prompt", "   "], 2, "--prompt is empty"),
        (["--num-samples", "0"], 2, "--num-samples must be at least 1"),
        (["--batch-size", "0"], 2, "--batch-size must be at least 1"),
        (["--max-new-tokens", "0"], 2, "--max-new-tokens must be at least 1"),
        (["--temperature", "-1"], 2, "--temperature must be a number >= 0"),
        (["--top-k", "-5"], 2, "--top-k must be a whole number >= 0"),
        (["--top-p", "1.5"], 2, r"--top-p must be in \(0, 1\]"),
        (["--device", "tpu"], 2, "unknown device 'tpu'"),
        (["--seed", "99999999999999999999999"], 2, "--seed must be a whole number from -9223372036854775808 to "
                                                   "9223372036854775807 .sample i uses seed . i., got 9999"),
        (["--seed", str(2**63 - 1), "--num-samples", "2"], 2, "--seed must be a whole number"),
    ],
)
def test_bad_arguments(sample_mod, capsys, trained_ckpt, args, code, message):
    got, out, err = run_main(sample_mod, capsys, "--ckpt", str(trained_ckpt), *args)
    assert got == code
    assert re.search(message, err) and "Traceback" not in err
    assert out == ""  # refused before the model's header


def test_missing_and_broken_checkpoints(sample_mod, capsys, tmp_path):
    code, _, err = run_main(sample_mod, capsys, "--ckpt", str(tmp_path / "nope.pt"))
    assert code == 1 and "uv run train.py" in err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(random.randbytes(1000))
    code, _, err = run_main(sample_mod, capsys, "--ckpt", str(broken))
    assert code == 1 and "not a readable checkpoint" in err
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    code, _, err = run_main(sample_mod, capsys, "--ckpt", str(other))
    assert code == 1 and "not a tsfast checkpoint" in err


def test_default_checkpoint_missing(sample_mod, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(sample_mod, capsys)
    assert code == 1
    assert "no checkpoint at out/ckpt.pt" in err and "uv run train.py" in err


def test_a_temperature_that_underflows_samples_greedily(sample_mod, capsys, trained_ckpt):
    args = ["--ckpt", str(trained_ckpt), "--device", "cpu", "--num-samples", "2", "--max-new-tokens", "15"]
    code, out, err = run_main(sample_mod, capsys, *args, "--temperature", "1e-40")
    assert code == 0 and "Traceback" not in err
    _, greedy, _ = run_main(sample_mod, capsys, *args, "--temperature", "0")
    stories = [line for line in out.splitlines() if line.startswith("Once upon a time")]
    assert len(stories) == 2 and stories[0] == stories[1]  # two seeds, one story: greedy
    assert stories == [line for line in greedy.splitlines() if line.startswith("Once upon a time")]


def test_a_damaged_checkpoint_exits_1_with_one_line(sample_mod, capsys, trained_ckpt, tmp_path):
    from test_train_checkpoint import damage_tensor_bytes

    damaged = tmp_path / "ckpt.pt"
    damaged.write_bytes(trained_ckpt.read_bytes())
    damage_tensor_bytes(damaged, torch.load(damaged, weights_only=True)["model"]["wte.weight"])
    code, out, err = run_main(sample_mod, capsys, "--ckpt", str(damaged), "--device", "cpu")
    assert code == 1 and out == ""
    assert err == (f"error: {damaged} is damaged: its contents do not match the checksum stored in it (changed "
                   "after it was written: a disk or copy error, or an edit); use the other checkpoint "
                   "(ckpt.pt / resume.pt) or train again\n")


def test_ctrl_c_during_start_up_is_quiet(sample_mod, capsys, trained_ckpt, monkeypatch):
    import tsfast.train.checkpoint

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tsfast.train.checkpoint, "load_for_inference", interrupted)
    code, out, err = run_main(sample_mod, capsys, "--ckpt", str(trained_ckpt), "--device", "cpu")
    assert (code, out, err) == (130, "", "\ninterrupted\n")


def test_output_cut_short_by_head_is_quiet(sample_mod, capsys, trained_ckpt, monkeypatch):
    """sample.py ... | head -c 50: stdout's reader is gone; exit 141 (SIGPIPE's code) and
    nothing on stderr but the model's header (it was a BrokenPipeError traceback, exit 1)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", pipe)
    code = sample_mod.main(["--ckpt", str(trained_ckpt), "--device", "cpu", "--max-new-tokens", "5"])
    monkeypatch.undo()
    pipe.close()
    err = capsys.readouterr().err
    assert code == 141 and err.startswith("model: tiny") and err.count("\n") == 1


def test_a_closed_pipe_in_a_real_process_exits_141_in_silence():
    """`... | head -c 50` on a process whose main() is wrapped as sample.py's is: exit 141 and
    nothing on stderr, also from Python's last flush of stdout at exit."""
    code = ("import sys\nfrom tsfast.clitools import quiet_exits\n@quiet_exits\ndef main():\n"
            "    for _ in range(1000):\n        sys.stdout.write('x' * 1000)\nsys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(50)) == 50  # then the reader leaves
    proc.stdout.close()
    err = proc.stderr.read()
    assert (proc.wait(timeout=60), err) == (141, b"")
