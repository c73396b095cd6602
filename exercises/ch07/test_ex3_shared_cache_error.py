from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 7.3 (how far each shared cache is from the exact one). The
# reference is the cache looplm.generate fills: for small float64 models, the first decoded
# token's slots under each strategy (read at cache_strategy(name).slot(t) for every step t)
# against its per-step entries in the exact cache. Tolerance: relative 1e-9.

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.generate import cache_strategy, generate  # noqa: E402
from looplm.model import LoopLM, LoopLMConfig  # noqa: E402

STRATEGIES = ("exact", "first", "last", "average", "mod-1", "mod-2", "mod-3", "mod-9")
LAYOUTS = [dict(), dict(n_prelude=1, n_core=2, n_coda=1, norm_style="sandwich"),
           dict(n_loops=6, norm_style="sandwich", init_std=0.1)]


def decoded_entries(options, strategies=STRATEGIES):
    """{(block, "k" or "v"): (exact entries [S, B, nh, hs], {strategy: what step t reads [S, ...]})}."""
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig(vocab_size=23, d_model=32, n_heads=4, max_seq_len=16, **options)).double()
    prompt = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(1))
    caches = {name: generate(model, prompt, 2, cache=name).cache for name in ("exact", *strategies)}
    S = model.config.n_loops
    found = {}
    for block in caches["exact"].layers:
        if block[0] == "prelude":
            continue
        for kind in ("k", "v"):
            exact = getattr(caches["exact"].layers[block], f"new_{kind}")[:, :, :, 0]   # (S, B, nh, hs)
            read = {}
            for name in strategies:
                slots = getattr(caches[name].layers[block], f"new_{kind}")[:, :, :, 0]   # (slots, B, nh, hs)
                read[name] = torch.stack([slots[cache_strategy(name).slot(t)] for t in range(1, S + 1)])
            found[(block, kind)] = exact, read
    return found


def relative_error(read, exact):
    return ((read - exact).pow(2).sum() / exact.pow(2).sum()).item()


@pytest.mark.parametrize("options", LAYOUTS)
def test_matches_the_slots_generate_fills(options):
    for (block, kind), (exact, read) in decoded_entries(options).items():
        for name in STRATEGIES:
            got = ex.shared_cache_error(exact, name)
            assert isinstance(got, float), type(got)
            expected = relative_error(read[name], exact)
            assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-15), (block, kind, name, got, expected)
        one_token = exact[:, 1]                                  # one row's entries alone, (S, nh, hs)
        assert math.isclose(ex.shared_cache_error(one_token, "first"),
                            relative_error(read["first"][:, 1], one_token), rel_tol=1e-9)


def test_the_first_step_is_the_farthest_in_untrained_models():
    for options in LAYOUTS[1:]:
        for (block, kind), (exact, _) in decoded_entries(options, ()).items():
            first, last, average = (ex.shared_cache_error(exact, name) for name in ("first", "last", "average"))
            assert average < last < first, (options, block, kind, first, last, average)


def test_identities():
    g = torch.Generator().manual_seed(0)
    for S in (1, 3, 4):
        entries = torch.randn(S, 2, 5, generator=g, dtype=torch.float64) + torch.linspace(0, 1, S)[:, None, None]
        error = lambda name: ex.shared_cache_error(entries, name)   # noqa: E731
        assert max(error("exact"), error(f"mod-{S}"), error("mod-9")) < 1e-15
        assert math.isclose(error("mod-1"), error("last"), rel_tol=1e-12, abs_tol=1e-15)
        # the mean is the best single entry: any other costs S |c - mean|^2 more
        mean = entries.mean(0)
        for name, chosen in (("first", entries[0]), ("last", entries[-1])):
            extra = S * (chosen - mean).pow(2).sum() / entries.pow(2).sum()
            assert math.isclose(error(name), error("average") + extra.item(), rel_tol=1e-9, abs_tol=1e-15)
        assert math.isclose(ex.shared_cache_error(entries * 7, "first"), error("first"), rel_tol=1e-9)
    assert ex.shared_cache_error(torch.ones(3, 4), "average") == 0      # float32 works too


def test_bad_input_is_refused():
    entries = torch.randn(4, 3)
    for name in ("middle", "mod-0", "mod-x", "Exact"):
        with pytest.raises(ValueError):
            ex.shared_cache_error(entries, name)
    for bad in (torch.zeros(4, 3), torch.full((4, 3), float("nan")), torch.ones(4, 3, dtype=torch.long)):
        with pytest.raises(ValueError):
            ex.shared_cache_error(bad, "last")
