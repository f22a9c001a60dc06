"""prepare: round trips from files in the Hub's format, Hub download call, rerun skip,
atomicity (failures and SIGKILL leave the old corpus intact) and every bad input."""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tsfast.data import prepare as prep
from tsfast.data import sources
from tsfast.data.loader import TokenData
from tsfast.data.meta import validate
from tsfast.data.tokenizer import EOT, decode, encode
from tsfast.files import remove_stale_temporaries

WORDS = ["Lily", "Tom", "ball", "happy", "ran", "the", "park", "café", "naïve", "日本",
         "😀", "Привет", "don't", "42", "3.5", "dog's", "!", "?", ",", '"', "(hi)", "—"]


def random_stories(rng: random.Random, n: int) -> list[str]:
    stories = []
    for _ in range(n):
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 25)))
                      for _ in range(rng.randrange(1, 4))]
        stories.append("\n".join(paragraphs))
    return stories


def write_hub_file(path: Path, stories: list[str]) -> Path:
    """Stories in the Hub's TinyStories*.txt layout: each followed by an <|endoftext|> line."""
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")
    return path


def joined(stories: list[str]) -> str:
    return "".join(s + "<|endoftext|>" for s in stories)


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def hub_files(tmp_path):
    rng = random.Random(random.randrange(2**32))
    train, val = random_stories(rng, 57), random_stories(rng, 9)
    return {"train": train, "val": val,
            "train_file": write_hub_file(tmp_path / "train.txt", train),
            "valid_file": write_hub_file(tmp_path / "valid.txt", val)}


def prepare_files(hub_files, out, **kwargs):
    return prep.prepare("tinystories", out, train_file=hub_files["train_file"],
                        valid_file=hub_files["valid_file"], workers=1, progress=False, **kwargs)


def test_round_trip_from_hub_format_files(hub_files, tmp_path):
    out = prepare_files(hub_files, tmp_path / "data")
    assert out == tmp_path / "data" / "tinystories"
    data = TokenData(out)
    for split in ("train", "val"):
        tokens = data.split(split)
        assert decode(tokens) == joined(hub_files[split])
        expected = [t for s in hub_files[split] for t in [*encode(s), EOT]]
        assert tokens.tolist() == expected
        info = data.meta["splits"][split]
        assert info["stories"] == len(hub_files[split]) and info["tokens"] == len(expected)
    counts = data.counts()
    assert np.array_equal(counts, np.bincount(np.asarray(data.train), minlength=50257))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["kind"] == "files" and meta["dtype"] == "uint16"
    assert meta["source"]["inputs"]["train"]["sha256"] == hashlib.sha256(
        hub_files["train_file"].read_bytes()).hexdigest()


def test_parallel_workers_write_the_same_files(hub_files, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "JOB_TEXT_CHARS", 300)  # many small jobs, reordered if buggy
    one = prepare_files(hub_files, tmp_path / "one")
    two = prep.prepare("tinystories", tmp_path / "two", train_file=hub_files["train_file"],
                       valid_file=hub_files["valid_file"], workers=2, progress=False)
    without_meta = [{k: v for k, v in digests(d).items() if k != "meta.json"} for d in (one, two)]
    assert without_meta[0] == without_meta[1]  # meta.json differs only in its timestamps
    assert validate(two)["fingerprint"] == validate(one)["fingerprint"]


def test_limit_keeps_the_first_stories(hub_files, tmp_path):
    out = prepare_files(hub_files, tmp_path / "data", limit=4)
    data = TokenData(out)
    assert decode(data.train) == joined(hub_files["train"][:4])
    assert decode(data.val) == joined(hub_files["val"][:4])


def test_rerun_skips_and_changed_input_redoes(hub_files, tmp_path, capsys):
    out = prepare_files(hub_files, tmp_path / "data")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare_files(hub_files, tmp_path / "data")
    assert "already prepared from the same inputs; skipping" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    extra = random_stories(random.Random(), 3)
    write_hub_file(hub_files["train_file"], hub_files["train"] + extra)
    prepare_files(hub_files, tmp_path / "data")
    assert "prepared from other inputs or options; preparing it again" in capsys.readouterr().out
    assert decode(TokenData(out).train) == joined(hub_files["train"] + extra)
    with open(out / "val.bin", "ab") as handle:  # damaged output is redone, not trusted
        handle.write(b"\1\0")
    prepare_files(hub_files, tmp_path / "data")
    assert "val.bin has" in capsys.readouterr().out
    assert decode(TokenData(out).val) == joined(hub_files["val"])


@pytest.mark.parametrize("chunk", [1, 2, None])  # 1 and 2 bytes cut the 3-byte BOM
def test_reads_cut_markers_and_characters_anywhere(hub_files, monkeypatch, chunk):
    """Tiny reads split `<|endoftext|>`, the BOM and multi-byte characters across chunks."""
    monkeypatch.setattr(sources, "READ_CHUNK_BYTES", chunk or random.randrange(3, 12))
    monkeypatch.setattr(sources, "JOB_TEXT_CHARS", random.randrange(1, 300))
    jobs = list(sources.TextSplit(hub_files["train_file"]).jobs(limit=None))
    assert [story for (_, batch), _ in jobs for story in batch] == hub_files["train"]
    assert sum(units for _, units in jobs) == hub_files["train_file"].stat().st_size
    crlf = hub_files["train_file"].with_suffix(".crlf")
    crlf.write_bytes(b"\xef\xbb\xbf" + hub_files["train_file"].read_bytes().replace(b"\n", b"\r\n"))
    stories = [story for (_, batch), _ in sources.TextSplit(crlf).jobs(limit=None) for story in batch]
    assert stories == [s.replace("\n", "\r\n") for s in hub_files["train"]]  # BOM dropped, CRLF kept


def test_text_without_markers_is_refused_early(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_STORY_CHARS", 1000)
    monkeypatch.setattr(sources, "READ_CHUNK_BYTES", 256)
    path = tmp_path / "novel.txt"
    path.write_text("All work and no play. " * 100, encoding="utf-8")
    with pytest.raises(prep.PrepareError, match=r"novel\.txt: over 1,000 characters without a `<\|endoftext\|>`"):
        list(sources.TextSplit(path).jobs(limit=None))


def test_hub_download_is_called_for_the_right_files(hub_files, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, *, repo_type):
        calls.append((repo_id, filename, repo_type))
        return str(hub_files["valid_file" if "valid" in filename else "train_file"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out = prep.prepare("tinystories", tmp_path / "data", workers=1, progress=False)
    assert calls == [("roneneldan/TinyStories", "TinyStoriesV2-GPT4-train.txt", "dataset"),
                     ("roneneldan/TinyStories", "TinyStoriesV2-GPT4-valid.txt", "dataset")]
    assert decode(TokenData(out).val) == joined(hub_files["val"])
    assert json.loads((out / "meta.json").read_text())["source"]["kind"] == "hub"
    calls.clear()
    assert prep.prepare("tinystories", tmp_path / "data", version="v1", workers=1,
                        progress=False).name == "tinystories_v1"
    assert [c[1] for c in calls] == ["TinyStories-train.txt", "TinyStories-valid.txt"]


def test_hub_failure_names_the_way_out(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(prep.PrepareError, match="TinyStoriesV2-GPT4-train.txt.*--train FILE --valid FILE"):
        prep.prepare("tinystories", tmp_path / "data", workers=1, progress=False)
    assert not (tmp_path / "data").exists()


def test_failure_mid_write_leaves_the_old_corpus_intact(hub_files, tmp_path, monkeypatch):
    out = prepare_files(hub_files, tmp_path / "data", limit=5)
    before = digests(out)
    calls = {"n": 0}
    real_write = prep.SplitWriter.write

    def failing_write(self, ids, stories):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_write(self, ids, stories)

    monkeypatch.setattr(sources, "JOB_TEXT_CHARS", 100)
    monkeypatch.setattr(prep.SplitWriter, "write", failing_write)
    with pytest.raises(prep.PrepareError, match="disk full.*the existing data there is unchanged"):
        prepare_files(hub_files, tmp_path / "data")
    assert digests(out) == before  # no temporaries left either
    assert decode(TokenData(out).train) == joined(hub_files["train"][:5])


def test_sigkill_mid_write_leaves_the_old_corpus_intact(tmp_path):
    out = prep.prepare("synthetic", tmp_path, num_stories=40, workers=1, progress=False)
    before = digests(out)
    victim = subprocess.Popen(
        [sys.executable, "-m", "tsfast.data.prepare", "--dataset", "synthetic", "--out", str(tmp_path),
         "--workers", "1", "--no-progress", "--num-stories", "400000", "--seed", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(out.glob(".train.bin.tmp-*")) and time.monotonic() < deadline:
            assert victim.poll() is None, "prepare ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.3)  # let it write into the temporary for a while
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    temporaries = [p.name for p in out.glob(".*.tmp-*")]
    assert temporaries, "the kill did not land mid-write"
    assert {k: v for k, v in digests(out).items() if k not in temporaries} == before
    assert len(TokenData(out).train) == validate(out, check_sha256=True)["splits"]["train"]["tokens"]
    # The next run removes the dead run's temporaries.
    prep.prepare("synthetic", tmp_path, num_stories=60, workers=1, progress=False)
    assert not any(out.glob(".*.tmp-*"))


def test_synthetic_split_and_ensure(tmp_path, capsys):
    out = prep.ensure_synthetic(tmp_path, num_stories=100, seed=3, workers=1, progress=False)
    meta = validate(out, check_sha256=True)
    assert (meta["splits"]["train"]["stories"], meta["splits"]["val"]["stories"]) == (98, 2)
    from tsfast.data.synthetic import generate_stories

    assert decode(TokenData(out).val) == joined(generate_stories(2, seed=3, start=98))
    mtime = (out / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    assert prep.ensure_synthetic(tmp_path, num_stories=500, workers=1, progress=False) == out
    assert (out / "meta.json").stat().st_mtime_ns == mtime  # an existing corpus is kept
    (out / "val.bin").write_bytes(b"\0\0")  # damaged: ensure_synthetic redoes it
    prep.ensure_synthetic(tmp_path, num_stories=100, seed=3, workers=1, progress=False)
    assert "preparing it again" in capsys.readouterr().out
    assert validate(out, check_sha256=True)["splits"]["val"]["stories"] == 2


# ----------------------------------------------------------------------------- bad input via the CLI

def _damage(out: Path, damage: str) -> None:
    train = out / "train.bin"
    if damage == "truncated bin":
        train.write_bytes(train.read_bytes()[:-2])
    elif damage == "token out of range":
        tokens = np.fromfile(train, dtype=np.uint16)
        tokens[len(tokens) // 2] = 60000
        tokens.tofile(train)
    elif damage == "meta mismatch":
        meta = json.loads((out / "meta.json").read_text())
        meta["splits"]["val"]["tokens"] += 1
        (out / "meta.json").write_text(json.dumps(meta))
    elif damage == "no meta":
        (out / "meta.json").unlink()


REDO = r"prepare it again with `uv run python -m tsfast\.data\.prepare --dataset tinystories --out "
# case: (what the case needs, CLI arguments, expected message on stderr)
BAD_INPUTS = {
    "missing file": ("files", ["--train", "{base}/nope.txt", "--valid", "{valid}"],
                     r"--train .*nope\.txt: no such file; check the path"),
    "a directory": ("files", ["--train", "{train}", "--valid", "{base}"],
                    r"--valid .*: not a regular file; pass the \.txt file itself"),
    "not UTF-8": ("files", ["--train", "{base}/latin1.txt", "--valid", "{valid}"],
                  r"latin1\.txt: not UTF-8 text \(bad byte near offset 25\)"),
    "empty file": ("files", ["--train", "{train}", "--valid", "{base}/empty.txt"],
                   r"empty\.txt: no stories for the val split.*at least one story"),
    "only markers": ("files", ["--train", "{base}/markers.txt", "--valid", "{valid}"],
                     r"markers\.txt: no stories for the train split"),
    "limit 0": ("files", ["--train", "{train}", "--valid", "{valid}", "--limit", "0"],
                r"--limit: .*0 is not allowed: it must be at least 1"),
    "train alone": ("files", ["--train", "{train}"], r"--train and --valid go together"),
    "one-story synthetic": ("files", ["--dataset", "synthetic", "--num-stories", "1"],
                            r"needs at least 2 stories \(one for train, one for val\)"),
    "truncated bin": ("damaged", ["--check"], r"train\.bin has \d+ bytes but .*meta\.json says .*" + REDO),
    "token out of range": ("damaged", ["--check"],
                           r"train\.bin holds token id 60000, outside GPT-2's vocabulary.*" + REDO),
    "meta mismatch": ("damaged", ["--check"], r"val\.bin has \d+ bytes but .*" + REDO),
    "no meta": ("damaged", ["--check"], r"meta\.json not found: .* holds no finished prepared corpus"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-input CLI run, started together (they are independent) to save time.
    The "files" cases share one good corpus that none of them may touch."""
    base = tmp_path_factory.mktemp("bad")
    rng = random.Random(random.randrange(2**32))
    train = write_hub_file(base / "train.txt", random_stories(rng, 20))
    valid = write_hub_file(base / "valid.txt", random_stories(rng, 5))
    (base / "empty.txt").write_text("", encoding="utf-8")
    (base / "markers.txt").write_text("<|endoftext|>\n\n<|endoftext|>\n", encoding="utf-8")
    (base / "latin1.txt").write_bytes("Once upon a time in a café.\n<|endoftext|>\n".encode("latin-1"))
    good = prep.prepare("tinystories", base / "data", train_file=train, valid_file=valid,
                        workers=1, progress=False)
    runs = {}
    for case, (kind, args, _) in BAD_INPUTS.items():
        out_parent = base / "data"
        if kind == "damaged":
            out_parent = base / case.replace(" ", "_")
            (out_parent / "tinystories").mkdir(parents=True)
            for path in good.iterdir():
                (out_parent / "tinystories" / path.name).write_bytes(path.read_bytes())
            _damage(out_parent / "tinystories", case)
        argv = [a.format(base=base, train=train, valid=valid) for a in args]
        runs[case] = subprocess.Popen(
            [sys.executable, "-m", "tsfast.data.prepare", "--no-progress", *argv, "--out", str(out_parent)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {case: (proc.wait(timeout=120), *proc.communicate()) for case, proc in runs.items()}
    return good, digests(good), results


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_damages_nothing(case, bad_runs):
    good, before, results = bad_runs
    returncode, stdout, stderr = results[case]
    assert returncode != 0, stdout
    assert "Traceback" not in stderr
    assert re.search(BAD_INPUTS[case][2], stderr), stderr
    assert digests(good) == before
    assert not (good.parent / "synthetic").exists()


def test_check_passes_on_good_data(hub_files, tmp_path):
    prepare_files(hub_files, tmp_path / "data")
    result = subprocess.run([sys.executable, "-m", "tsfast.data.prepare", "--check", "--out",
                             str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout


def test_temporaries_of_live_runs_are_kept(tmp_path):
    (tmp_path / ".train.bin.tmp-1").write_bytes(b"x")  # pid 1 is alive (init)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".val.bin.tmp-{dead.pid}").write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [tmp_path / f".val.bin.tmp-{dead.pid}"]
    assert [p.name for p in tmp_path.iterdir()] == [".train.bin.tmp-1"]
    os.remove(tmp_path / ".train.bin.tmp-1")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "/tmp/abs"])
def test_name_must_stay_inside_out(hub_files, tmp_path, capsys, name):
    out = tmp_path / "data" / "inner"
    code = prep.main(["--train", str(hub_files["train_file"]), "--valid", str(hub_files["valid_file"]), "--out", str(out),
                      "--name", name, "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert f"error: --name {name!r}: must be a plain directory name, created inside --out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.txt", "valid.txt"]


def test_a_failed_prepare_leaves_no_empty_directories(hub_files, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    code = prep.main(["--train", str(hub_files["train_file"]), "--valid", str(tmp_path / "empty.txt"),
                      "--out", str(tmp_path / "new" / "data"), "--workers", "1", "--no-progress"])
    assert code == 1 and "no stories for the val split" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "train.txt", "valid.txt"]
