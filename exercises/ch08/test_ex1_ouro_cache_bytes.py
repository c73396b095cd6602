from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 8.1 (Ouro's cache bytes). The reference is the cache that
# looplm.generate builds for models converted from small Ouro checkpoints, and the arithmetic of
# the released 1.4B configuration.

import torch  # noqa: E402

from looplm.convert import from_ouro  # noqa: E402
from looplm.generate import generate  # noqa: E402
from looplm.testing import TINY_OURO, random_ouro_state_dict  # noqa: E402


def test_matches_the_cache_generate_builds():
    for config in (TINY_OURO, {**TINY_OURO, "num_key_value_heads": 2, "total_ut_steps": 2},
                   {**TINY_OURO, "num_hidden_layers": 3, "head_dim": None}):
        model = from_ouro(random_ouro_state_dict(config, dtype=torch.float32), config)
        res = generate(model, [[3, 1, 4, 1, 5]], 7)
        held = 5 + 7 - 1                                   # the prompt, and every new token but the last
        assert ex.ouro_cache_bytes(config, held, bytes_per_value=4) == res.cache_bytes, config


def test_released_sizes_and_defaults():
    ouro_14b = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=24,
                    total_ut_steps=4)
    assert ex.ouro_cache_bytes(ouro_14b, 1) == 768 * 1024
    assert ex.ouro_cache_bytes({**ouro_14b, "num_hidden_layers": 48}, 4096) == 6 * 2**30
    defaults = dict(hidden_size=2048, num_attention_heads=16, num_hidden_layers=24)   # 4 steps, 16 kv heads
    assert ex.ouro_cache_bytes(defaults, 10, bytes_per_value=4) == 2 * ex.ouro_cache_bytes(ouro_14b, 10)
    assert ex.ouro_cache_bytes({**ouro_14b, "num_key_value_heads": 4}, 1) == 192 * 1024
    assert ex.ouro_cache_bytes(ouro_14b, 0) == 0
