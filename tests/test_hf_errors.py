"""Hugging Face interop: every refusal and broken input is one clear line; the Hub client is
replaced at its boundary (no network here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import huggingface_hub
import pytest
from hf_helpers import max_logit_diff, random_ids
from train_helpers import REPO, child_env, small_config
from transformers import GPT2LMHeadModel

from tsfast import export as export_cli
from tsfast.hf.load import load_model
from tsfast.train import cli
from tsfast.train.checkpoint import CheckpointError
from tsfast.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def one_line_error(spec, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(spec, device="cpu")
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


@pytest.fixture
def broken(gpt2_dir, tmp_path):
    """A fresh copy of the saved GPT-2 directory to damage."""
    return Path(shutil.copytree(gpt2_dir, tmp_path / "broken"))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_corrupt_weights(broken):
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(broken, "model.safetensors is not a readable safetensors file")


@pytest.mark.parametrize("changes, match", [
    ({"n_layer": 3}, r"tensor h\.2\.ln_1\.weight is missing"),
    ({"n_layer": 1}, r"do not fit config.json \(tensors it does not describe: h\.1\."),
    ({"vocab_size": 50000}, "a vocabulary of 50000 ids .*GPT-2's 50257"),
    ({"activation_function": "gelu"}, "activation 'gelu'"),
    ({"model_type": "llama"}, "model type 'llama'"),
    ({"layer_norm_epsilon": 1e-6}, "LayerNorm eps 1e-06"),
    ({"n_inner": 100}, "an MLP of width 100"),
])
def test_mismatched_config(broken, changes, match):
    edit_config(broken, **changes)
    one_line_error(broken, match)


def test_misshapen_weights(broken):
    edit_config(broken, n_embd=64, n_head=4)
    one_line_error(broken, "does not fit|shape")


def test_unreadable_and_missing_files(broken, tmp_path):
    (broken / "config.json").write_text("{not json")
    one_line_error(broken, "config.json is not a readable config")
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text('{"model_type": "gpt2"}')
    (bin_only / "pytorch_model.bin").write_bytes(b"\0")
    one_line_error(bin_only, "no model.safetensors .*pytorch_model.bin.*save_pretrained")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(empty, "neither config.json .* nor ckpt.pt")


def test_sample_py_reports_a_broken_export_in_one_line(broken):
    (broken / "model.safetensors").write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "sample.py", "--ckpt", str(broken), "--device", "cpu", "--max-new-tokens", "5"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "safetensors" in errors[0], proc.stderr


# ----------------------------------------------------------------------------- the Hub


class FakeHub:
    """snapshot_download and HfApi as the code calls them, answering from local files."""

    def __init__(self, local: Path | None = None, fail: Exception | None = None):
        self.local, self.fail = local, fail
        self.downloads: list[dict] = []
        self.created: list[dict] = []
        self.uploads: list[dict] = []

    def snapshot_download(self, **kwargs):
        self.downloads.append(kwargs)
        if self.fail:
            raise self.fail
        return str(self.local)

    def api(self):
        hub = self

        class Api:
            def create_repo(self, **kwargs):
                hub.created.append(kwargs)

            def upload_folder(self, **kwargs):
                if hub.fail:
                    raise hub.fail
                folder = Path(kwargs["folder_path"])
                hub.uploads.append({**kwargs, "files": sorted(p.name for p in folder.iterdir())})

        return Api


def test_init_from_gpt2_by_name_downloads_through_huggingface_hub(corpus, gpt2_dir, tmp_path, monkeypatch):
    hub = FakeHub(gpt2_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    cfg, _, _ = cli.parse(["--config", "tiny", "--init_from", "gpt2", "--block_size", "16", "--data", str(corpus)])
    call = hub.downloads[0]
    assert call["repo_id"] == "openai-community/gpt2"
    assert "config.json" in call["allow_patterns"] and "*.safetensors" in call["allow_patterns"]
    assert (cfg.n_embd, cfg.pos, cfg.block_size) == (48, "learned", 16)


def test_ckpt_takes_a_hub_repo_id(gpt2_dir, monkeypatch):
    hub = FakeHub(gpt2_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    loaded = load_model("someone/tiny-stories", device="cpu")
    assert hub.downloads[0]["repo_id"] == "someone/tiny-stories" and loaded.name == "someone/tiny-stories"
    hf = GPT2LMHeadModel.from_pretrained(str(gpt2_dir)).eval()
    assert max_logit_diff(loaded.model, hf, random_ids(64)) <= 1e-5


def test_a_failed_download_is_one_line(monkeypatch):
    hub = FakeHub(fail=OSError("We couldn't connect to 'https://huggingface.co'.\nmore detail"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    message = one_line_error("someone/missing", "cannot download someone/missing from the Hugging Face Hub")
    assert "network" in message


def test_push_to_hub_uploads_the_export(corpus, tmp_path, monkeypatch, capsys):
    train(small_config(corpus, tmp_path, vocab="gpt2", pos="learned", max_iters=1, eval_interval=1))
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api())
    out = tmp_path / "export"
    code = export_cli.main([str(tmp_path / "ckpt.pt"), "--out", str(out), "--push-to-hub", "me/tiny", "--private"])
    assert code == 0, capsys.readouterr().err
    assert hub.created == [{"repo_id": "me/tiny", "private": True, "exist_ok": True}]
    upload = hub.uploads[0]
    assert upload["repo_id"] == "me/tiny" and Path(upload["folder_path"]) == out
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(upload["files"])
    assert 'from_pretrained("me/tiny")' in (out / "README.md").read_text()
    # A failed upload keeps the export and says how to log in; an existing --out needs --force.
    hub.fail = PermissionError("401 Unauthorized")
    again = tmp_path / "again"
    assert export_cli.main([str(tmp_path / "ckpt.pt"), "--out", str(again), "--push-to-hub", "me/tiny"]) == 3
    err = capsys.readouterr().err
    assert "401 Unauthorized" in err and "hf auth login" in err and (again / "model.safetensors").is_file()
    assert export_cli.main([str(tmp_path / "ckpt.pt"), "--out", str(again)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert export_cli.main([str(tmp_path / "ckpt.pt"), "--out", str(again), "--force"]) == 0


# ----------------------------------------------------------------------------- refusals


def test_compact_vocabulary_checkpoint_is_refused(corpus, tmp_path, capsys):
    train(small_config(corpus, tmp_path, max_iters=1, eval_interval=1))  # tiny: compact vocabulary
    out = tmp_path / "export"
    assert export_cli.main([str(tmp_path / "ckpt.pt"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "compact vocabulary" in err and "--vocab gpt2" in err, err
    assert not out.exists() and not list(tmp_path.glob(".export*"))


@pytest.mark.parametrize("flags, match", [
    (["--n_layer", "3"], "drop --n_layer 3"),
    (["--vocab", "compact"], "drop --vocab compact"),
    (["--pos", "rope"], "drop --pos rope"),
    (["--bias", "false"], "drop --bias False"),
    (["--block_size", "65"], "has 64 positions; --block_size needs 65: pass --block_size 64 or less"),
    ([], "has 64 positions; block_size=128 of the tiny preset needs 128"),
])
def test_init_from_shapes_that_cannot_be_honoured(gpt2_dir, flags, match, capsys):
    block = [] if any(f == "--block_size" for f in flags) or not flags else ["--block_size", "32"]
    assert cli.main(["--config", "tiny", "--init_from", str(gpt2_dir), *block, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("train.py: error: ")
    assert match in err, err


def test_init_from_a_config_that_is_not_an_object(gpt2_dir, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(gpt2_dir, broken)
    (broken / "config.json").write_text(json.dumps(["n_layer", 2]))
    assert cli.main(["--config", "tiny", "--init_from", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config.json is not a JSON object" in err, err


def test_wandb_flag_without_wandb_says_how_to_get_it(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert cli.main(["--config", "tiny", "--wandb"]) == 2
    assert "uv run python train.py --wandb" in capsys.readouterr().err


def test_a_plain_install_leaves_the_optional_packages_out():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    base = " ".join(project["project"]["dependencies"])
    for heavy in ("gradio", "wandb", "playwright", "transformers", "safetensors", "openai-whisper", "pytest"):
        assert heavy not in base
    assert project["tool"]["uv"]["default-groups"] == ["dev"]  # `uv run pytest` has its tools
    extras = project["project"]["optional-dependencies"]
    assert any(d.startswith("transformers") for d in extras["hf"]) and any(d.startswith("safetensors") for d in extras["hf"])
    assert "tinystories-fast[hf,demo,wandb]" in project["dependency-groups"]["dev"]
    # Each script sets itself up under `uv run SCRIPT`: PEP 723 metadata naming what it needs,
    # so `uv run train.py` installs no extra and no test tool.
    for script, needs in (("demo.py", "tinystories-fast[demo,hf]"), ("train.py", '"tinystories-fast"'),
                          ("sample.py", '"tinystories-fast"')):
        header = (REPO / script).read_text().split('"""')[0]
        assert "# /// script" in header and needs in header and "# ///\n" in header, script
