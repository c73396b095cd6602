"""Exercise 3.3: How fast the state grows

Chapter 3 trains a loop with additive injection and pre-norm blocks (section "Injection and
norm placement, on trained models"): it does not learn the task, and its state grows at every
step. Predict that growth for an untrained model.

The model: `LoopLM(LoopLMConfig(..., injection="add", norm_style="pre", init_state=...))` with
a core of one block and the default initialisation (init_std=0.02), so the loop computes
h_t = R(h_{t-1} + RMSNorm_g(x0)). Every coordinate of the injection's gain g is set to the
same number `gain`, and x0_rms is the mean over tokens of the per-token RMS of the input x0.

Write `predicted_state_rms(n_steps, init_state, gain=1.0, x0_rms=0.02)`: for t = 1 .. n_steps,
the state's RMS after step t, averaged over tokens: what
`hidden_norms(model(idx, return_hidden=True).hidden).mean(dim=(1, 2))` measures.

- n_steps is an int >= 1; init_state is "embedding", "zeros" or "random" (section 3.3);
  gain a number > 0; x0_rms a number >= 0 (bools are not numbers here).
- Return a list of n_steps Python floats. Raise ValueError for anything else.
- The prediction needs to hold within 3% at every step.

Does the state grow like t, like sqrt(t), or not at all, and where does the random start stop
mattering? The chapter does not print it. Grade it with `python -m looplm.grade ch03`, or run
`pytest exercises/ch03/test_ex3_state_growth.py`.
"""


def predicted_state_rms(n_steps: int, init_state: str, gain: float = 1.0, x0_rms: float = 0.02) -> list[float]:
    """RMS of h_t for t = 1..n_steps in an untrained pre-norm loop with additive injection."""
    raise NotImplementedError("Exercise 3.3: write predicted_state_rms")
