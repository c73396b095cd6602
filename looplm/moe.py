# Generated from book/09_mixture_of_experts.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['RoutingRecord', 'route', 'expert_forward', 'experts_loop', 'experts_grouped', 'MoEFeedForward', 'keep_within_capacity', 'switch_aux_loss', 'entropy_balance_loss', 'router_z_loss', 'expert_load', 'LoopMoE', 'routing_by_step', 'routing_summary']
# fmt: on

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from looplm.block import SwiGLU
from looplm.checks import require_choice, require_int, require_number

# --- book/09_mixture_of_experts.py:112 (cell 6) ---
@dataclass
class RoutingRecord:
    """What one call of a MoE layer decided, for N tokens, E experts, k choices per token."""

    probs: torch.Tensor    # [N, E] the router's distribution (softmax; sigmoid scores normalised)
    logits: torch.Tensor   # [N, E] the router's scores before the softmax or sigmoid
    chosen: torch.Tensor   # [N, k] expert ids, best first
    gates: torch.Tensor    # [N, k] the weights of the chosen experts' outputs
    kept: torch.Tensor     # [N, k] bool: False where capacity dropped the assignment


def route(x, router_weight, bias, top_k, kind="softmax", capacity=None):
    """x [N, d] -> RoutingRecord. kind: "softmax" or "sigmoid"; bias [E] shifts the choice only;
    capacity: slots per expert (None: every assignment is kept)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    logits = x.to(wide) @ router_weight.to(wide).T                         # (N, E)
    if kind == "softmax":
        scores = probs = logits.softmax(-1)
    else:
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    with torch.no_grad():
        chosen = (scores + bias.to(wide)).topk(top_k, dim=-1).indices      # (N, k)
    gates = scores.gather(-1, chosen)
    if kind == "sigmoid" or top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    return RoutingRecord(probs, logits, chosen, gates, keep_within_capacity(chosen, bias.shape[0], capacity))

# --- book/09_mixture_of_experts.py:147 (cell 8) ---
def expert_forward(x, w_gate, w_up, w_down):
    """One SwiGLU expert on rows x [n, d]: (silu(x W_gate) * (x W_up)) W_down."""
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def experts_loop(x, record, w_gate, w_up, w_down):
    """sum_j g_j Expert_{e_j}(x) for x [N, d], one expert at a time. w_gate, w_up [E, d, d_e],
    w_down [E, d_e, d]. Dropped assignments add nothing."""
    y = torch.zeros_like(x)
    gates = record.gates.to(x.dtype)
    for e in range(w_gate.shape[0]):
        token, slot = torch.nonzero((record.chosen == e) & record.kept, as_tuple=True)
        if token.numel():
            out = expert_forward(x[token], w_gate[e], w_up[e], w_down[e])
            y = y.index_add(0, token, out * gates[token, slot, None])
    return y

# --- book/09_mixture_of_experts.py:176 (cell 10) ---
def experts_grouped(x, record, w_gate, w_up, w_down):
    """experts_loop's result with one batched matmul per projection over all experts."""
    N, d = x.shape
    E = w_gate.shape[0]
    expert = record.chosen.T.reshape(-1)                                   # rank-major (j, n)
    order = torch.argsort(expert, stable=True)                             # by expert, then rank, token
    order = order[record.kept.T.reshape(-1)[order]]                        # kept ones only
    expert, token = expert[order], order % N
    gates = record.gates.T.reshape(-1)[order].to(x.dtype)
    counts = torch.bincount(expert, minlength=E)
    if expert.numel() == 0:
        return torch.zeros_like(x)
    m = int(counts.max())
    place = torch.arange(expert.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
    row = expert * m + place                                               # in the padded (E * m, d)
    padded = x.new_zeros(E * m, d).index_copy(0, row, x[token]).view(E, m, d)
    hidden = F.silu(torch.bmm(padded, w_gate)) * torch.bmm(padded, w_up)   # (E, m, d_e)
    out = torch.bmm(hidden, w_down).view(E * m, d)[row]                    # (assignments, d)
    return torch.zeros_like(x).index_add(0, token, out * gates[:, None])

# --- book/09_mixture_of_experts.py:210 (cell 13) ---
class MoEFeedForward(nn.Module):
    """A mixture of SwiGLU experts, a drop-in for the block's MLP: x [..., d] -> [..., d].

    n_experts experts of hidden size d_expert, top_k per token, chosen by a "softmax" or
    "sigmoid" router; n_shared always-used experts; capacity_factor None (dropless) or > 0
    (each expert takes at most ceil(capacity_factor * N * top_k / n_experts) of a call's N tokens).
    impl: "grouped" (one batched matmul per projection) or "loop" (one expert at a time).
    """

    def __init__(self, d_model, n_experts, top_k, d_expert, router="softmax", n_shared=0,
                 capacity_factor=None, impl="grouped"):
        super().__init__()
        for name, value, low in (("d_model", d_model, 1), ("n_experts", n_experts, 1), ("top_k", top_k, 1),
                                 ("d_expert", d_expert, 1), ("n_shared", n_shared, 0)):
            require_int(name, value, low)
        if top_k > n_experts:
            raise ValueError(f"top_k={top_k} must be <= n_experts={n_experts}")
        require_choice("router", router, ("softmax", "sigmoid"))
        require_choice("impl", impl, ("grouped", "loop"))
        if capacity_factor is not None:
            require_number("capacity_factor", capacity_factor, 0, low_open=True)
        self.d_model, self.n_experts, self.top_k, self.d_expert = d_model, n_experts, top_k, d_expert
        self.router_kind, self.capacity_factor, self.impl = router, capacity_factor, impl
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate = nn.Parameter(torch.randn(n_experts, d_model, d_expert) * 0.02)
        self.w_up = nn.Parameter(torch.randn(n_experts, d_model, d_expert) * 0.02)
        self.w_down = nn.Parameter(torch.randn(n_experts, d_expert, d_model) * 0.02)
        self.shared = SwiGLU(d_model, n_shared * d_expert) if n_shared else None
        self.register_buffer("bias", torch.zeros(n_experts))               # choice only (section 9.4)
        self.last_routing = None

    def capacity(self, n_tokens):
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x):
        flat = x.reshape(-1, self.d_model)
        record = route(flat, self.router.weight, self.bias, self.top_k, self.router_kind,
                       self.capacity(flat.shape[0]))
        self.last_routing = record
        experts = experts_grouped if self.impl == "grouped" else experts_loop
        y = experts(flat, record, self.w_gate, self.w_up, self.w_down)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(x.shape)

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, d_expert={self.d_expert}, "
                f"router={self.router_kind!r}, capacity_factor={self.capacity_factor}, impl={self.impl!r}")

# --- book/09_mixture_of_experts.py:346 (cell 16) ---
def keep_within_capacity(chosen, n_experts, capacity):
    """kept [N, k] bool for expert ids chosen [N, k] when each expert has `capacity` slots (None:
    all kept). Slots go to first choices before second choices, then by token order."""
    if capacity is None:
        return torch.ones_like(chosen, dtype=torch.bool)
    N, k = chosen.shape
    expert = chosen.T.reshape(-1)                                          # rank-major (j, n)
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=n_experts)
    place = torch.empty_like(expert)
    place[order] = torch.arange(expert.numel(), device=chosen.device) - (counts.cumsum(0) - counts)[expert[order]]
    return (place < capacity).view(k, N).T

# --- book/09_mixture_of_experts.py:444 (cell 22) ---
def _pooled(records, per_step):
    return [records] if not per_step else [[record] for record in records]


def switch_aux_loss(records, n_experts, per_step=False):
    """E * sum_i f_i P_i over the tokens of `records` (one router's calls), pooled or averaged per step."""
    losses = []
    for group in _pooled(records, per_step):
        counts = sum(torch.bincount(r.chosen.reshape(-1), minlength=n_experts) for r in group)
        f = counts / counts.sum()
        P = torch.cat([r.probs for r in group]).mean(0)
        losses.append(n_experts * (f.to(P.dtype) * P).sum())
    return torch.stack(losses).mean()


def entropy_balance_loss(records, per_step=False):
    """-H(mean router distribution) over the tokens of `records`, pooled or averaged per step."""
    losses = []
    for group in _pooled(records, per_step):
        mean = torch.cat([r.probs for r in group]).mean(0)
        losses.append((mean * mean.clamp_min(1e-30).log()).sum())
    return torch.stack(losses).mean()


def router_z_loss(records):
    """ST-MoE's z-loss: the mean over tokens of logsumexp(router logits)²."""
    return torch.cat([r.logits.logsumexp(-1) for r in records]).pow(2).mean()


def expert_load(records, n_experts):
    """[E]: the share of the kept assignments of `records` that went to each expert (sums to 1)."""
    counts = sum(torch.bincount(r.chosen[r.kept], minlength=n_experts) for r in records).double()
    return counts / counts.sum().clamp_min(1)

# --- book/09_mixture_of_experts.py:543 (cell 26) ---
class LoopMoE(MoEFeedForward):
    """The MoE feed-forward of a LoopLMConfig with mlp="moe", with its balancing."""

    def __init__(self, config):
        n_experts, top_k, d_expert = config.moe_shape
        super().__init__(config.d_model, n_experts, top_k, d_expert, config.router, config.n_shared_experts,
                         config.capacity_factor)
        nn.init.normal_(self.router.weight, mean=0.0, std=config.init_std)
        self.balance, self.bias_rate = config.balance, config.bias_rate
        self.register_buffer("pending", torch.zeros(n_experts), persistent=False)   # counts since balance_step

    @staticmethod
    def statistics(config, routing, count=False):
        """routing: per step, [(layer, record)] -> (aux_loss, expert_load [S, E]). count: add each
        layer's assignment counts to its pending counts (a training forward)."""
        n_experts = config.moe_shape[0]
        load = torch.stack([expert_load([r for _, r in step], n_experts).float() for step in routing])
        by_layer = {}
        for step in routing:
            for layer, record in step:
                by_layer.setdefault(id(layer), (layer, []))[1].append(record)
        records = [r for _, rs in by_layer.values() for r in rs]
        aux = records[0].probs.new_zeros(())
        per_step = config.balance_pool == "step"
        for layer, rs in by_layer.values():
            if config.balance == "switch":
                aux = aux + switch_aux_loss(rs, n_experts, per_step) / len(by_layer)
            elif config.balance == "entropy":
                aux = aux + entropy_balance_loss(rs, per_step) / len(by_layer)
            if count:
                layer.pending += sum(torch.bincount(r.chosen.reshape(-1), minlength=n_experts) for r in rs)
        if config.z_loss:
            aux = aux + config.z_loss * router_z_loss(records)
        return aux, load

    @torch.no_grad()
    def balance_step(self):
        """After an optimizer step: b += bias_rate * sign(mean(c) - c) for balance="bias", with c the
        assignments counted since the last call, over every step and every forward; then reset c."""
        if self.balance == "bias" and self.pending.sum() > 0:
            self.bias += self.bias_rate * torch.sign(self.pending.mean() - self.pending)
        self.pending.zero_()

# --- book/09_mixture_of_experts.py:833 (cell 33) ---
def routing_by_step(model, idx, n_loops=None):
    """The core's routing while running idx [B, T] for n_loops steps: a list over steps of
    [(layer, record)], one per core block (no gradients)."""
    with torch.no_grad():
        cos, sin = model.rope(idx.shape[1])
        x0 = model.encode(idx, cos, sin)
        model.take_routing(model.prelude)
        h, steps = model.init_state(x0), []
        for _ in range(model.config.n_loops if n_loops is None else n_loops):
            h = model.step(h, x0, cos, sin)
            steps.append(model.take_routing(model.core))
    return steps


def routing_summary(model, idx, mask=None, n_loops=None):
    """Per step: load [S, E] (share of the kept assignments per expert, over the tokens in mask
    [B, T]) and keep [S - 1] (share of tokens whose first-choice expert at step t + 1 is the one
    at step t), averaged over the core's blocks."""
    steps = routing_by_step(model, idx, n_loops)
    n_experts = model.config.moe_shape[0]
    mask = torch.ones(idx.shape, dtype=torch.bool) if mask is None else mask
    flat = mask.reshape(-1)
    load = torch.stack([torch.stack([torch.bincount(r.chosen[flat][r.kept[flat]], minlength=n_experts).double()
                                     for _, r in step]).mean(0) for step in steps])
    keep = [torch.stack([(a.chosen[flat, 0] == b.chosen[flat, 0]).double().mean() for (_, a), (_, b) in zip(s, t)]).mean()
            for s, t in zip(steps, steps[1:])]
    return {"load": (load / load.sum(1, keepdim=True)).tolist(), "keep": [k.item() for k in keep]}
