"""Export a tsfast checkpoint to a Hugging Face `transformers` directory, and push it to the Hub.

    uv run python -m tsfast.export out/ckpt.pt --out export/ [--push-to-hub OWNER/NAME]

The directory loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, no tsfast needed: config.json, model.safetensors,
generation_config.json, GPT-2's tokenizer files, a model card (README.md), and tsfast.json
(name, step, losses and configs, which `sample.py --ckpt DIR` shows). Learned-position
models become GPT2LMHeadModel, rotary ones GPTNeoXForCausalLM (`tsfast.hf.convert` says
why these compute the same function). Before anything is written, the exported model's
logits are compared with tsfast's on random ids: a different model is never written.

A compact-vocabulary checkpoint is refused: its single "unknown" id stands for every GPT-2
token it never saw, and no `transformers` model over GPT-2's vocabulary can give those
tokens zero probability (their output layers have no bias), so the export would not be the
same model. Train with `--vocab gpt2` to share a model.

The directory is written next to DIR under a temporary name, then renamed into place.
Exit codes: 0 done, 1 the checkpoint cannot be exported, 2 bad arguments or a missing
package, 3 the upload failed (the export stays on disk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from tsfast.hf.convert import EOT, GPT2_VOCAB, hf_config, legacy_rope_keys, to_hf_state
from tsfast.hf.load import HF_EXTRA, METADATA

EXIT_CHECKPOINT, EXIT_USAGE, EXIT_UPLOAD = 1, 2, 3
# Sampling defaults of tsfast's sample.py, so `generate()` behaves alike out of the box.
GENERATION = dict(do_sample=True, temperature=0.8, top_k=200, max_new_tokens=200)
SELF_CHECK_TOKENS = 32


class ExportError(RuntimeError):
    """The checkpoint cannot become a model that computes the same function."""


def read_tsfast(path: Path):
    """(checkpoint dict, the tsfast GPT in eval mode on the CPU)."""
    from tsfast.model import GPT
    from tsfast.train import checkpoint as ckpt_io

    if path.is_dir() and (path / "ckpt.pt").is_file():
        path = path / "ckpt.pt"
    ckpt = ckpt_io.read_checkpoint(path)
    config = ckpt_io.model_config_of(ckpt)
    if ckpt.get("vocab") is not None:
        size = config.vocab_size  # read_checkpoint checked the vocabulary against it
        raise ExportError(
            f"{path} uses a compact vocabulary ({size} ids, one of them 'unknown' for the other GPT-2 "
            "tokens): no transformers model over GPT-2's vocabulary computes the same thing, so it is "
            "not exported. Train with the full vocabulary to share a model, e.g. "
            f"`uv run train.py --config {ckpt['train_config'].get('name', 'tiny')} --vocab gpt2`"
        )
    model = GPT(config)
    ckpt_io.load_model_state(model, ckpt, path)
    return ckpt, model.eval()


def to_transformers(model):
    """The `transformers` model that computes what the tsfast GPT computes."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    kwargs = hf_config(model.config)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    hf = AutoModelForCausalLM.from_config(config, dtype=model.wte.weight.dtype)
    state = to_hf_state(model.state_dict(), model.config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = [n for n in missing if n.endswith(("lm_head.weight", "embed_out.weight"))]
    if unexpected or set(missing) != set(tied) or hf.get_output_embeddings().weight is not hf.get_input_embeddings().weight:
        raise ExportError(f"the {type(hf).__name__} of this transformers release does not take these "
                          f"weights (missing {sorted(set(missing) - set(tied))[:3]}, unexpected {unexpected[:3]})")
    hf.generation_config = GenerationConfig(bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT, **GENERATION)
    return hf.eval()


@torch.no_grad()
def check_same_function(model, hf) -> float:
    """Max |logit difference| of the two models on random ids; ExportError if it is more
    than float rounding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, GPT2_VOCAB, (1, min(SELF_CHECK_TOKENS, model.config.block_size)), generator=g)
    ours = model(ids, all_logits=True)[0].float()
    theirs = hf(ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    tol = 1e-4 * max(1.0, ours.abs().max().item()) if model.wte.weight.dtype == torch.float32 else 5e-2
    if not diff <= tol:
        raise ExportError(f"the exported {type(hf).__name__} disagrees with tsfast by {diff:.3g} in the logits "
                          f"(allowed {tol:.3g}); nothing was written")
    return diff


def metadata(ckpt: dict, num_params: int) -> dict:
    tc = ckpt["train_config"]
    return {
        "format": "tsfast-export-v1", "name": tc.get("name", "?"), "step": int(ckpt["step"]),
        "val_loss": ckpt.get("val_loss"), "best_val_loss": ckpt.get("best_val_loss"), "num_params": num_params,
        "data_dir": ckpt.get("data_dir"), "model_config": ckpt["model_config"], "train_config": tc,
    }


def export(ckpt_path: str | Path, out: str | Path, *, repo: str | None = None, force: bool = False) -> Path:
    """Write the export of `ckpt_path` to `out`; return `out`. Raises ExportError,
    CheckpointError, FileExistsError."""
    from tsfast.hf.card import model_card
    from tsfast.hf.tokenizer import save_gpt2_tokenizer

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty: choose another --out, or pass --force to replace it")
    ckpt, model = read_tsfast(Path(ckpt_path))
    hf = to_transformers(model)
    check_same_function(model, hf)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(str(tmp))
        config = json.loads((tmp / "config.json").read_text())
        config.update(legacy_rope_keys(model.config))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_gpt2_tokenizer(tmp, model_max_length=model.config.block_size)
        num_params = sum(p.numel() for p in hf.parameters())
        (tmp / METADATA).write_text(json.dumps(metadata(ckpt, num_params), indent=2) + "\n")
        card = model_card(ckpt=ckpt, architecture=type(hf).__name__, repo=repo or str(out), num_params=num_params)
        (tmp / "README.md").write_text(card)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def push(out: Path, repo: str, *, private: bool) -> str:
    """Upload the export directory to the Hub repo (created if missing); return its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo, private=private, exist_ok=True)
    meta = json.loads((out / METADATA).read_text())
    api.upload_folder(folder_path=str(out), repo_id=repo,
                      commit_message=f"tsfast export: {meta['name']}, step {meta['step']}")
    return f"https://huggingface.co/{repo}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tsfast.export", description="Export a tsfast checkpoint to Hugging Face transformers.",
        epilog="Exit codes: 0 done, 1 the checkpoint cannot be exported, 2 bad arguments or a missing package, "
        "3 the upload failed (the export stays on disk).",
    )
    p.add_argument("ckpt", help="a tsfast checkpoint (out/ckpt.pt, or a directory holding ckpt.pt)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help="also upload it to this Hub repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tsfast.train.checkpoint import CheckpointError

    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"error: exporting needs {e.name}, {HF_EXTRA}", file=sys.stderr)
        return EXIT_USAGE
    try:
        out = export(args.ckpt, args.out, repo=args.push_to_hub, force=args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    print(f"exported {args.ckpt} to {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if args.push_to_hub:
        try:
            url = push(out, args.push_to_hub, private=args.private)
        except Exception as e:  # auth, network, permissions: one line, the export stays
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"error: the upload to {args.push_to_hub} failed ({type(e).__name__}: {first}); the export "
                  f"is in {out}. Log in with `hf auth login` (or set HF_TOKEN) and run again", file=sys.stderr)
            return EXIT_UPLOAD
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
