from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 7.2 (the deepest-state fill rule). The reference is a Python loop
# over rows and steps; the fill is a copy, so the comparison is exact. The last test checks the
# rule against the cache that looplm.generate fills while decoding with early exits.

import pytest  # noqa: E402
import torch  # noqa: E402


def reference(entries, exit_steps):
    out = entries.clone()
    for b, e in enumerate(exit_steps.tolist()):
        for t in range(e, entries.shape[0]):
            out[t, b] = entries[e - 1, b]
    return out


def test_matches_the_loop():
    g = torch.Generator().manual_seed(0)
    for shape in ((4, 3), (5, 2, 6), (3, 4, 2, 5)):
        entries = torch.randn(*shape, generator=g)
        exits = torch.randint(1, shape[0] + 1, (shape[1],), generator=g)
        kept = entries.clone()
        got = ex.fill_deeper(entries, exits)
        assert torch.equal(got, reference(entries, exits))
        assert torch.equal(entries, kept)                             # the input is not modified


def test_full_depth_changes_nothing_and_step_one_copies_everything():
    entries = torch.randn(4, 3, 5)
    assert torch.equal(ex.fill_deeper(entries, torch.tensor([4, 4, 4])), entries)
    filled = ex.fill_deeper(entries, torch.tensor([1, 1, 1]))
    assert all(torch.equal(filled[t], entries[0]) for t in range(4))


def test_bad_exit_steps_are_refused():
    entries = torch.randn(4, 3, 2)
    for bad in (torch.tensor([0, 1, 2]), torch.tensor([1, 5, 2]), torch.tensor([1, 2])):
        with pytest.raises(ValueError):
            ex.fill_deeper(entries, bad)


def test_agrees_with_the_decoding_cache():
    from looplm.exits import ExitRule
    from looplm.generate import generate
    from looplm.model import LoopLM, LoopLMConfig

    class Parity(ExitRule):
        name, needs, stop_above = "parity", ("logits",), True

        def score(self, view):
            return (view.logits.argmax(-1) % 2 == 0).float()

    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, n_loops=4, max_seq_len=40,
                                n_prelude=1, n_core=2, n_coda=1, injection="add", norm_style="sandwich"))
    res = generate(model, [[1, 5, 7, 3, 9]], 9, exit_rule=Parity(0.5))
    layer = res.cache.layers[("core", 0)]
    exits = res.steps[0, 1:]                                          # the fed-back tokens' exits
    assert (exits < 4).any()
    for store in (layer.new_k, layer.new_v):
        entries = store[:, 0].permute(0, 2, 1, 3)                     # (S, N, nh, hs): one row per token
        assert torch.equal(ex.fill_deeper(entries, exits), entries)
