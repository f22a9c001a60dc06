"""tsfast GPT weights <-> Hugging Face `transformers` weights, and the configs that make
both compute the same function.

Two architectures in `transformers` compute what a tsfast GPT computes:

    learned positions  GPT2LMHeadModel       the same module tree; Conv1D weights are stored
                                             (in, out), so every matrix is transposed
    rotary positions   GPTNeoXForCausalLM    rotate-half rotary on the whole head
                                             (partial_rotary_factor 1), sequential residual
                                             (use_parallel_residual false), tied embedding;
                                             its fused qkv rows are ordered (head, q/k/v, dim)
                                             where tsfast's are (q/k/v, head, dim)

Both use LayerNorm eps 1e-5, the tanh GELU, an attention scale of head_dim**-0.5 and a
4x MLP. A tsfast model without biases exports with zero biases (the same function). tsfast
pads its embedding to a multiple of 64 rows; exports keep GPT-2's 50257, and imports fill
the padding with the mean row (the padding never reaches the logits sampling sees; in the
training loss, a padded logit then equals the mean logit, so the padding holds at most
47/50304 of the softmax mass).

This module needs only torch: reading and writing files is `tsfast.hf.load` and
`tsfast.export`. Anything that would make a different model raises `ConversionError`.
"""

from __future__ import annotations

import math

import torch

from tsfast.config import GPTConfig

GPT2_VOCAB = 50257
EOT = 50256
LN_EPS = 1e-5  # tsfast's LayerNorm epsilon (tsfast.ops)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation
TSFAST_ACTIVATION = {"gpt2": "gelu_new", "gpt_neox": "gelu_pytorch_tanh"}
ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}


class ConversionError(ValueError):
    """The weights or config describe a model tsfast cannot reproduce exactly."""


# ----------------------------------------------------------------------------- configs


def hf_config(config: GPTConfig) -> dict:
    """The `transformers` config (as keyword arguments) of a tsfast model shape."""
    common = dict(vocab_size=GPT2_VOCAB, bos_token_id=EOT, eos_token_id=EOT, tie_word_embeddings=True)
    if config.pos == "learned":
        p = config.dropout
        return dict(
            model_type="gpt2", architectures=[ARCHITECTURE["gpt2"]], n_positions=config.block_size,
            n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head, n_inner=None,
            activation_function=TSFAST_ACTIVATION["gpt2"], layer_norm_epsilon=LN_EPS,
            resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, scale_attn_weights=True, **common,
        )
    return dict(
        model_type="gpt_neox", architectures=[ARCHITECTURE["gpt_neox"]],
        max_position_embeddings=config.block_size, hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        intermediate_size=4 * config.n_embd, hidden_act=TSFAST_ACTIVATION["gpt_neox"],
        layer_norm_eps=LN_EPS, use_parallel_residual=False, attention_bias=True,
        attention_dropout=config.dropout, hidden_dropout=config.dropout,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": 1.0},
        **common,
    )


def legacy_rope_keys(config: GPTConfig) -> dict:
    """config.json keys for transformers releases before 5, which read rotary_pct and
    rotary_emb_base, or rope_theta and partial_rotary_factor; transformers 5 writes only
    rope_parameters. Without them transformers 4.57 rotates a quarter of each head (its
    default) and the logits move by ~1e-3; with them they match to 2e-7."""
    if config.pos == "learned":
        return {}
    return dict(rotary_pct=1.0, rotary_emb_base=config.rope_base, partial_rotary_factor=1.0,
                rope_theta=config.rope_base)


def _require(ok: bool, what: str, source: str) -> None:
    if not ok:
        raise ConversionError(f"{source}: {what}; tsfast cannot run this model exactly")


def _require_match(ok: bool, what: str, source: str) -> None:
    if not ok:
        raise ConversionError(f"{source}: the weights do not fit config.json ({what}): a damaged or mixed-up directory")


def _close(a, b) -> bool:
    return a is not None and math.isclose(float(a), float(b), rel_tol=1e-6)


def tsfast_config(hf: dict, source: str, *, bias: bool = True) -> GPTConfig:
    """The tsfast shape of a GPT-2 or GPT-NeoX `config.json` (as a dict), or ConversionError
    naming the setting tsfast does not have."""
    kind = hf.get("model_type")
    _require(kind in ARCHITECTURE, f"model type {kind!r} (tsfast reads gpt2, and gpt_neox as tsfast exports it)", source)
    _require(hf.get("vocab_size") == GPT2_VOCAB,
             f"a vocabulary of {hf.get('vocab_size')} ids (tsfast's tokenizer is GPT-2's {GPT2_VOCAB})", source)
    if kind == "gpt2":
        act, eps = hf.get("activation_function", "gelu_new"), hf.get("layer_norm_epsilon", 1e-5)
        C = hf.get("n_embd", 768)
        _require(hf.get("n_inner") in (None, 4 * C), f"an MLP of width {hf.get('n_inner')} (tsfast's is 4 x {C})", source)
        _require(hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False),
                 "an attention scale other than head_dim**-0.5", source)
        _require(not hf.get("add_cross_attention", False), "cross-attention", source)
        shape = dict(n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=C,
                     block_size=hf.get("n_positions", 1024), pos="learned")
    else:
        act, eps = hf.get("hidden_act", "gelu"), hf.get("layer_norm_eps", 1e-5)
        C = hf.get("hidden_size")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        fraction = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
        base = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        _require(rope.get("rope_type", rope.get("type", "default")) == "default",
                 f"rotary scaling {rope.get('rope_type', rope.get('type'))!r}", source)
        _require(_close(fraction, 1.0), f"rotary on {fraction} of each head (tsfast rotates all of it)", source)
        _require(hf.get("use_parallel_residual", True) is False, "a parallel residual (tsfast's is sequential)", source)
        _require(hf.get("intermediate_size") == 4 * C,
                 f"an MLP of width {hf.get('intermediate_size')} (tsfast's is 4 x {C})", source)
        shape = dict(n_layer=hf.get("num_hidden_layers"), n_head=hf.get("num_attention_heads"), n_embd=C,
                     block_size=hf.get("max_position_embeddings"), pos="rope", rope_base=float(base))
    _require(act in TANH_GELU, f"activation {act!r} (tsfast's is the tanh GELU: {' or '.join(TANH_GELU)})", source)
    _require(_close(eps, LN_EPS), f"LayerNorm eps {eps} (tsfast's is {LN_EPS})", source)
    try:
        return GPTConfig(**shape, vocab_size=GPT2_VOCAB, dropout=0.0, bias=bias)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- weights


def _layer_names(kind: str, i: int) -> dict[str, str]:
    """tsfast name -> Hugging Face name (without the model prefix) of layer i's tensors."""
    if kind == "gpt2":
        h = f"h.{i}."
        pairs = {"ln_1": "ln_1", "c_attn": "attn.c_attn", "attn_proj": "attn.c_proj", "ln_2": "ln_2",
                 "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}
    else:
        h = f"layers.{i}."
        pairs = {"ln_1": "input_layernorm", "c_attn": "attention.query_key_value", "attn_proj": "attention.dense",
                 "ln_2": "post_attention_layernorm", "c_fc": "mlp.dense_h_to_4h", "mlp_proj": "mlp.dense_4h_to_h"}
    return {
        f"blocks.{i}.{ours}.{p}": f"{h}{theirs}.{p}" for ours, theirs in pairs.items() for p in ("weight", "bias")
    }


def _qkv_rows(t: torch.Tensor, n_head: int, *, to_hf: bool) -> torch.Tensor:
    """Reorder fused-qkv rows between tsfast's (3, head, dim) and GPT-NeoX's (head, 3, dim)."""
    rest = t.shape[1:]
    hs = t.shape[0] // (3 * n_head)
    grid = (3, n_head, hs) if to_hf else (n_head, 3, hs)
    return t.reshape(*grid, *rest).transpose(0, 1).reshape(3 * n_head * hs, *rest).contiguous()


def _prefix(kind: str) -> str:
    return "transformer." if kind == "gpt2" else "gpt_neox."


def _globals(kind: str) -> dict[str, str]:
    if kind == "gpt2":
        return {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight",
                "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
    return {"wte.weight": "embed_in.weight", "ln_f.weight": "final_layer_norm.weight",
            "ln_f.bias": "final_layer_norm.bias"}


def _names(kind: str, n_layer: int) -> dict[str, str]:
    """tsfast parameter name -> the Hugging Face model's (unprefixed), for every tensor."""
    names = _globals(kind)
    for i in range(n_layer):
        names.update(_layer_names(kind, i))
    return names


def _convert(kind: str, name: str, t: torch.Tensor, n_head: int, *, to_hf: bool) -> torch.Tensor:
    if kind == "gpt2" and t.dim() == 2 and name.startswith("blocks."):
        return t.t().contiguous()  # Conv1D keeps (in, out)
    if kind == "gpt_neox" and name.endswith(("c_attn.weight", "c_attn.bias")):
        return _qkv_rows(t, n_head, to_hf=to_hf)
    return t


def to_hf_state(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """A tsfast state dict as the Hugging Face model's (prefixed names, GPT-2's 50257 rows,
    zero biases where tsfast has none). The output layer is tied: not included."""
    kind = "gpt2" if config.pos == "learned" else "gpt_neox"
    names = _names(kind, config.n_layer)
    out = {}
    for ours, theirs in names.items():
        t = state.get(ours)
        if t is None:  # a bias tsfast was built without
            if not ours.endswith(".bias"):
                raise ConversionError(f"the checkpoint lacks {ours}")
            t = _zero_bias(state[ours.removesuffix("bias") + "weight"])
        elif ours == "wte.weight":
            t = t[:GPT2_VOCAB]
        out[_prefix(kind) + theirs] = _convert(kind, ours, t.detach(), config.n_head, to_hf=True)
    return out


def _is_output_layer(name: str) -> bool:
    return name in ("lm_head.weight", "embed_out.weight")


def from_hf_state(tensors: dict[str, torch.Tensor], config: GPTConfig, hf_kind: str,
                  source: str) -> dict[str, torch.Tensor]:
    """The tsfast state dict for `config` from a GPT-2 or GPT-NeoX state dict. The position
    table is cut to config.block_size; an untied output layer that differs from the
    embedding, or a missing or misshapen tensor, raises ConversionError."""
    prefix = _prefix(hf_kind)
    plain = {}
    for name, t in tensors.items():
        name = name.removeprefix(prefix)
        if not _is_mask_buffer(name):
            plain[name] = t
    names = _names(hf_kind, config.n_layer)
    state, biases = {}, []
    for ours, theirs in names.items():
        t = plain.pop(theirs, None)
        if t is None:
            _require_match(ours.endswith(".bias") and hf_kind == "gpt_neox", f"tensor {theirs} is missing", source)
            continue  # attention_bias false: zero, like tsfast without biases
        t = _convert(hf_kind, ours, t, config.n_head, to_hf=False)
        if ours.endswith(".bias"):
            biases.append(t)
        state[ours] = t
    head = [plain.pop(n) for n in list(plain) if _is_output_layer(n)]
    _require(all(h.shape == state["wte.weight"].shape and torch.equal(h, state["wte.weight"]) for h in head),
             "an output layer different from the input embedding (tsfast ties them)", source)
    _require_match(not plain, f"tensors it does not describe: {', '.join(sorted(plain)[:3])}", source)
    if config.bias:
        for name in [n for n in state if n.endswith(".weight") and n != "wte.weight" and n != "wpe.weight"]:
            state.setdefault(name.removesuffix("weight") + "bias", _zero_bias(state[name]))
    else:
        _require(all(not b.any() for b in biases), "non-zero biases in a model read without them", source)
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    if "wpe.weight" in state:
        _require(state["wpe.weight"].shape[0] >= config.block_size,
                 f"{state['wpe.weight'].shape[0]} positions, fewer than the context of {config.block_size}", source)
        state["wpe.weight"] = state["wpe.weight"][: config.block_size]
    wte = state["wte.weight"]
    _require_match(wte.shape == (GPT2_VOCAB, config.n_embd),
                   f"an embedding of shape {tuple(wte.shape)}, not ({GPT2_VOCAB}, {config.n_embd})", source)
    pad = config.padded_vocab_size - GPT2_VOCAB
    state["wte.weight"] = torch.cat([wte, wte.mean(0, keepdim=True).expand(pad, -1)])
    return {k: v.contiguous() for k, v in state.items()}


def _zero_bias(weight: torch.Tensor) -> torch.Tensor:
    """The zero bias that goes with a Linear (out, in) or LayerNorm (C,) weight."""
    return torch.zeros(weight.shape[0], dtype=weight.dtype)


def _is_mask_buffer(name: str) -> bool:
    """Causal-mask buffers that old GPT-2 and GPT-NeoX files carry (not parameters)."""
    return name.endswith((".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias"))


def has_nonzero_biases(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether any bias in a Hugging Face state dict is non-zero (else tsfast reads the
    model without biases: the same function, fewer parameters)."""
    return any(t.any() for n, t in tensors.items() if n.endswith(".bias") and not _is_mask_buffer(n))
