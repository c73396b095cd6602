# Generated from book/00_tasks_and_tokens.py, book/07_inference.py, book/08_real_models.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['run_tests', 'LAYOUTS', 'small_model', 'recompute_greedy', 'ouro_reference', 'huginn_reference', 'TINY_OURO', 'TINY_HUGINN', 'random_ouro_state_dict', 'huginn_freqs_cis', 'random_huginn_state_dict']
# fmt: on

import math

import torch
import torch.nn.functional as F

from looplm.model import LoopLM, LoopLMConfig

# --- book/00_tasks_and_tokens.py:104 (cell 5) ---
def run_tests(*tests):
    """Run test functions inside a notebook: one line per test, and the first failure raises."""
    if not tests:
        raise ValueError("run_tests needs at least one test function")
    for test in tests:
        if not callable(test):
            raise TypeError(f"run_tests takes test functions, got {test!r}")
        test()  # an AssertionError (or any error) propagates: the cell fails
        print(f"✓ {test.__name__}")
    print(f"{len(tests)} passed")

# --- book/07_inference.py:939 (cell 35) ---
# The model layouts decoding is tested on (chapter 7 and Appendix C): the default, one with a
# prelude, two core blocks, a coda, additive injection and sandwich norms, and one with a coda,
# concatenated injection, zero initial state, Huginn's norms and an exit gate.
LAYOUTS = [
    dict(),
    dict(n_prelude=1, n_core=2, n_coda=1, injection="add", norm_style="sandwich"),
    dict(n_coda=1, injection="concat", init_state="zeros", norm_style="huginn", exit_gate=True),
]


def small_model(seed=0, n_loops=3, **options):
    """A tiny seeded LoopLM (vocabulary 23, width 32, 4 heads, 40 positions) for decoding tests."""
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=n_loops, max_seq_len=40, **options))


def recompute_greedy(model, prompt, n_new, n_loops=None):
    """The slow reference decoder: the full forward at every position, last step, argmax.
    -> (new tokens [n_new], their logits [n_new, V])."""
    seq, logits = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n_new):
            last = model(seq, n_loops=n_loops).logits[-1, 0, -1]               # (V,)
            logits.append(last)
            seq = torch.cat([seq, last.argmax().view(1, 1)], dim=1)
    return seq[0, len(prompt):], torch.stack(logits)

# --- book/08_real_models.py:569 (cell 30) ---
def _rms(x, gain, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def _softmax_attention(q, k, v):
    """softmax(q kᵀ / sqrt(hs) + causal mask) v, q, k, v [B, H, T, hs]."""
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def ouro_reference(sd, cfg, ids, exit_threshold=None, exit_at_step=None):
    """OuroForCausalLM's forward (modeling_ouro.py), from Ouro's published key and field names.

    -> dict: hidden [S, B, T, d] (the normed state of each step, also the next step's input),
    step_logits [S, B, T, V], gates [S, B, T], pdf [S, B, T], expected_logits [B, T, V] and, for
    exit_threshold q, exit_steps [B, T] (0-based: the first step whose CDF reaches q, else the
    last) and logits [B, T, V] read out there; exit_at_step k (0-based) reads out step k.
    """
    dt = torch.promote_types(sd["model.embed_tokens.weight"].dtype, torch.float32)
    w = lambda name: sd[name].to(dt)                                           # noqa: E731
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV, hd = cfg.get("num_key_value_heads") or H, cfg.get("head_dim") or d // H
    S, eps, B, T = cfg.get("total_ut_steps", 4), cfg.get("rms_norm_eps", 1e-6), *ids.shape
    # rotate-half tables: emb = cat(freqs, freqs) [modeling_ouro.py 480-501]
    inv_freq = 1.0 / cfg.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=dt) / hd)
    emb = torch.outer(torch.arange(T, dtype=dt), inv_freq).repeat(1, 2)
    cos, sin = emb.cos(), emb.sin()
    rope = lambda x: x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin  # noqa: E731
    head = w("lm_head.weight") if "lm_head.weight" in sd else w("model.embed_tokens.weight")
    h, hidden, gate_logits = w("model.embed_tokens.weight")[ids], [], []   # no embedding scale
    for _ in range(S):                                                      # [modeling_ouro.py 604-620]
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}."
            a = _rms(h, w(p + "input_layernorm.weight"), eps)
            q = (a @ w(p + "self_attn.q_proj.weight").T).view(B, T, H, hd).transpose(1, 2)
            k = (a @ w(p + "self_attn.k_proj.weight").T).view(B, T, KV, hd).transpose(1, 2)
            v = (a @ w(p + "self_attn.v_proj.weight").T).view(B, T, KV, hd).transpose(1, 2)
            k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)   # repeat_kv
            y = _softmax_attention(rope(q), rope(k), v).transpose(1, 2).reshape(B, T, H * hd)
            h = h + _rms(y @ w(p + "self_attn.o_proj.weight").T, w(p + "input_layernorm_2.weight"), eps)
            m = _rms(h, w(p + "post_attention_layernorm.weight"), eps)         # sandwich [413-435]
            m = (F.silu(m @ w(p + "mlp.gate_proj.weight").T) * (m @ w(p + "mlp.up_proj.weight").T)) \
                @ w(p + "mlp.down_proj.weight").T
            h = h + _rms(m, w(p + "post_attention_layernorm_2.weight"), eps)
        h = _rms(h, w("model.norm.weight"), eps)                           # the norm inside the loop
        hidden.append(h)
        gate_logits.append((h @ w("model.early_exit_gate.weight").T)[..., 0] + w("model.early_exit_gate.bias"))
    hidden = torch.stack(hidden)
    gates, step_logits = torch.sigmoid(torch.stack(gate_logits)), hidden @ head.T
    pdf, remaining = [], torch.ones_like(gates[0])                          # [modeling_ouro.py 733-745]
    for t in range(S):
        pdf.append(gates[t] * remaining if t < S - 1 else remaining)
        remaining = remaining * (1 - gates[t])
    pdf = torch.stack(pdf)
    out = dict(hidden=hidden, step_logits=step_logits, gates=gates, pdf=pdf,
               expected_logits=(pdf[..., None] * step_logits).sum(0))
    if exit_at_step is not None:                                            # [modeling_ouro.py 787-791]
        out["logits"] = step_logits[exit_at_step]
    elif exit_threshold is not None:                                        # [modeling_ouro.py 792-812]
        reached = pdf.cumsum(0) >= exit_threshold
        steps = torch.where(reached.any(0), reached.float().argmax(0), S - 1)
        out["exit_steps"] = steps
        out["logits"] = step_logits.gather(0, steps[None, ..., None].expand(1, B, T, head.shape[0]))[0]
    return out


def huginn_reference(sd, cfg, ids, num_steps, state0):
    """RavenForCausalLM.forward(ids, input_states=state0, num_steps=(num_steps, 0)) in eval mode
    (raven_modeling_minimal.py), from Huginn's published names. -> logits [B, T, V]."""
    dt = torch.promote_types(sd["transformer.wte.weight"].dtype, torch.float32)
    w = lambda name: sd[name].to(dt)                                           # noqa: E731
    d, H = cfg["n_embd"], cfg.get("n_heads") or cfg["num_attention_heads"]
    hd, eps, B, T = d // H, cfg.get("norm_eps", 1e-6), *ids.shape
    # complex-pair tables: pair (2i, 2i+1) at angle m / base^(2i / hd) [raven_modeling_minimal.py 2076-2098]
    angles = torch.outer(torch.arange(T, dtype=dt),
                         1.0 / cfg.get("rope_base", 50000.0) ** (torch.arange(0, hd, 2, dtype=dt) / hd))
    c, s = angles.cos()[:, None], angles.sin()[:, None]                     # (T, 1, hd/2)

    def rope(x):                                                            # x (B, T, H, hd)
        re, im = x[..., 0::2], x[..., 1::2]
        return torch.stack([re * c - im * s, im * c + re * s], -1).flatten(-2)

    def block(x, p):                                                        # SandwichBlock [512-536]
        a = _rms(x, w(p + "norm_1.weight"), eps)
        q, k, v = (a @ w(p + "attn.Wqkv.weight").T).view(B, T, 3, H, hd).unbind(2)   # [q | k | v]
        if p + "attn.qk_bias" in sd:                                        # before rope [468-470]
            q, k = q + w(p + "attn.qk_bias")[0], k + w(p + "attn.qk_bias")[1]
        y = _softmax_attention(*(t.transpose(1, 2) for t in (rope(q), rope(k), v)))
        x = _rms(y.transpose(1, 2).reshape(B, T, d) @ w(p + "attn.proj.weight").T + x, w(p + "norm_2.weight"), eps)
        m = _rms(x, w(p + "norm_3.weight"), eps)
        gate, up = (m @ w(p + "mlp.fc.weight").T).chunk(2, -1)               # fc = [gate; up] [496-509]
        return _rms((F.silu(gate) * up) @ w(p + "mlp.proj.weight").T + x, w(p + "norm_4.weight"), eps)

    e = w("transformer.wte.weight")[ids] * math.sqrt(d)                     # emb_scale [50-52, 670]
    for i in range(cfg["n_layers_in_prelude"]):
        e = block(e, f"transformer.prelude.{i}.")
    x = state0.to(dt)
    for _ in range(num_steps):                                              # [764-781]
        x = torch.cat([x, e], -1) @ w("transformer.adapter.weight").T       # state first, then input
        for i in range(cfg["n_layers_in_recurrent_block"]):
            x = block(x, f"transformer.core_block.{i}.")
    x = _rms(x, w("transformer.ln_f.weight"), eps)                          # iterate_forward's ln_f [762]
    for i in range(cfg["n_layers_in_coda"]):
        x = block(x, f"transformer.coda.{i}.")
    x = _rms(x, w("transformer.ln_f.weight"), eps)                          # the same ln_f again [701]
    return x @ w("transformer.wte.weight").T                                # tied head, unscaled

# --- book/08_real_models.py:693 (cell 32) ---
TINY_OURO = dict(model_type="ouro", architectures=["OuroForCausalLM"], vocab_size=64, hidden_size=32,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=8, intermediate_size=48,
                 num_hidden_layers=2, total_ut_steps=3, rms_norm_eps=1e-6, rope_theta=1e6,
                 max_position_embeddings=64, tie_word_embeddings=False, hidden_act="silu",
                 early_exit_threshold=1.0)
TINY_HUGINN = dict(model_type="huginn_raven", architectures=["RavenForCausalLM"], n_embd=32, n_heads=4,
                   num_attention_heads=4, num_key_value_heads=4, intermediate_size=40, vocab_size=64,
                   padded_vocab_size=64, n_layers_in_prelude=1, n_layers_in_recurrent_block=2,
                   n_layers_in_coda=1, n_layers=4, mean_recurrence=3, block_size=64, rope_base=50000,
                   norm_eps=1e-6, qk_bias=True, bias=False, tie_embeddings=True, injection_type="linear",
                   state_init="like-init", block_class_name="SandwichBlock", norm_class_name="RMSNorm_llama",
                   mlp_class_name="GatedMLP", nonlin_name="SiLU",
                   init_values=dict(std=math.sqrt(2 / 160), out_proj=math.sqrt(2 / 160) / 4,
                                    embedding=math.sqrt(2 / 160), embed_scale=math.sqrt(32)))


def _draw(seed):
    g = torch.Generator().manual_seed(seed)
    normal = lambda shape, std: torch.randn(shape, generator=g, dtype=torch.float64) * std   # noqa: E731
    return normal, lambda n: 1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)


def random_ouro_state_dict(cfg, seed=0, dtype=torch.float64):
    """Every key of an Ouro checkpoint for `cfg`, with random values (the same for every dtype)."""
    normal, gain = _draw(seed)
    d, V, I, H = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    KV, hd = cfg.get("num_key_value_heads") or H, cfg.get("head_dim") or d // H
    sd = {"model.embed_tokens.weight": normal((V, d), 0.2)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        for name, shape in (("q_proj", (H * hd, d)), ("k_proj", (KV * hd, d)), ("v_proj", (KV * hd, d)),
                            ("o_proj", (d, H * hd))):
            sd[p + f"self_attn.{name}.weight"] = normal(shape, 0.02)
        for name, shape in (("gate_proj", (I, d)), ("up_proj", (I, d)), ("down_proj", (d, I))):
            sd[p + f"mlp.{name}.weight"] = normal(shape, 0.02)
        for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            sd[p + f"{name}.weight"] = gain(d)
    sd.update({"model.norm.weight": gain(d), "model.early_exit_gate.weight": normal((1, d), 0.2),
               "model.early_exit_gate.bias": normal((1,), 0.5)})
    if not cfg.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = normal((V, d), 0.02)
    return {k: v.to(dtype) for k, v in sd.items()}


def huginn_freqs_cis(cfg):
    """Huginn's saved rope buffer [1, block_size, 1, hd/2, 2] (cos, sin), built in float32 as its code does."""
    hd = cfg["n_embd"] // (cfg.get("n_heads") or cfg["num_attention_heads"])
    inv_freq = 1.0 / cfg.get("rope_base", 50000.0) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(cfg["block_size"], dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], -1)[None, :, None]


def random_huginn_state_dict(cfg, seed=0, dtype=torch.float64, lm_head=True, freqs_cis=True):
    """Every key of a Huginn checkpoint for `cfg`; the stored lm_head is a copy of the embedding."""
    normal, gain = _draw(seed)
    d, I = cfg["n_embd"], cfg["intermediate_size"]
    V, H = cfg.get("padded_vocab_size", cfg["vocab_size"]), cfg.get("n_heads") or cfg["num_attention_heads"]
    sd = {"transformer.wte.weight": normal((V, d), 0.2)}
    for group, field in (("prelude", "n_layers_in_prelude"), ("core_block", "n_layers_in_recurrent_block"),
                         ("coda", "n_layers_in_coda")):
        for i in range(cfg[field]):
            p = f"transformer.{group}.{i}."
            sd.update({p + f"norm_{k}.weight": gain(d) for k in range(1, 5)})
            sd[p + "attn.Wqkv.weight"] = normal((3 * d, d), 0.02)
            if cfg.get("qk_bias", True):
                sd[p + "attn.qk_bias"] = normal((2, 1, H, d // H), 0.2)
            sd.update({p + "attn.proj.weight": normal((d, d), 0.02), p + "mlp.fc.weight": normal((2 * I, d), 0.02),
                       p + "mlp.proj.weight": normal((d, I), 0.02)})
    sd.update({"transformer.adapter.weight": normal((d, 2 * d), 0.02), "transformer.ln_f.weight": gain(d)})
    sd = {k: v.to(dtype) for k, v in sd.items()}
    if lm_head:
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()   # safetensors refuses shared storage
    if freqs_cis:
        sd["freqs_cis"] = huginn_freqs_cis(cfg)
    return sd
