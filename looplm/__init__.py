"""looplm: looped (weight-tied, recurrent-depth) language models, built in a runnable textbook.

This file is the package's index, the one module written by hand: every other module is
generated from a chapter of the book (its first line names the chapter). It re-exports the
public names of the book's API; the submodules hold the rest:

    looplm.data     tasks, splits, scoring, the offline tokenizer        (chapter 0)
    looplm.block    RMSNorm, rotary embeddings, attention, SwiGLU, Block (chapter 1)
    looplm.model    GPT, LoopLM, their configs, injections, the exit gate (chapters 2, 3, 5)
    looplm.diagnostics  hidden-state norms and step-to-step change        (chapter 3)
    looplm.train    the trainer, checkpoints, `python -m looplm.train`   (chapters 3-5)
    looplm.backprop per-step losses, truncation, checkpointing, depth     (chapter 4)
    looplm.bench    `python -m looplm.bench`                             (chapter 4)
    looplm.adaptive exit distribution, the two stages, exit rules        (chapter 5)
    looplm.generate KV-cached decoding, cache strategies, early exit     (chapter 6)
    looplm.grade    the exercise grader                                  (appendix A)
"""

__version__ = "0.1.0"

from looplm.model import GPT, GPTConfig, LoopLM, LoopLMConfig, LoopOutput  # noqa: E402
from looplm.adaptive import exit_distribution, q_exit_steps, stage1_loss, stage2_gate_loss  # noqa: E402

__all__ = ["GPT", "GPTConfig", "LoopLM", "LoopLMConfig", "LoopOutput", "exit_distribution", "q_exit_steps",
           "stage1_loss", "stage2_gate_loss", "generate", "GenerationResult", "save_model", "load_model",
           "__version__"]

# The decoding API is imported on first use, not here: looplm.generate imports looplm.train, and
# importing either with the package would make `python -m looplm.train` and
# `python -m looplm.generate` run a module that is already imported (runpy warns about that).
_LAZY = {"generate": "looplm.generate", "GenerationResult": "looplm.generate",
         "save_model": "looplm.generate", "load_model": "looplm.generate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'looplm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
