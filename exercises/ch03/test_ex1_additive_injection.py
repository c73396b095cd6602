from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 3.1 (additive injection). The reference is the formula computed in
# float64 in this file; tolerances are stated in each test's comment.

import torch  # noqa: E402

from looplm.model import INJECTIONS, LoopLM, LoopLMConfig  # noqa: E402


def config(**changes):
    return LoopLMConfig(**{"vocab_size": 30, "d_model": 32, "n_heads": 4, **changes})


def reference(h, x0, gain, eps):
    """h + RMSNorm_g(x0) in float64."""
    x = x0.double()
    return h.double() + x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * gain.double()


def test_matches_the_formula():
    # random state, input and gain; rtol=1e-5, atol=1e-5 against float64
    torch.manual_seed(0)
    module = ex.AdditiveInjection(config())
    with torch.no_grad():
        module.weight.copy_(torch.randn(32))
    h, x0 = 2 * torch.randn(3, 5, 32), 0.02 * torch.randn(3, 5, 32)
    out = module(h, x0)
    assert out.shape == (3, 5, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(h, x0, module.weight, 1e-6), rtol=1e-5, atol=1e-5)


def test_gain_is_the_only_parameter_and_learns():
    # one parameter `weight` [d_model] of ones; gradients reach it, h and x0 (rtol=1e-4, atol=1e-6)
    torch.manual_seed(1)
    module = ex.AdditiveInjection(config())
    params = dict(module.named_parameters())
    assert list(params) == ["weight"] and params["weight"].shape == (32,)
    assert bool((params["weight"] == 1).all())
    h = torch.randn(2, 4, 32, requires_grad=True)
    x0 = torch.randn(2, 4, 32, requires_grad=True)
    upstream = torch.randn(2, 4, 32)
    (module(h, x0) * upstream).sum().backward()
    normed = x0.detach() / torch.sqrt(x0.detach().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(module.weight.grad, (upstream * normed).sum(dim=(0, 1)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h.grad, upstream)
    assert x0.grad is not None and torch.isfinite(x0.grad).all()


def test_uses_config_eps_and_keeps_the_dtype():
    # eps=0.01 with tiny inputs (eps dominates), float32: rtol=1e-5, atol=1e-6;
    # bfloat16 inputs give a bfloat16 result within rtol=atol=2e-2 of float64
    torch.manual_seed(2)
    module = ex.AdditiveInjection(config(eps=0.01))
    h, x0 = torch.randn(2, 3, 32), 1e-3 * torch.randn(2, 3, 32)
    torch.testing.assert_close(module(h, x0).double(), reference(h, x0, module.weight, 0.01),
                               rtol=1e-5, atol=1e-6)
    out = module(h.bfloat16(), x0.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = reference(h.bfloat16(), x0.bfloat16(), module.weight, 0.01)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_works_as_a_registry_entry():
    # registered in INJECTIONS, a LoopLM's logits equal a loop written out by hand (atol=1e-5)
    INJECTIONS["exercise_add"] = ex.AdditiveInjection
    try:
        torch.manual_seed(3)
        model = LoopLM(config(injection="exercise_add", n_loops=3))
        with torch.no_grad():
            model.injection.weight.copy_(torch.rand(32) + 0.5)
        idx = torch.randint(0, 30, (2, 7))
        with torch.no_grad():
            cos, sin = model.rope(7)
            x0 = model.embed(idx)
            h, expected = x0, []
            for _ in range(3):
                u = reference(h, x0, model.injection.weight, 1e-6).float()
                h = model.core[0](u, cos, sin)
                expected.append(model.lm_head(model.norm(h)))
            torch.testing.assert_close(model(idx).logits, torch.stack(expected), rtol=0, atol=1e-5)
    finally:
        INJECTIONS.pop("exercise_add", None)
