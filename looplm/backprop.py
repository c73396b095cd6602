# Generated from book/04_backprop_through_the_loop.py, book/04a_appendix_engineering.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['STEP_WEIGHTS', 'step_weights', 'weighted_step_loss', 'saved_tensor_bytes', 'loop_forward', 'scale_core_grads', 'sample_depth', 'hidden_norm_penalty', 'step_consistency', 'LoopLoss', 'make_loop_loss']
# fmt: on

import math

import torch

from looplm.checks import require_bool, require_int, require_number
from looplm.data import IGNORE_INDEX
from looplm.model import LoopLM

# --- book/04_backprop_through_the_loop.py:161 (cell 14) ---
STEP_WEIGHTS = ("last", "uniform", "linear")


def step_weights(scheme, n_steps):
    """The weights of a named scheme for n_steps steps, normalised to sum to 1 -> float32 [S].

    "last": (0, ..., 0, 1); "uniform": all equal; "linear": proportional to t = 1..S.
    """
    require_int("n_steps", n_steps, 1)
    if scheme == "last":
        weights = torch.zeros(n_steps)
        weights[-1] = 1.0
    elif scheme == "uniform":
        weights = torch.ones(n_steps)
    elif scheme == "linear":
        weights = torch.arange(1, n_steps + 1, dtype=torch.float32)
    else:
        names = ", ".join(repr(s) for s in STEP_WEIGHTS)
        raise ValueError(f"step weights must be one of {names} or a list of {n_steps} "
                         f"non-negative numbers, got {scheme!r}")
    return weights / weights.sum()

# --- book/04_backprop_through_the_loop.py:190 (cell 16) ---
def _normalised_weights(weights, n_steps, device):
    """A scheme name or explicit weights -> normalised float32 weights [S] on `device`."""
    if isinstance(weights, str):
        return step_weights(weights, n_steps).to(device)
    try:
        w = torch.as_tensor(weights, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"step weights must be a scheme name or a list of numbers, "
                        f"got {type(weights).__name__}") from None
    if w.ndim != 1 or w.shape[0] != n_steps:
        raise ValueError(f"step weights must hold one weight per step: {n_steps} steps ran, "
                         f"got weights of shape {list(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"step weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() == 0:
        raise ValueError("step weights must not all be zero")
    return (w / w.sum()).to(device)


def weighted_step_loss(step_losses, targets, weights="last"):
    """sum_t w_t L_t, with L_t the mean of step_losses[t] over the learned tokens.

    step_losses [S, B, T] (per-token losses, as LoopOutput.step_losses), targets [B, T] (learned
    where != IGNORE_INDEX), weights a name in STEP_WEIGHTS or S non-negative numbers. The weights
    are normalised to sum to 1, so "last" gives the last step's mean loss. -> scalar tensor.
    """
    if not isinstance(step_losses, torch.Tensor) or step_losses.ndim != 3 or not step_losses.is_floating_point():
        raise ValueError(f"step_losses must be a floating-point tensor [S, B, T], got "
                         f"{list(getattr(step_losses, 'shape', []))}")
    if not isinstance(targets, torch.Tensor) or targets.shape != step_losses.shape[1:]:
        raise ValueError(f"targets must be a tensor [B, T] = {list(step_losses.shape[1:])}, got "
                         f"{list(getattr(targets, 'shape', []))}")
    learned = targets != IGNORE_INDEX                                   # (B, T)
    n_learned = learned.sum()
    if n_learned == 0:
        raise ValueError(f"targets has no position to learn: every entry is IGNORE_INDEX={IGNORE_INDEX}")
    per_step = (step_losses * learned).sum(dim=(1, 2)) / n_learned      # (S,)
    w = _normalised_weights(weights, step_losses.shape[0], step_losses.device)
    return (w * per_step).sum()

# --- book/04_backprop_through_the_loop.py:517 (cell 38) ---
def saved_tensor_bytes(fn, exclude=()):
    """Run fn(); return (bytes autograd saved for backward while it ran, fn's result).

    Counts each distinct storage once (many saved tensors are views of one storage). Storages
    of the tensors in `exclude` (e.g. model.parameters(), which exist anyway) are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return sum(sizes.values()), result

# --- book/04_backprop_through_the_loop.py:619 (cell 50) ---
def loop_forward(model, idx, targets=None, n_loops=None, grad_steps=None, checkpoint=False,
                 return_hidden=False, readout="all"):
    """model(idx, targets, n_loops=, grad_steps=, checkpoint=, return_hidden=, readout=): LoopLM.forward
    with its training options. -> LoopOutput."""
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    return model(idx, targets, n_loops=n_loops, grad_steps=grad_steps, checkpoint=checkpoint,
                 return_hidden=return_hidden, readout=readout)

# --- book/04_backprop_through_the_loop.py:1057 (cell 82) ---
def scale_core_grads(model, factor):
    """Multiply the .grad of every core parameter by `factor` (e.g. 1 / n_loops), in place."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number, got {factor!r}")
    for p in model.core.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)

# --- book/04_backprop_through_the_loop.py:1132 (cell 88) ---
def sample_depth(mean_steps, sigma=0.5, generator=None):
    """A step count r = Poisson(exp(tau)) + 1, tau ~ Normal(log(mean_steps) - sigma^2 / 2, sigma).

    Huginn's depth sampler (arXiv 2502.05171). E[exp(tau)] = mean_steps, so E[r] = mean_steps + 1.
    `generator` (a torch.Generator) makes the draws reproducible. -> int >= 1.
    """
    if (isinstance(mean_steps, bool) or not isinstance(mean_steps, (int, float))
            or not math.isfinite(mean_steps) or mean_steps <= 0):
        raise ValueError(f"mean_steps must be a finite number > 0, got {mean_steps!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    tau = math.log(mean_steps) - sigma**2 / 2 + sigma * torch.randn((), generator=generator, dtype=torch.float64)
    return int(torch.poisson(tau.exp(), generator=generator).item()) + 1

# --- book/04_backprop_through_the_loop.py:1245 (cell 98) ---
def hidden_norm_penalty(hidden):
    """Mean over steps t = 2..S and positions of (log rms(h_t) - log rms(h_{t-1}))^2.

    hidden [S, B, T, D] (LoopOutput.hidden) -> scalar; 0 when S == 1.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 4:
        raise ValueError(f"hidden must be a tensor [S, B, T, D], got {list(getattr(hidden, 'shape', []))}")
    log_rms = 0.5 * hidden.float().pow(2).mean(dim=-1).clamp_min(1e-20).log()   # (S, B, T)
    if hidden.shape[0] < 2:
        return log_rms.sum() * 0.0
    return (log_rms[1:] - log_rms[:-1]).pow(2).mean()


def step_consistency(logits, targets):
    """Mean over steps t < S of KL(sg(p_S) || p_t) at the learned positions (p_S detached).

    logits [S, B, T, V], targets [B, T] -> scalar; 0 when S == 1.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
        raise ValueError(f"logits must be a tensor [S, B, T, V], got {list(getattr(logits, 'shape', []))}")
    learned = targets != IGNORE_INDEX                                  # (B, T)
    log_p = logits.float().log_softmax(dim=-1)[:, learned]             # (S, M, V)
    if logits.shape[0] < 2:
        return log_p.sum() * 0.0
    teacher = log_p[-1].detach()                                       # (M, V)
    kl = (teacher.exp() * (teacher - log_p[:-1])).sum(dim=-1)          # (S-1, M)
    return kl.mean()

# --- book/04a_appendix_engineering.py:886 (cell 38) ---
_named_step_weights, _draw_depth = step_weights, sample_depth   # LoopLoss's arguments shadow these names


def _one_shot_scale(p, factor):
    handle = None

    def hook(grad):
        handle.remove()                     # fire on one backward pass only
        return grad * factor

    handle = p.register_hook(hook)
    return handle


class LoopLoss:
    """A loss_fn(model, idx, targets) -> (loss, metrics) for chapter 3's Trainer.

    loss = weighted_step_loss(step_losses, targets, step_weights)
           + norm_penalty * hidden_norm_penalty(hidden) + consistency * step_consistency(logits)
    run by model.forward at depth S = model.config.n_loops, or S ~ sample_depth(sample_depth,
    sigma) per call (own generator, seeded by `seed`; state_dict()/load_state_dict() save it).
    grad_steps=k: backprop through the last min(k, S) steps; checkpoint: per-step checkpointing;
    scale_core_grad: the core's gradient is scaled by 1 / (steps with gradient).
    """

    def __init__(self, step_weights="last", grad_steps=None, checkpoint=False, sample_depth=None,
                 sigma=0.5, norm_penalty=0.0, consistency=0.0, scale_core_grad=False, seed=0):
        if isinstance(step_weights, str):
            _named_step_weights(step_weights, 1)                           # raises on an unknown name
        elif sample_depth is not None:
            raise ValueError("explicit step weights need a fixed depth; with sample_depth use "
                             f"one of {', '.join(repr(s) for s in STEP_WEIGHTS)}")
        else:
            step_weights = _normalised_weights(step_weights, len(step_weights), "cpu")  # checks them
        if grad_steps is not None:
            require_int("grad_steps", grad_steps, 1)
        require_bool("checkpoint", checkpoint)
        require_bool("scale_core_grad", scale_core_grad)
        if sample_depth is not None:
            _draw_depth(sample_depth, sigma, torch.Generator())            # validates both
        require_number("norm_penalty", norm_penalty, 0)
        require_number("consistency", consistency, 0)
        require_int("seed", seed, 0)
        self.step_weights, self.grad_steps, self.checkpoint = step_weights, grad_steps, checkpoint
        self.sample_depth, self.sigma, self.seed = sample_depth, sigma, seed
        self.norm_penalty, self.consistency = float(norm_penalty), float(consistency)
        self.scale_core_grad = scale_core_grad
        self.generator = torch.Generator().manual_seed(seed)
        self._pending = []

    def depth(self, model):
        """The step count for the next batch."""
        if self.sample_depth is None:
            return model.config.n_loops
        return _draw_depth(self.sample_depth, self.sigma, self.generator)

    def __call__(self, model, idx, targets):
        n_loops = self.depth(model)
        grad_steps = None if self.grad_steps is None else min(self.grad_steps, n_loops)
        last_only = (isinstance(self.step_weights, str) and self.step_weights == "last"
                     and self.consistency == 0 and model.exit_gate is None)
        out = model(idx, targets, n_loops=n_loops, grad_steps=grad_steps, checkpoint=self.checkpoint,
                    return_hidden=self.norm_penalty > 0, readout="last" if last_only else "all")
        weights = "last" if last_only else self.step_weights
        loss = weighted_step_loss(out.step_losses, targets, weights)
        metrics = {"ce": loss.item(), "last_step_loss": out.loss.item(), "depth": n_loops}   # Trainer adds "loss"
        if self.norm_penalty > 0:
            penalty = hidden_norm_penalty(out.hidden)
            loss = loss + self.norm_penalty * penalty
            metrics["norm_penalty"] = penalty.item()
        if self.consistency > 0:
            agreement = step_consistency(out.logits, targets)
            loss = loss + self.consistency * agreement
            metrics["consistency"] = agreement.item()
        for handle in self._pending:        # hooks of a loss that was never backpropagated
            handle.remove()
        self._pending = []
        if self.scale_core_grad and loss.requires_grad:
            factor = 1.0 / (grad_steps or n_loops)
            self._pending = [_one_shot_scale(p, factor) for p in model.core.parameters() if p.requires_grad]
        return loss, metrics

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def __repr__(self):
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in (
            "step_weights", "grad_steps", "checkpoint", "sample_depth", "sigma", "norm_penalty",
            "consistency", "scale_core_grad", "seed"))
        return f"LoopLoss({fields})"


def make_loop_loss(step_weights="last", grad_steps=None, checkpoint=False, sample_depth=None,
                   norm_penalty=0.0, consistency=0.0, **options):
    """A LoopLoss with these options (see LoopLoss); use as Trainer(loss_fn=make_loop_loss(...))."""
    return LoopLoss(step_weights=step_weights, grad_steps=grad_steps, checkpoint=checkpoint,
                    sample_depth=sample_depth, norm_penalty=norm_penalty, consistency=consistency,
                    **options)
