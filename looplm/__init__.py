"""looplm: looped (weight-tied, recurrent-depth) language models, built in a runnable textbook.

This file is the package's index, the one module written by hand: every other module is
generated from a chapter of the book (its first line names the chapter). It re-exports the
public names of the book's API; the submodules hold the rest:

    looplm.data     tasks, splits, scoring, the offline tokenizer        (chapter 0)
    looplm.block    RMSNorm, rotary embeddings, attention, SwiGLU, Block (chapter 1)
    looplm.model    GPT, LoopLM and their configs                        (chapter 2)
    looplm.grade    the exercise grader                                  (appendix A)
"""

__version__ = "0.1.0"

from looplm.model import GPT, GPTConfig, LoopLM, LoopLMConfig, LoopOutput  # noqa: E402

__all__ = ["GPT", "GPTConfig", "LoopLM", "LoopLMConfig", "LoopOutput", "__version__"]
