"""Exercise 7.3: How far is each shared cache from the exact one? (reference solution)"""

import re

import torch


def _read_entries(entries, strategy):
    """[S, ...]: the entry step t reads, for t = 1..S, once the token has run every step."""
    S = entries.shape[0]
    if strategy == "exact":
        return entries
    if strategy == "first":
        return entries[:1].expand_as(entries)
    if strategy == "last":
        return entries[-1:].expand_as(entries)
    if strategy == "average":
        return entries.mean(0, keepdim=True).expand_as(entries)
    match = re.fullmatch(r"mod-([0-9]+)", strategy) if isinstance(strategy, str) else None
    if match and int(match.group(1)) >= 1:
        K = int(match.group(1))
        # slot (t-1) mod K holds the entry of the last step that writes it
        last_writer = [max(u for u in range(S) if u % K == t % K) for t in range(S)]
        return entries[torch.tensor(last_writer)]
    raise ValueError(f"unknown cache strategy {strategy!r}")


def shared_cache_error(entries, strategy):
    """Σ_t |R_t - E_t|² / Σ_t |E_t|²: how far what each step reads is from the exact entry."""
    if not isinstance(entries, torch.Tensor) or not entries.is_floating_point() or entries.ndim < 1:
        raise ValueError("entries must be a floating-point tensor [S, ...]")
    if entries.shape[0] < 1 or not torch.isfinite(entries).all():
        raise ValueError("entries needs at least one step and finite values")
    exact = entries.double()
    total = exact.pow(2).sum()
    if total == 0:
        raise ValueError("entries are all zero: there is nothing to compare against")
    read = _read_entries(exact, strategy)
    return ((read - exact).pow(2).sum() / total).item()
