"""Exercise 4.3: The memory of one more step

Section 4.3 measured what autograd saves for backward while a loop runs, and section 4.4 what
truncation and checkpointing leave of it, for one model at one size. Predict it for any size.

Write `extra_step_bytes(config, batch, seq_len, grad_steps=None, checkpoint=False,
readout="all", dtype=torch.float32)`: the bytes that one more loop step adds to what autograd
saves for backward while this runs,

    model = LoopLM(config).to(dtype)
    loop_forward(model, idx, targets, n_loops=S, grad_steps=grad_steps,
                 checkpoint=checkpoint, readout=readout).loss

with idx and targets LongTensors [batch, seq_len]. Measured with section 4.3's
`saved_tensor_bytes(fn, exclude=model.parameters())`, your number must equal

    saved(S + 1) - saved(S)        for every S >= 2 with S > grad_steps (when grad_steps is set)

exactly, for every config without an exit gate, every batch size and length, and the dtypes
float32, float64 and bfloat16. Compute it from the arguments alone: do not build or run a model.

- Return an int (bytes).
- Raise ValueError when neither knob is on (grad_steps None and checkpoint False): what a plain
  step saves depends on every operation inside the blocks, which is why section 4.3 measures
  it. Raise ValueError too for a config with an exit gate, a readout other than "all" or
  "last", and a grad_steps that is not an int >= 1.

What does one more step cost Ouro's shape (d_model 2048, vocabulary 49,152) in bfloat16,
checkpointed, for 8 sequences of 4096 tokens? The chapter does not say. Grade it with
`python -m looplm.grade ch04`.
"""

import torch


def extra_step_bytes(config, batch, seq_len, grad_steps=None, checkpoint=False, readout="all",
                     dtype=torch.float32):
    """Bytes one more loop step adds to what autograd saves for backward in model(idx, targets, ...)."""
    raise NotImplementedError("Exercise 4.3: write extra_step_bytes")
