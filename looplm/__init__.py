"""looplm: looped (weight-tied, recurrent-depth) language models, built in a runnable textbook.

This file is the package's index, the one module written by hand: every other module is
generated from a chapter of the book (its first line names the chapter). It re-exports the
public names of the book's API; the submodules hold the rest:

    looplm.data     tasks, splits, scoring, the offline tokenizer        (chapter 0)
    looplm.block    RMSNorm, rotary embeddings, attention, SwiGLU, Block (chapter 1)
    looplm.model    GPT, LoopLM, their configs, injections, the exit gate (chapters 2, 3, 5)
    looplm.diagnostics  hidden-state norms and step-to-step change        (chapter 3)
    looplm.checks   argument checks every module uses                    (chapter 0)
    looplm.checkpoints  the checkpoint file: atomic writes, checked reads (appendix C)
    looplm.train    the trainer, `python -m looplm.train`                (chapters 3-5)
    looplm.backprop per-step losses, truncation, checkpointing, depth     (chapter 4)
    looplm.bench    `python -m looplm.bench`                             (chapter 4)
    looplm.adaptive exit distribution, the two stages' losses            (chapter 5)
    looplm.exits    exit rules for inference: Q-exit, confidence, KL, ...  (chapter 5)
    looplm.objectives  ACT, PonderNet and Gumbel objectives for the gate (chapter 6)
    looplm.refine   TRM-style recursive refinement with a halting head   (chapter 6)
    looplm.generate KV-cached decoding, cache strategies, early exit     (chapter 7)
                    (a package: `python -m looplm.generate` runs its __main__)
    looplm.experiments, looplm.results  multi-seed stored results        (chapters 3-7, appendix B)
    looplm.grade    the exercise grader                                  (appendix A)
    looplm.convert  loading Ouro and Huginn checkpoints                  (chapter 8)
    looplm.moe      the mixture-of-experts feed-forward                  (chapter 9)
    looplm.kernels  Triton kernels and the kernel model (Triton optional) (chapter 10)
    looplm.distributed  launching workers, data, sharded and expert parallelism, sharded checkpoints (chapter 11)
"""

__version__ = "0.1.0"

from looplm.model import GPT, GPTConfig, LoopLM, LoopLMConfig, LoopOutput  # noqa: E402
from looplm.adaptive import exit_distribution, q_exit_steps, stage1_loss, stage2_gate_loss  # noqa: E402
import looplm.objectives  # noqa: E402,F401  (registers ACT, PonderNet and Gumbel in adaptive.OBJECTIVES)
import looplm.kernels.loop  # noqa: E402,F401  (registers kernels="triton"; Triton itself is optional)
# the function generate, bound after the submodule of the same name is imported, so the package
# attribute stays the function however the submodule is imported later
from looplm.generate import GenerationResult, generate  # noqa: E402
from looplm.checkpoints import load_model, save_model  # noqa: E402

__all__ = ["GPT", "GPTConfig", "LoopLM", "LoopLMConfig", "LoopOutput", "exit_distribution", "q_exit_steps",
           "stage1_loss", "stage2_gate_loss", "generate", "GenerationResult", "save_model", "load_model",
           "__version__"]
