from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 2.2 (the looped forward pass). The reference for step t is a
# standard GPT "unrolled" from the looped model: its layers are the prelude's blocks, then t
# copies of the core's blocks, then the coda's blocks, all holding the looped model's weights.
# Tolerance: max |logits difference| <= 1e-5 in float32.

import torch  # noqa: E402

from looplm.model import GPT, GPTConfig, LoopLM, LoopLMConfig  # noqa: E402


def unrolled_gpt(model, t):
    """The GPT whose layers are prelude, t x core, coda of `model`, with its weights."""
    c = model.config
    layers = [*model.prelude, *(list(model.core) * t), *model.coda]
    gpt = GPT(GPTConfig(vocab_size=c.vocab_size, d_model=c.d_model, n_heads=c.n_heads,
                        n_layers=len(layers), d_hidden=c.d_hidden, norm_style=c.norm_style,
                        tie_embeddings=c.tie_embeddings))
    with torch.no_grad():
        gpt.embed.weight.copy_(model.embed.weight)
        gpt.norm.weight.copy_(model.norm.weight)
        gpt.lm_head.weight.copy_(model.lm_head.weight)
        for target, source in zip(gpt.blocks, layers):
            target.load_state_dict(source.state_dict())
    return gpt


def check_against_unrolled(model, n_loops, seed=0):
    torch.manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = ex.looped_logits(model, idx, n_loops)
        assert logits.shape == (n_loops, 2, 9, model.config.vocab_size)
        for t in range(1, n_loops + 1):
            expected = unrolled_gpt(model, t)(idx)
            assert (logits[t - 1] - expected).abs().max().item() <= 1e-5, f"step {t}"


def test_one_block_core():
    # a 1-block core looped 4 times: step t equals the t-layer unrolled GPT
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, n_loops=4))
    check_against_unrolled(model, 4)


def test_multi_block_core_sandwich_untied():
    # a 2-block core, sandwich norms, an untied head, 3 steps
    torch.manual_seed(1)
    model = LoopLM(LoopLMConfig(vocab_size=30, d_model=32, n_heads=2, n_core=2, n_loops=3,
                                norm_style="sandwich", tie_embeddings=False))
    check_against_unrolled(model, 3)


def test_prelude_and_coda():
    # prelude (once) and coda (once per readout, not fed back): shape (1, 2, 1), 4 steps
    torch.manual_seed(2)
    model = LoopLM(LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, n_prelude=1, n_core=2,
                                n_coda=1, n_loops=2, norm_style="huginn"))
    check_against_unrolled(model, 4)


def test_uses_the_n_loops_argument():
    # the argument, not model.config.n_loops, sets the number of steps; 1 step is the GPT
    torch.manual_seed(3)
    model = LoopLM(LoopLMConfig(vocab_size=30, d_model=32, n_heads=4, n_core=3, n_loops=5))
    check_against_unrolled(model, 1)
    check_against_unrolled(model, 2, seed=1)
