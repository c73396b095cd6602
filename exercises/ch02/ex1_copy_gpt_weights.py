"""Exercise 2.1: Copy a GPT into a looped model

Write `copy_gpt_weights(gpt, model)`: fill a freshly made `LoopLM` with the weights of a `GPT`,
so that the looped model's one-step logits equal the GPT's logits (section 2.8 of chapter 2).

- `model` has no prelude and no coda, and its core has as many blocks as the GPT has layers.
  Its embedding, final norm and LM head take the GPT's `embed`, `norm` and `lm_head`; core
  block i takes GPT block i (`gpt.blocks[i]` -> `model.core[i]`).
- Copy the values into `model`'s own parameters. Do not assign the GPT's tensors to `model`:
  afterwards the two models must share no tensor.
  A tied model must stay tied (`model.lm_head.weight is model.embed.weight`).
- Raise ValueError when the two cannot match: a prelude or a coda, a core of another depth,
  one model tied and the other not, or any parameter whose shape differs.
- Return `model`.

Do it by walking the modules, not with `load_state_dict` on renamed keys (that is what
`LoopLM.from_gpt` does). Grade it with `python -m looplm.grade ch02`, or run
`pytest exercises/ch02/test_ex1_copy_gpt_weights.py`.
"""

import torch

from looplm.model import GPT, LoopLM


def copy_gpt_weights(gpt: GPT, model: LoopLM) -> LoopLM:
    """Copy gpt's weights into model (n_core = gpt's n_layers, no prelude or coda); return model."""
    raise NotImplementedError("Exercise 2.1: write copy_gpt_weights")
