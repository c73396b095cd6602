# Generated from book/00_tasks_and_tokens.py, book/07_inference.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['run_tests', 'LAYOUTS', 'small_model', 'recompute_greedy']
# fmt: on

import torch

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

# --- book/07_inference.py:879 (cell 35) ---
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
