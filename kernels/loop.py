# Generated from book/10_triton_kernels.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['KernelRMSNorm', 'KernelSwiGLU', 'KernelAttention', 'KernelBlock', 'KernelLoopLM', 'use_kernels', 'kernel_plan']
# fmt: on

import inspect

import torch

from looplm.block import Block, CausalSelfAttention, RMSNorm, SwiGLU
from looplm.checks import require_choice
from looplm.kernels.attention import MAX_HEAD_DIM, flash_attention
from looplm.kernels.cross_entropy import multi_exit_linear_cross_entropy
from looplm.kernels.rmsnorm import add_rmsnorm
from looplm.kernels.rope import rope
from looplm.kernels.runtime import HAS_TRITON, INTERPRET, runs_in_triton
from looplm.kernels.swiglu import swiglu
from looplm.kernels.update import masked_update
from looplm.model import CONFIG_CHECKS, IGNORE_INDEX, KERNEL_BACKENDS, AddInjection, LoopLM

# --- book/10_triton_kernels.py:1144 (cell 51) ---
class KernelRMSNorm(RMSNorm):
    """RMSNorm computed by the fused kernel (without an injection)."""

    def forward(self, x):
        return add_rmsnorm(x, None, self.weight, self.eps)[1]


class KernelSwiGLU(SwiGLU):
    """SwiGLU whose silu(gate) * up is one kernel between the three matrix products."""

    def forward(self, x):
        return self.down(swiglu(self.gate(x), self.up(x)))


class KernelAttention(CausalSelfAttention):
    """Causal self-attention with the rope kernel, and flash attention over a whole sequence."""

    def project_qkv(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return rope(q, cos, sin), rope(k, cos, sin), v                # (B, nh, T, hs) each

    def forward(self, x, cos, sin, attend=None):
        q, k, v = self.project_qkv(x, cos, sin)
        return self.project_out(flash_attention(q, k, v) if attend is None else attend(q, k, v))


class KernelBlock(Block):
    """A pre-norm Block whose residual adds are fused with the norms after them.

    forward(x, cos, sin, attend, add=None, active=None, prev=None): the block's input is x + add
    (add: the loop's injection, or None), formed in the same pass as n1(x + add). With `active`
    [B, T] (bool) and `prev` (the state before the step), rows that are not active return `prev`,
    and the final residual add does the masked update."""

    def forward(self, x, cos, sin, attend=None, add=None, active=None, prev=None):
        n1, n2 = self.norms
        x, a = add_rmsnorm(x, add, n1.weight, n1.eps)               # x + add, and n1 of it
        x, m = add_rmsnorm(x, self.attn(a, cos, sin, attend), n2.weight, n2.eps)
        if active is None:
            return x + self.mlp(m)
        return masked_update(prev, x, self.mlp(m), active)

# --- book/10_triton_kernels.py:1212 (cell 53) ---
class KernelLoopLM(LoopLM):
    """LoopLM on kernels: the same parameters and outputs; see kernel_plan for what runs where."""

    def fuses_injection(self):
        """True when every step's injection is fused into the first core block's first norm."""
        c = self.config
        return (isinstance(self.injection, AddInjection) and isinstance(self.core[0], KernelBlock)
                and not c.feedback_norm)

    def step(self, h, x0, cos, sin, attend=None, active=None):
        """LoopLM.step; active [B, T] (bool, optional): rows that are not active keep h."""
        if not self.fuses_injection():
            new = super().step(h, x0, cos, sin, attend)
            return new if active is None else torch.where(active[..., None], new, h)
        x, inj, last = h, self._injection(x0), len(self.core) - 1
        for i, block in enumerate(self.core):
            masked = active is not None and i == last and isinstance(block, KernelBlock)
            x = block(x, cos, sin, None if attend is None else attend(i), add=inj if i == 0 else None,
                      active=active if masked else None, prev=h if masked else None)
        if active is not None and not isinstance(self.core[last], KernelBlock):
            x = torch.where(active[..., None], x, h)
        return x

    def _injection(self, x0):
        """RMSNorm_inj(x0), computed once per x0 (and grad mode): it is the same at every step.
        Not under activation checkpointing, whose recomputed steps must redo what they did."""
        if not getattr(self, "_cache_injection", True):
            return self.injection.norm(x0)
        if not isinstance(getattr(self, "_injected", None), dict):
            self._injected = {}
        key = torch.is_grad_enabled()                 # truncated steps run without a graph
        cached = self._injected.get(key)
        if cached is None or cached[0] is not x0:
            cached = self._injected[key] = (x0, self.injection.norm(x0))
        return cached[1]

    def forward(self, idx, targets=None, *args, return_logits=True, **kwargs):
        """LoopLM.forward; return_logits=False (with targets) computes the step losses without
        materialising logits: out.logits and out.weighted_logits are then None."""
        self._check_kernels_can_run()
        self._injected = {}
        self._cache_injection = not inspect.signature(LoopLM.forward).bind(self, idx, targets, *args, **kwargs) \
            .arguments.get("checkpoint", False)
        if return_logits:
            try:
                return super().forward(idx, targets, *args, **kwargs)
            finally:
                self._injected = {}
        if targets is None:
            raise ValueError("return_logits=False needs targets: without logits, the losses are what it returns")
        # the step function with the states readout is bound here, so that a step recomputed
        # for activation checkpointing (during backward) reads out states as well
        self._step_and_read = self._step_and_read_states
        self._losses_from_states = True
        try:
            return super().forward(idx, targets, *args, **kwargs)
        finally:
            del self._step_and_read
            self._losses_from_states, self._injected = False, {}

    def _check_kernels_can_run(self):
        weight = self.lm_head.weight
        if weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.float32) and not INTERPRET:
            raise RuntimeError("kernels='triton' runs Triton kernels, which need a GPU; on a CPU set "
                               "TRITON_INTERPRET=1 before importing looplm (Triton's interpreter: slow, "
                               "for tests), or use kernels='torch'")

    def _step_and_read_states(self, h, x0, cos, sin, read=True):
        """_step_and_read with the normed state z_t as the readout instead of logits."""
        h = self.step(h, x0, cos, sin)
        routed = self.take_routing(self.core)
        if not read:
            return h, None, None, routed
        c = self.config
        z = self.norm(h) if c.norm_before_coda else h
        for block in self.coda:
            z = block(z, cos, sin)
        z = z if c.feedback_norm else self.norm(z)
        routed = routed + self.take_routing(self.coda)
        return h, z, None if self.exit_gate is None else self.exit_gate(z), routed

    def _output(self, logits, gates, hidden, targets=None, routing=None):
        if not getattr(self, "_losses_from_states", False):
            return super()._output(logits, gates, hidden, targets, routing)
        states = torch.stack(logits)                                    # (S, B, T, D): z_1 .. z_S
        # everything but the logits: zero-width stand-ins keep LoopLM's bookkeeping in one place
        out = super()._output([z[..., :0] for z in logits], gates, hidden, None, routing)
        out.logits = out.weighted_logits = None
        S, B, T, D = states.shape
        states, targets_flat = states.view(S, B * T, D), targets.reshape(B * T)
        # steps that ran without gradients (grad_steps) must not send any to the head either
        first = next((t for t, z in enumerate(logits) if z.requires_grad), S)
        parts = []
        if first > 0:
            with torch.no_grad():
                parts.append(multi_exit_linear_cross_entropy(states[:first], self.lm_head.weight, targets_flat))
        if first < S:
            parts.append(multi_exit_linear_cross_entropy(states[first:], self.lm_head.weight, targets_flat))
        out.step_losses = torch.cat(parts).view(S, B, T)
        out.loss = out.step_losses[-1].sum() / (targets != IGNORE_INDEX).sum()
        return out

# --- book/10_triton_kernels.py:1320 (cell 55) ---
def use_kernels(model):
    """Re-class model's modules in place to their kernel subclasses (the same parameters and
    state_dict keys); what the kernels do not cover keeps its torch module. -> model"""
    if not isinstance(model, LoopLM):
        raise TypeError(f"model must be a LoopLM, got {type(model).__name__}")
    for module in model.modules():
        kind = type(module)
        if kind is RMSNorm:
            module.__class__ = KernelRMSNorm
        elif kind is SwiGLU:
            module.__class__ = KernelSwiGLU
        elif kind is CausalSelfAttention:             # not chapter 8's grouped-query attention
            module.__class__ = KernelAttention
        elif kind is Block and module.norm_style == "pre":
            module.__class__ = KernelBlock
    if type(model) is LoopLM:
        model.__class__ = KernelLoopLM
    return model


def kernel_plan(model):
    """[(operation, what computes it)] for a LoopLM: "kernel: …" or "torch: …" with the reason."""
    weight = model.lm_head.weight
    if not isinstance(model, KernelLoopLM):
        return [("everything", "torch: kernels='torch'")]
    if not runs_in_triton(weight):
        why = ("Triton is not installed" if not HAS_TRITON else "float64" if weight.dtype == torch.float64
               else "bfloat16 under the interpreter" if weight.dtype == torch.bfloat16 else str(weight.dtype))
        return [("everything", f"torch: {why}")]
    blocks = [*model.prelude, *model.core, *model.coda]
    c = model.config

    def share(kind, attribute=None):
        hits = sum(isinstance(getattr(b, attribute) if attribute else b, kind) for b in blocks)
        return f"{hits} of {len(blocks)} blocks"

    plain = [b for b in blocks if isinstance(b.attn, KernelAttention)]
    if model.fuses_injection():
        injection = "kernel: fused add + RMSNorm"
    elif c.injection != "add":
        injection = f"torch: injection={c.injection!r}"
    elif c.feedback_norm:
        injection = "torch: feedback_norm"
    else:
        injection = f"torch add: norm_style={c.norm_style!r}"
    return [
        ("injection + first norm of the step", injection),
        ("residual add + next norm", f"kernel: fused add + RMSNorm in {share(KernelBlock)}"
         if any(isinstance(b, KernelBlock) for b in blocks) else f"torch add: norm_style={c.norm_style!r}"),
        ("every other RMSNorm", "kernel: RMSNorm"),
        ("rotary embedding", f"kernel: in {share(KernelAttention, 'attn')}" if plain
         else "torch: grouped-query attention"),
        ("attention over a sequence", f"kernel: flash attention in {share(KernelAttention, 'attn')}"
         if plain and c.head_dim <= MAX_HEAD_DIM else "torch: scaled_dot_product_attention"),
        ("attention with a KV cache", "torch: the cache's attention"),
        ("MLP", f"kernel: SwiGLU in {share(KernelSwiGLU, 'mlp')}" if c.mlp == "dense"
         else f"torch: mlp={c.mlp!r}"),
        ("step losses", "kernel: multi-exit linear cross-entropy with return_logits=False; "
                        "torch from the logits otherwise"),
        ("masked state update (step(active=))", "kernel: fused into the last residual add"
         if model.fuses_injection() and isinstance(model.core[-1], KernelBlock) else "torch: where"),
    ]

# --- book/10_triton_kernels.py:1392 (cell 57) ---
def _validate_kernels(cfg):
    require_choice("kernels", cfg.kernels, ("torch", *KERNEL_BACKENDS))
    if cfg.kernels == "triton" and not HAS_TRITON:
        raise ValueError("kernels='triton' needs Triton, which is not installed here (Linux: pip install "
                         "triton; there are no wheels for macOS or Windows); use kernels='torch'")


KERNEL_BACKENDS["triton"] = use_kernels
CONFIG_CHECKS["kernels"] = _validate_kernels
