from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 7.1 (the bytes of each cache strategy). The reference is the cache
# that looplm.generate builds: LoopKVCache(...).nbytes(), counted from its tensors. Exact match.

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.generate import LoopKVCache  # noqa: E402
from looplm.model import LoopLM, LoopLMConfig  # noqa: E402

CONFIGS = [dict(), dict(n_prelude=1, n_core=2, n_coda=1), dict(n_prelude=2, n_loops=6, n_heads=2)]


def built(config, strategy, batch, prompt_len, n_new, n_steps):
    model = LoopLM(config)
    mask = torch.ones(batch, prompt_len, dtype=torch.bool)
    return LoopKVCache(model, strategy, mask, n_new, n_steps).nbytes()


@pytest.mark.parametrize("options", CONFIGS)
def test_every_strategy_matches_the_cache(options):
    config = LoopLMConfig(vocab_size=11, d_model=16, n_heads=options.pop("n_heads", 4), **options)
    for strategy in ("exact", "last", "first", "average", "mod-1", "mod-2", "mod-3", "mod-9"):
        for batch, prompt_len, n_new in ((1, 5, 7), (3, 2, 0), (2, 9, 30)):
            expected = built(config, strategy, batch, prompt_len, n_new, config.n_loops)
            assert ex.cache_bytes(config, strategy, batch, prompt_len, n_new) == expected, (strategy, batch)


def test_n_steps_and_value_size():
    config = LoopLMConfig(vocab_size=11, d_model=16, n_heads=4, n_coda=1)
    assert ex.cache_bytes(config, "exact", 2, 4, 6, n_steps=7) == built(config, "exact", 2, 4, 6, 7)
    assert ex.cache_bytes(config, "mod-2", 2, 4, 6, n_steps=7, bytes_per_value=2) * 2 == \
        built(config, "mod-2", 2, 4, 6, 7)


def test_unknown_strategies_are_refused():
    config = LoopLMConfig(vocab_size=11, d_model=16, n_heads=4)
    for bad in ("middle", "mod-0", "mod-x", "Exact"):
        with pytest.raises(ValueError):
            ex.cache_bytes(config, bad, 1, 4, 4)
