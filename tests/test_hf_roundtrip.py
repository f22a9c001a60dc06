"""Hugging Face interop end to end, on the CPU with no network: a random GPT2LMHeadModel ->
--init_from -> the same logits -> training steps -> export -> transformers computes what tsfast
computes; the same for a rotary model (GPTNeoXForCausalLM); the exported tokenizer; reading
the export back with tsfast's own tools."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch
from hf_helpers import HELD_OUT, SHAPE, greedy_both, max_logit_diff, random_ids
from train_helpers import REPO, small_config
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, GPTNeoXForCausalLM

from tsfast import ops
from tsfast.data.tokenizer import encode, get_tokenizer
from tsfast.export import export
from tsfast.hf.load import load_model
from tsfast.train import checkpoint as ckpt_io
from tsfast.train.cli import parse
from tsfast.train.loop import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ATOL = 1e-5


def init_args(corpus, out, init_from, *extra):
    return [
        "--config", "tiny", "--init_from", str(init_from), "--data", str(corpus), "--out_dir", str(out),
        "--block_size", "32", "--batch_size", "4", "--max_iters", "3", "--warmup_iters", "1",
        "--eval_interval", "3", "--eval_iters", "2", "--log_interval", "1", "--sample_at_end", "false",
        "--device", "cpu", "--kernels", "torch", "--lr", "3e-3", *extra,
    ]


def test_init_from_gpt2_train_export_round_trip(corpus, gpt2_dir, tmp_path):
    hf = GPT2LMHeadModel.from_pretrained(str(gpt2_dir)).eval()
    cfg, _, notes = parse(init_args(corpus, tmp_path, gpt2_dir))
    # The shape comes from the model, the rest from the preset (tiny's compact vocabulary and
    # rotary positions give way); the context is cut to the asked 32 of its 64 positions.
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (SHAPE["n_layer"], SHAPE["n_head"], SHAPE["n_embd"])
    assert (cfg.pos, cfg.vocab, cfg.bias, cfg.block_size, cfg.lr) == ("learned", "gpt2", True, 32, 3e-3)
    assert any("vocab compact -> gpt2" in n and "pos rope -> learned" in n for n in notes), notes

    with ops.use("torch"):
        trainer = Trainer(cfg)
        try:
            model = trainer.model.eval()
            ids = random_ids(32)
            assert max_logit_diff(model, hf, ids) <= ATOL
            # The padding rows (50257 -> 50304) hold the mean row: in the training loss they take
            # at most 47/50304 of the softmax mass, so the loss is within log(1 + 47/50257) of HF's.
            x, y = ids[:, :-1], ids[:, 1:]
            with torch.no_grad():
                ours = model(x, y)[1].item()
                theirs = hf(ids, labels=ids).loss.item()
            assert abs(ours - theirs) <= math.log1p(47 / 50257) + 1e-5, (ours, theirs)
        finally:
            trainer.close()

    result = train(cfg)
    assert result.step == 3
    trained = ckpt_io.load_for_inference(tmp_path / "ckpt.pt", device="cpu").model
    moved = (trained.blocks[0].c_attn.weight - model.blocks[0].c_attn.weight).abs().max().item()
    assert moved > 1e-4, "training did not change the weights"

    out = export(tmp_path / "ckpt.pt", tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(exported) is GPT2LMHeadModel and exported.config.n_positions == 32
    for n in (1, 17, 32):
        assert max_logit_diff(trained, exported, random_ids(n)) <= ATOL
    prompt = encode("Once upon a time")
    ours, theirs = greedy_both(trained, exported, prompt, 32 - len(prompt))
    assert ours == theirs


@pytest.mark.parametrize("bias", [True, False])
def test_rotary_model_exports_as_gpt_neox(corpus, tmp_path, bias):
    cfg = small_config(corpus, tmp_path, vocab="gpt2", pos="rope", n_layer=2, n_head=2, bias=bias,
                       max_iters=2, eval_interval=2)
    train(cfg)
    loaded = ckpt_io.load_for_inference(tmp_path / "ckpt.pt", device="cpu")
    out = export(tmp_path / "ckpt.pt", tmp_path / "export", repo="someone/tiny-rotary")

    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(exported) is GPTNeoXForCausalLM
    c = exported.config
    assert c.use_parallel_residual is False and c.rope_parameters["partial_rotary_factor"] == 1.0
    saved = json.loads((out / "config.json").read_text())  # older transformers read these keys
    assert (saved["rotary_pct"], saved["rotary_emb_base"]) == (1.0, 10000.0)
    assert exported.get_output_embeddings().weight is exported.get_input_embeddings().weight
    for n in (1, 7, 32):
        assert max_logit_diff(loaded.model, exported, random_ids(n)) <= ATOL
    prompt = encode("One day, Tom saw a")
    ours, theirs = greedy_both(loaded.model, exported, prompt, 32 - len(prompt))
    assert ours == theirs

    # What the directory holds, and the model card.
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "vocab.json",
            "merges.txt", "tokenizer_config.json", "README.md", "tsfast.json"} <= names
    card = (out / "README.md").read_text()
    assert "someone/tiny-rotary" in card and "GPTNeoXForCausalLM" in card and "| steps | 2 |" in card
    assert f"{loaded.val_loss:.4f}" in card and "uv run train.py --config tiny" in card and "--vocab gpt2" in card
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 50256 and gen["temperature"] == 0.8 and gen["top_k"] == 200

    # tsfast reads the export back: the same model, with its name, step and loss.
    back = load_model(out, device="cpu")
    assert (back.name, back.step, back.val_loss, back.vocab) == ("tiny", 2, loaded.val_loss, None)
    assert back.model.config.bias is bias and back.num_params == loaded.num_params
    ids = random_ids(32)
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids, all_logits=True)[0], loaded.model(ids, all_logits=True)[0])
    if bias:  # and training can start from it: a rotary model stays rotary
        cfg, _, _ = parse(init_args(corpus, tmp_path / "again", out))
        assert (cfg.pos, cfg.n_layer, cfg.n_head, cfg.n_embd) == ("rope", 2, 2, 32)
        with ops.use("torch"):
            trainer = Trainer(cfg)
            try:
                assert max_logit_diff(trainer.model.eval(), exported, ids) <= ATOL
            finally:
                trainer.close()


def test_exported_tokenizer_gives_tiktoken_ids(corpus, tmp_path):
    from tsfast.hf.tokenizer import save_gpt2_tokenizer

    save_gpt2_tokenizer(tmp_path, model_max_length=1024)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    val = (corpus / "val.bin").read_bytes()
    stories = get_tokenizer().decode(np.frombuffer(val, dtype=np.uint16)[:3000].tolist()).split("<|endoftext|>")
    texts = HELD_OUT + [s for s in stories if s.strip()][:5]
    for text in texts:
        assert tok(text)["input_ids"] == encode(text), text
        assert tok.decode(encode(text)) == text
    # Like GPT-2's own tokenizer on the Hub, transformers reads a typed <|endoftext|> as the
    # special token (tsfast's encode reads it as text).
    typed = "The end.<|endoftext|>"
    assert tok(typed)["input_ids"] == get_tokenizer().encode(typed, allowed_special="all")
    assert tok.eos_token_id == 50256 and tok.model_max_length == 1024


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_sample_and_demo_run_an_export_like_the_checkpoint(corpus, tmp_path, capsys):
    train(small_config(corpus, tmp_path, vocab="gpt2", pos="learned", max_iters=2, eval_interval=2))
    out = export(tmp_path / "ckpt.pt", tmp_path / "export")
    sample = _script("sample")
    args = ["--temperature", "0", "--num-samples", "1", "--max-new-tokens", "12", "--device", "cpu"]
    stories = []
    for ckpt in (tmp_path / "ckpt.pt", out, tmp_path):  # a checkpoint, an export, a run directory
        assert sample.main(["--ckpt", str(ckpt), *args]) == 0
        captured = capsys.readouterr()
        stories.append(captured.out.split("---\n", 1)[1].rsplit("\n1 sample(s)", 1)[0])
        assert "model: tiny" in captured.err
    assert stories[0] == stories[1] == stories[2] and len(stories[0]) > len("Once upon a time")

    teller = _script("demo").StoryTeller(out, device="cpu")
    assert teller.load() is not None and teller.error is None
    assert "model **tiny**" in teller.info() and "context 32 tokens" in teller.info()
