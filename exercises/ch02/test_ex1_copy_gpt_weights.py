from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 2.1 (copy a GPT into a looped model). The reference is the GPT
# itself: after the copy, the looped model's one-step logits must equal the GPT's to 1e-6.

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.model import GPT, GPTConfig, LoopLM, LoopLMConfig  # noqa: E402


def make_pair(seed, n_layers=2, norm_style="pre", tie_embeddings=True, **loop_changes):
    """A random GPT and a fresh LoopLM (different random weights) meant to receive its weights."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(vocab_size=40, d_model=32, n_heads=4, n_layers=n_layers,
                        norm_style=norm_style, tie_embeddings=tie_embeddings))
    fields = dict(vocab_size=40, d_model=32, n_heads=4, n_core=n_layers, n_loops=1,
                  norm_style=norm_style, tie_embeddings=tie_embeddings)
    model = LoopLM(LoopLMConfig(**{**fields, **loop_changes}))
    return gpt, model


def max_logit_difference(gpt, model, seed=0):
    torch.manual_seed(seed)
    idx = torch.randint(0, 40, (3, 10))
    with torch.no_grad():
        return (model(idx).logits[0] - gpt(idx)).abs().max().item()


def test_logits_match_tied_pre_norm():
    # max |logits difference| <= 1e-6 (float32), 2 and 3 layers
    for seed, n_layers in ((0, 2), (1, 3)):
        gpt, model = make_pair(seed, n_layers)
        assert max_logit_difference(gpt, model) > 1e-3  # fresh model: different weights
        assert ex.copy_gpt_weights(gpt, model) is model
        assert max_logit_difference(gpt, model) <= 1e-6


def test_logits_match_untied_sandwich_and_huginn():
    # max |logits difference| <= 1e-6 with an untied head and the four-norm blocks
    for seed, style in ((2, "sandwich"), (3, "huginn")):
        gpt, model = make_pair(seed, 2, norm_style=style, tie_embeddings=False)
        ex.copy_gpt_weights(gpt, model)
        assert max_logit_difference(gpt, model) <= 1e-6, style


def test_copies_values_and_shares_nothing():
    # every parameter equal to its GPT partner (exactly), no tensor storage shared, tying kept
    gpt, model = make_pair(4, 2)
    ex.copy_gpt_weights(gpt, model)
    gpt_state = gpt.state_dict()
    for name, tensor in model.state_dict().items():
        partner = gpt_state[name.replace("core.", "blocks.", 1)]
        assert torch.equal(tensor, partner), name
    assert not {p.data_ptr() for p in gpt.parameters()} & {p.data_ptr() for p in model.parameters()}
    assert model.lm_head.weight is model.embed.weight
    with torch.no_grad():
        gpt.embed.weight.add_(1.0)  # changing the GPT afterwards must not change the copy
    assert not torch.equal(model.embed.weight, gpt.embed.weight)


def test_mismatched_models_raise():
    # ValueError for a core of another depth, a coda, a tying mismatch, another width
    gpt, model = make_pair(5, 2, n_core=3)
    with pytest.raises(ValueError):
        ex.copy_gpt_weights(gpt, model)
    gpt, model = make_pair(5, 2, n_core=1, n_coda=1)
    with pytest.raises(ValueError):
        ex.copy_gpt_weights(gpt, model)
    gpt, model = make_pair(5, 2, tie_embeddings=True)
    untied = LoopLM(LoopLMConfig(vocab_size=40, d_model=32, n_heads=4, n_core=2, n_loops=1,
                                 tie_embeddings=False))
    with pytest.raises(ValueError):
        ex.copy_gpt_weights(gpt, untied)
    wide = LoopLM(LoopLMConfig(vocab_size=40, d_model=64, n_heads=4, n_core=2, n_loops=1))
    with pytest.raises(ValueError):
        ex.copy_gpt_weights(gpt, wide)
