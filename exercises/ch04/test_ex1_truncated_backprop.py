from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 4.1 (truncated backpropagation). The references: the model's own
# forward pass for the values (max |difference| <= 1e-6), and for the gradients a loop written
# here that detaches the state after step S - k (rtol 1e-5, atol 1e-7).

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from looplm.model import LoopLM, LoopLMConfig  # noqa: E402


def make_model(seed=0):
    torch.manual_seed(seed)
    return LoopLM(LoopLMConfig(vocab_size=17, d_model=16, n_heads=2, n_prelude=1, n_coda=1,
                               n_loops=3, tie_embeddings=False, max_seq_len=8, init_std=0.1))


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (2, 7), generator=g), torch.randint(0, 17, (2, 7), generator=g)


def detached_reference(model, idx, n_loops, k):
    """Logits of every step; the state is detached after step n_loops - k (and early readouts too)."""
    cos, sin = model.rope(idx.shape[1])
    x = model.embed(idx)
    for block in model.prelude:
        x = block(x, cos, sin)
    h, logits = x, []
    for t in range(n_loops):
        if t == n_loops - k and t > 0:
            h = h.detach()
        for block in model.core:
            h = block(h, cos, sin)
        y = h
        for block in model.coda:
            y = block(y, cos, sin)
        step_logits = model.lm_head(model.norm(y))
        logits.append(step_logits if t >= n_loops - k else step_logits.detach())
    return torch.stack(logits)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def loss_of(logits, targets):
    S = logits.shape[0]
    return sum(F.cross_entropy(logits[t].flatten(0, 1), targets.flatten()) * (t + 1) for t in range(S))


def test_values_match_the_model():
    model = make_model()
    idx, _ = make_batch()
    for n_loops, k in [(1, 1), (3, 1), (5, 2), (4, 4)]:
        logits = ex.truncated_logits(model, idx, n_loops, k)
        assert logits.shape == (n_loops, 2, 7, 17)
        with torch.no_grad():
            expected = model(idx, n_loops=n_loops).logits
        assert (logits.detach() - expected).abs().max().item() <= 1e-6, (n_loops, k)


def test_gradients_match_a_detached_reference():
    model = make_model(1)
    idx, targets = make_batch(1)
    for n_loops, k in [(5, 2), (4, 1), (3, 3)]:
        mine = grads(model, loss_of(ex.truncated_logits(model, idx, n_loops, k), targets))
        reference = grads(model, loss_of(detached_reference(model, idx, n_loops, k), targets))
        for a, b in zip(mine, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_early_steps_carry_no_gradient_and_save_nothing():
    model = make_model(2)
    idx, _ = make_batch(2)
    early = ex.truncated_logits(model, idx, 6, 2)[:4].sum()   # readouts of the no-grad steps
    if early.requires_grad:
        assert all(g.abs().max() == 0 for g in grads(model, early))

    def saved_bytes(n_loops, k):
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ex.truncated_logits(model, idx, n_loops, k)
        return sum(sizes.values())

    assert saved_bytes(8, 2) <= saved_bytes(2, 2)              # 6 extra no-grad steps cost nothing
    assert saved_bytes(8, 2) < saved_bytes(8, 8) / 2


def test_rejects_bad_grad_steps():
    model = make_model()
    idx, _ = make_batch()
    for bad in (0, 4, -1, 1.5, True):
        with pytest.raises(ValueError):
            ex.truncated_logits(model, idx, 3, bad)
