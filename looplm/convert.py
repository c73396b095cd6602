# Generated from book/08_real_models.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['pairs_to_halves', 'ConversionError', 'ouro_config', 'ouro_exit_rule', 'huginn_config', 'ouro_state_dict', 'huginn_state_dict', 'from_ouro', 'from_huginn', 'CONVERTERS', 'load_pretrained', 'write_pretrained']
# fmt: on

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from looplm.block import RotaryEmbedding, rope_angles
from looplm.exits import FixedDepth, QExit
from looplm.model import LoopLM, LoopLMConfig

# --- book/08_real_models.py:396 (cell 22) ---
def pairs_to_halves(rows, n_heads, head_dim):
    """Reorder the rows [n_heads * head_dim, ...] of a q or k projection (or a flattened bias)
    whose heads rotate pairs (2i, 2i+1), for rope that rotates pairs (i, i + hs/2): new row j of
    each head is old row perm[j], perm = (0, 2, ..., hs - 2, 1, 3, ..., hs - 1)."""
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return rows.reshape(n_heads, head_dim, *rows.shape[1:])[:, perm].reshape(rows.shape)

# --- book/08_real_models.py:790 (cell 34) ---
class ConversionError(ValueError):
    """A checkpoint or config looplm cannot load exactly; the message names the key or field."""


_KINDS = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          bool: lambda v: isinstance(v, bool)}


def _field(config, name, kind, default=None, required=False):
    """config[name], checked to be of `kind`; `default` when absent or null (unless required)."""
    if config.get(name) is None:
        if required:
            raise ConversionError(f"config.json has no field {name!r}, which this architecture needs")
        return default
    if not _KINDS[kind](config[name]):
        raise ConversionError(f"config field {name!r} must be a{'n' if kind is int else ''} {kind.__name__}, "
                              f"got {config[name]!r}")
    return config[name]


def _refuse(name, value, why):
    raise ConversionError(f"config field {name!r} = {value!r} cannot be expressed in looplm: {why}. Refusing to "
                          f"build a model that computes something else")


def _expect(config, name, supported, default):
    """The field's value when it is the one looplm supports, else a ConversionError naming it."""
    value = config.get(name, default)
    if value != supported or type(value) is not type(supported):
        _refuse(name, value, f"the published model uses {supported!r}, and so does the converter")
    return value


def _with_overrides(fields, overrides):
    """LoopLMConfig(**fields), with `overrides` (LoopLMConfig field names) on top."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LoopLMConfig)})
    if unknown:
        raise TypeError(f"unknown override(s) {', '.join(unknown)}: overrides are LoopLMConfig fields, "
                        f"e.g. n_loops=8 or max_seq_len=4096")
    return LoopLMConfig(**{**fields, **overrides})

# --- book/08_real_models.py:839 (cell 36) ---
def ouro_config(config, **overrides):
    """The LoopLMConfig of an Ouro config.json (a dict); overrides are LoopLMConfig fields."""
    d = _field(config, "hidden_size", int, required=True)
    n_heads = _field(config, "num_attention_heads", int, required=True)
    n_kv = _field(config, "num_key_value_heads", int, n_heads)
    n_layers = _field(config, "num_hidden_layers", int, required=True)
    head_dim = _field(config, "head_dim", int, d // n_heads)
    if head_dim * n_heads != d:
        _refuse("head_dim", head_dim, f"heads must be hidden_size / num_attention_heads = {d // n_heads} wide")
    _expect(config, "hidden_act", "silu", "silu")
    if config.get("rope_scaling") is not None:
        _refuse("rope_scaling", config["rope_scaling"], "rotary scaling is not implemented")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse("partial_rotary_factor", config["partial_rotary_factor"], "rotary on part of each head is not implemented")
    types = config.get("layer_types") or [
        "sliding_attention" if config.get("use_sliding_window") and i >= config.get("max_window_layers", 28)
        else "full_attention" for i in range(n_layers)]
    if any(t != "full_attention" for t in types):
        first = next(i for i, t in enumerate(types) if t != "full_attention")
        _refuse("layer_types", types[first], f"layer {first} would use sliding-window attention, which is not implemented")
    fields = dict(vocab_size=_field(config, "vocab_size", int, required=True), d_model=d, n_heads=n_heads,
                  n_kv_heads=None if n_kv == n_heads else n_kv, n_core=n_layers,
                  n_loops=_field(config, "total_ut_steps", int, 4), exit_gate=True,
                  d_hidden=_field(config, "intermediate_size", int, required=True),
                  max_seq_len=_field(config, "max_position_embeddings", int, 32768), norm_style="sandwich",
                  tie_embeddings=_field(config, "tie_word_embeddings", bool, False),
                  rope_base=float(_field(config, "rope_theta", float, 10000.0)),
                  eps=float(_field(config, "rms_norm_eps", float, 1e-6)), feedback_norm=True)
    return _with_overrides(fields, overrides)


def ouro_exit_rule(config):
    """The exit rule Ouro's code applies by default (labels=None), from its config.json:
    early_exit_step k (0-based) is FixedDepth(k + 1), since looplm counts steps from 1; else
    early_exit_threshold q is QExit(q) (q = 1.0 in the released configs); else None."""
    steps = _field(config, "total_ut_steps", int, 4)
    k = _field(config, "early_exit_step", int)
    if k is not None and 0 <= k < steps:
        return FixedDepth(k + 1)
    q = _field(config, "early_exit_threshold", float)
    return None if q is None else QExit(q)

# --- book/08_real_models.py:890 (cell 38) ---
def huginn_config(config, **overrides):
    """The LoopLMConfig of a Huginn (RavenConfig) config.json; overrides are LoopLMConfig fields."""
    d = _field(config, "n_embd", int) or _field(config, "hidden_size", int, required=True)
    heads = {name: _field(config, name, int) for name in ("n_heads", "num_attention_heads")}
    if None not in heads.values() and heads["n_heads"] != heads["num_attention_heads"]:
        _refuse("num_attention_heads", heads["num_attention_heads"], f"it disagrees with n_heads={heads['n_heads']}, "
                                                                      f"its alias")
    n_heads = heads["n_heads"] or heads["num_attention_heads"]
    if n_heads is None:
        raise ConversionError("config.json has no field 'n_heads' (or 'num_attention_heads')")
    if _field(config, "num_key_value_heads", int, n_heads) != n_heads:
        _refuse("num_key_value_heads", config["num_key_value_heads"], "Huginn's code supports only as many as n_heads")
    if _field(config, "head_dim", int, d // n_heads) * n_heads != d:
        _refuse("head_dim", config["head_dim"], f"heads must be n_embd / n_heads = {d // n_heads} wide")
    for name, supported in (("block_class_name", "SandwichBlock"), ("norm_class_name", "RMSNorm_llama"),
                            ("mlp_class_name", "GatedMLP"), ("nonlin_name", "SiLU"), ("injection_type", "linear"),
                            ("state_init", "like-init"), ("bias", False)):
        _expect(config, name, supported, supported)
    if config.get("test_time_noise", 0) != 0:
        _refuse("test_time_noise", config["test_time_noise"], "noise added to the state at every step is not implemented")
    parts = [_field(config, name, int, required=True)
             for name in ("n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda")]
    if _field(config, "n_layers", int, sum(parts)) != sum(parts):
        _refuse("n_layers", config["n_layers"], f"it must be prelude + core + coda = {sum(parts)}")
    init = config.get("init_values") or {}
    scale = math.sqrt(d)
    if not math.isclose(init.get("embed_scale", scale), scale, rel_tol=1e-5):
        _refuse("init_values.embed_scale", init["embed_scale"], f"Huginn's code scales by sqrt(n_embd) = {scale:.6g} "
                                                                 f"whatever the config says, and the two disagree")
    vocab = _field(config, "padded_vocab_size", int) or _field(config, "vocab_size", int, required=True)
    fields = dict(vocab_size=vocab, d_model=d, n_heads=n_heads, n_prelude=parts[0], n_core=parts[1],
                  n_coda=parts[2], n_loops=_field(config, "mean_recurrence", int, 32), injection="concat",
                  init_state="random", d_hidden=_field(config, "intermediate_size", int, required=True),
                  max_seq_len=_field(config, "block_size", int, 4096), norm_style="huginn",
                  tie_embeddings=_field(config, "tie_embeddings", bool, True),
                  rope_base=float(_field(config, "rope_base", float, 50000.0)),
                  eps=float(_field(config, "norm_eps", float, 1e-6)), qk_bias=_field(config, "qk_bias", bool, True),
                  embed_scale=scale, norm_before_coda=True,
                  init_state_std=init.get("std", math.sqrt(2 / (5 * d))) * scale)
    return _with_overrides(fields, overrides)

# --- book/08_real_models.py:941 (cell 40) ---
def _checked(state_dict, expected, optional=()):
    """Raise ConversionError naming a missing, unexpected or wrongly shaped tensor."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    for key, shape in expected.items():
        if key not in state_dict:
            if key in optional:
                continue
            raise ConversionError(f"the checkpoint has no tensor {key!r}, which this config needs")
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
            got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ConversionError(f"tensor {key!r} has shape {got}; this config needs {list(shape)}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ConversionError(f"the checkpoint holds a tensor this config does not explain: {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


def _ouro_keys(c):
    d, hd, kv, inner = c.d_model, c.head_dim, c.kv_heads * c.head_dim, c.d_hidden
    keys = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,),
            "model.early_exit_gate.weight": (1, d), "model.early_exit_gate.bias": (1,),
            "lm_head.weight": (c.vocab_size, d), "model.rotary_emb.inv_freq": (hd // 2,)}
    for l in range(c.n_core):
        p = f"model.layers.{l}."
        keys.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                     p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                     p + "mlp.gate_proj.weight": (inner, d), p + "mlp.up_proj.weight": (inner, d),
                     p + "mlp.down_proj.weight": (d, inner)})
        keys.update({p + f"{n}.weight": (d,) for n in _OURO_NORMS})
    return keys


_OURO_NORMS = ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2")


def ouro_state_dict(state_dict, config):
    """Ouro's tensors (published names) -> a LoopLM state dict for ouro_config(config)."""
    c = config if isinstance(config, LoopLMConfig) else ouro_config(config)
    optional = {"model.rotary_emb.inv_freq"} | ({"lm_head.weight"} if c.tie_embeddings else set())
    _checked(state_dict, _ouro_keys(c), optional)
    sd = state_dict
    if c.tie_embeddings and "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
        raise ConversionError("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', but the config "
                              "ties them (tie_word_embeddings): which one the model should use is ambiguous")
    if "model.rotary_emb.inv_freq" in sd:              # a non-persistent buffer, saved by some exporters
        expected = c.rope_base ** (-torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim)
        if not torch.allclose(sd["model.rotary_emb.inv_freq"].double(), expected, rtol=1e-3):
            raise ConversionError(f"tensor 'model.rotary_emb.inv_freq' does not match rope_theta={c.rope_base:g}")
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "exit_gate.proj.weight": sd["model.early_exit_gate.weight"],
           "exit_gate.proj.bias": sd["model.early_exit_gate.bias"],
           "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for l in range(c.n_core):
        p, q = f"model.layers.{l}.", f"core.{l}."
        out[q + "attn.qkv.weight"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[q + "attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out.update({q + f"mlp.{x}.weight": sd[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down")})
        out.update({q + f"norms.{i}.weight": sd[p + f"{n}.weight"] for i, n in enumerate(_OURO_NORMS)})
    return out


_HUGINN_GROUPS = (("prelude", "prelude", "n_prelude"), ("core_block", "core", "n_core"), ("coda", "coda", "n_coda"))


def _huginn_keys(c):
    d, inner = c.d_model, c.d_hidden
    keys = {"transformer.wte.weight": (c.vocab_size, d), "transformer.adapter.weight": (d, 2 * d),
            "transformer.ln_f.weight": (d,), "lm_head.weight": (c.vocab_size, d),
            "freqs_cis": (1, c.max_seq_len, 1, c.head_dim // 2, 2)}
    for group, _, count in _HUGINN_GROUPS:
        for i in range(getattr(c, count)):
            p = f"transformer.{group}.{i}."
            keys.update({p + f"norm_{k}.weight": (d,) for k in range(1, 5)})
            keys.update({p + "attn.Wqkv.weight": (3 * d, d), p + "attn.proj.weight": (d, d),
                         p + "mlp.fc.weight": (2 * inner, d), p + "mlp.proj.weight": (d, inner)})
            if c.qk_bias:
                keys[p + "attn.qk_bias"] = (2, 1, c.n_heads, c.head_dim)
    return keys


def huginn_state_dict(state_dict, config):
    """Huginn's tensors (published names) -> a LoopLM state dict for huginn_config(config)."""
    c = config if isinstance(config, LoopLMConfig) else huginn_config(config)
    optional = {"freqs_cis"} | ({"lm_head.weight"} if c.tie_embeddings else set())
    _checked(state_dict, _huginn_keys(c), optional)
    sd, H, hd = state_dict, c.n_heads, c.head_dim
    if c.tie_embeddings and "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):
        raise ConversionError("tensor 'lm_head.weight' differs from 'transformer.wte.weight', but the config ties "
                              "them (tie_embeddings): which one the model should use is ambiguous")
    if "freqs_cis" in sd:                              # a saved buffer: check it, then rebuild our own tables
        cos, sin = rope_angles(hd, c.max_seq_len, c.rope_base, torch.float64)
        stored = sd["freqs_cis"].double()[0, :, 0]
        if not (torch.allclose(stored[..., 0], cos, atol=1e-3) and torch.allclose(stored[..., 1], sin, atol=1e-3)):
            raise ConversionError(f"tensor 'freqs_cis' does not hold the rotary tables of rope_base={c.rope_base:g}")
    out = {"embed.weight": sd["transformer.wte.weight"], "norm.weight": sd["transformer.ln_f.weight"],
           "injection.adapter.weight": sd["transformer.adapter.weight"],
           "lm_head.weight": sd["lm_head.weight"] if not c.tie_embeddings else sd["transformer.wte.weight"]}
    for group, ours, count in _HUGINN_GROUPS:
        for i in range(getattr(c, count)):
            p, q = f"transformer.{group}.{i}.", f"{ours}.{i}."
            w_q, w_k, w_v = sd[p + "attn.Wqkv.weight"].split(c.d_model)
            out[q + "attn.qkv.weight"] = torch.cat([pairs_to_halves(w_q, H, hd), pairs_to_halves(w_k, H, hd), w_v])
            if c.qk_bias:
                bias = sd[p + "attn.qk_bias"][:, 0].reshape(2 * H * hd)          # q's heads, then k's
                out[q + "attn.qk_bias"] = pairs_to_halves(bias, 2 * H, hd).reshape(2, H, hd)
            out[q + "attn.proj.weight"] = sd[p + "attn.proj.weight"]
            out[q + "mlp.gate.weight"], out[q + "mlp.up.weight"] = sd[p + "mlp.fc.weight"].chunk(2)
            out[q + "mlp.down.weight"] = sd[p + "mlp.proj.weight"]
            out.update({q + f"norms.{k}.weight": sd[p + f"norm_{k + 1}.weight"] for k in range(4)})
    return out

# --- book/08_real_models.py:1062 (cell 42) ---
def _build(config, state, dtype):
    dtype = dtype or next(iter(state.values())).dtype
    with torch.device("meta"):
        model = LoopLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_base).to(dtype)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def from_ouro(state_dict, config, *, dtype=None, **overrides):
    """A LoopLM that computes what Ouro's code computes, per step. state_dict: the tensors under
    Ouro's key names; config: its config.json as a dict; dtype: cast the weights (default: keep
    theirs); overrides: LoopLMConfig fields. The exit rule Ouro applies by default is
    ouro_exit_rule(config); its exit_at_step k is looplm's FixedDepth(k + 1)."""
    c = ouro_config(config, **overrides)
    return _build(c, ouro_state_dict(state_dict, c), dtype)


def from_huginn(state_dict, config, *, dtype=None, **overrides):
    """A LoopLM that computes what Huginn's code computes, per step (given the same initial
    state, state0=); arguments as from_ouro. The loop count defaults to mean_recurrence."""
    c = huginn_config(config, **overrides)
    return _build(c, huginn_state_dict(state_dict, c), dtype)


CONVERTERS = {"ouro": from_ouro, "huginn_raven": from_huginn}
_ARCHITECTURES = {"OuroForCausalLM": "ouro", "RavenForCausalLM": "huginn_raven"}

# --- book/08_real_models.py:1099 (cell 44) ---
def _architecture(config):
    kind = config.get("model_type")
    if kind is None:
        kind = next((_ARCHITECTURES[a] for a in config.get("architectures") or () if a in _ARCHITECTURES), None)
    if kind not in CONVERTERS:
        raise ConversionError(f"config field 'model_type' = {kind!r}: looplm converts {', '.join(sorted(CONVERTERS))}")
    return kind


def load_pretrained(folder, *, dtype=None, **overrides):
    """The LoopLM of a checkpoint folder: config.json and *.safetensors, architecture from the config."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: point load_pretrained at a checkpoint folder")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors file (this reader does not read .bin files)")
    state = {}
    for path in files:
        part = load_file(path)
        twice = sorted(set(part) & set(state))
        if twice:
            raise ConversionError(f"tensor {twice[0]!r} is stored twice (again in {path.name})")
        state.update(part)
    return CONVERTERS[_architecture(config)](state, config, dtype=dtype, **overrides)


def write_pretrained(folder, state_dict, config, shards=1):
    """Write config.json and the tensors as `shards` safetensors files (the published layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    keys = sorted(state_dict)
    for i in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state_dict[k].contiguous() for k in keys[i::shards]}, folder / name)
    return folder
