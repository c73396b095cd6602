"""Exercise 4.3: The memory of one more step

Reference solution. See exercises/ch04/ex3_step_memory.py for the task.
"""

import torch


def extra_step_bytes(config, batch, seq_len, grad_steps=None, checkpoint=False, readout="all",
                     dtype=torch.float32):
    """Bytes one more loop step adds to what autograd saves for backward in model(idx, targets, ...)."""
    if config.exit_gate:
        raise ValueError("a config with an exit gate saves the gate's bookkeeping too; use exit_gate=False")
    if readout not in ("all", "last"):
        raise ValueError(f"readout must be 'all' or 'last', got {readout!r}")
    if grad_steps is not None and (isinstance(grad_steps, bool) or not isinstance(grad_steps, int)
                                   or grad_steps < 1):
        raise ValueError(f"grad_steps must be None or an int >= 1, got {grad_steps!r}")
    if grad_steps is None and not checkpoint:
        raise ValueError("with neither truncation nor checkpointing a step saves whatever its blocks "
                         "save: measure it (section 4.3)")
    tokens = batch * seq_len
    state = config.d_model * torch.empty((), dtype=dtype).element_size()
    # token_losses works in float32 at least: its log-probabilities are never narrower
    log_prob = config.vocab_size * torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    target = torch.empty((), dtype=torch.long).element_size()   # the per-step copy of the targets
    readout_bytes = log_prob + target if readout == "all" else 0
    if grad_steps is not None:
        # the extra step runs under no_grad: only its readout's loss keeps anything
        return tokens * readout_bytes
    # checkpointed: the step keeps its input state, and the loss its readout's log-probs and targets
    return tokens * (state + readout_bytes)
