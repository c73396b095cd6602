"""Exercise 2.3: What a step costs (reference solution).

A block's linear layers are W_qkv [3d, d], W_o [d, d], W_gate and W_up [d_h, d] and W_down
[d, d_h]: 4 d^2 + 3 d d_h weights, the block's parameters without its norm gains, so a block
costs 2 (4 d^2 + 3 d d_h) FLOPs per token. The prelude runs once; the core runs every step; the
coda and the head belong to the readout, which also runs every step. A tied head still
multiplies: sharing its matrix with the embedding saves parameters, not compute.
"""

from looplm.block import default_d_hidden
from looplm.model import LoopLMConfig


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def linear_flops(config: LoopLMConfig, n_tokens: int, n_loops: int | None = None) -> dict[str, int]:
    """FLOPs of the nn.Linear calls in one forward pass, by part: prelude, core, coda, head."""
    if not isinstance(config, LoopLMConfig):
        raise ValueError(f"config must be a LoopLMConfig, got {type(config).__name__}")
    if config.injection != "none" or config.exit_gate:
        raise ValueError(f"only injection='none' without an exit gate is counted, got "
                         f"injection={config.injection!r}, exit_gate={config.exit_gate}")
    _positive_int("n_tokens", n_tokens)
    steps = config.n_loops if n_loops is None else _positive_int("n_loops", n_loops)
    d = config.d_model
    d_hidden = default_d_hidden(d) if config.d_hidden is None else config.d_hidden
    per_block = 2 * (4 * d * d + 3 * d * d_hidden) * n_tokens   # one block over all the tokens
    return {
        "prelude": config.n_prelude * per_block,
        "core": steps * config.n_core * per_block,
        "coda": steps * config.n_coda * per_block,
        "head": steps * 2 * d * config.vocab_size * n_tokens,
    }
