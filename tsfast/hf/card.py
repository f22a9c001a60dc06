"""The model card (README.md) of an export: what the model is, how it was trained, how to run it."""

from __future__ import annotations

import dataclasses

from tsfast.config import TrainConfig, preset


def train_command(train_config: dict) -> str:
    """A `train.py` command that builds the same config: the preset plus every field that
    differs from it."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"name"}
    name = train_config.get("name", "tiny")
    try:
        base = dataclasses.asdict(preset(name))
    except ValueError:
        base = dataclasses.asdict(TrainConfig())
    parts = ["uv run train.py", f"--config {name}"]
    for key in sorted(fields & set(train_config)):
        value = train_config[key]
        if value != base.get(key):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            parts.append(f"--{key} {text}")
    return " ".join(parts)


def _data_line(data_dir: str | None) -> tuple[str, list[str]]:
    if not data_dir:
        return "unknown (the checkpoint does not say)", []
    if data_dir.rstrip("/").endswith("tinystories"):
        return f"TinyStories ({data_dir})", ["roneneldan/TinyStories"]
    if data_dir.rstrip("/").endswith("synthetic"):
        return f"tsfast's built-in synthetic children's stories ({data_dir})", []
    return data_dir, []


def model_card(*, ckpt: dict, architecture: str, repo: str, num_params: int) -> str:
    """README.md text for an export of checkpoint dict `ckpt` (as tsfast saves it)."""
    from huggingface_hub import ModelCardData

    tc = dict(ckpt["train_config"])
    mc = dict(ckpt["model_config"])
    data, datasets = _data_line(ckpt.get("data_dir"))
    meta = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", datasets=datasets or None,
        tags=["tsfast", "tinystories", "gpt2" if architecture.startswith("GPT2") else "gpt_neox"],
    ).to_yaml()
    positions = "learned positions" if mc.get("pos") == "learned" else "rotary positions"
    val = ckpt.get("val_loss")
    best = ckpt.get("best_val_loss")
    rows = [
        ("preset", tc.get("name", "?")),
        ("architecture", f"{architecture}: {mc['n_layer']} layers, {mc['n_head']} heads, {mc['n_embd']} wide, "
                         f"context {mc['block_size']}, {positions}"),
        ("parameters", f"{num_params / 1e6:.2f}M"),
        ("data", data),
        ("steps", str(ckpt.get("step", "?"))),
        ("validation loss", f"{val:.4f}" if val is not None else "not measured"),
    ]
    if best is not None and best != val:
        rows.append(("best validation loss", f"{best:.4f}"))
    if tc.get("init_from"):
        rows.append(("initialised from", tc["init_from"]))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
{meta}
---

# {repo.rsplit("/", 1)[-1]}

A small GPT that writes children's stories, trained with tsfast (`tinystories-fast`) and
exported to `transformers`. The tokenizer is GPT-2's.

| | |
|---|---|
{table}

Trained with (the command rebuilt from the saved config):

```bash
{train_command(tc)}
```

## Use it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained("{repo}")
ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=200)[0]))
```

`generation_config.json` samples like tsfast's `sample.py` (temperature 0.8, top-k 200);
pass `do_sample=False` for greedy decoding. With tsfast itself:
`uv run python sample.py --ckpt {repo}`.
"""
