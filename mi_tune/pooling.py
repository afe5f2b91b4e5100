"""pool(hidden, mask, method) -> (B, D). Pure functions; padding side does not matter."""

from __future__ import annotations

import torch

POOLINGS = ("mean", "last", "first", "max", "weighted_mean")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for left or right padding. mask: (B, T) -> (B,)"""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    return (positions * mask.long()).argmax(dim=1)


def first_index(mask: torch.Tensor) -> torch.Tensor:
    return mask.long().argmax(dim=1)  # first 1 in each row


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """hidden: (B, T, D), mask: (B, T) with 1 for real tokens -> (B, D)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if method == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if method == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index(mask)]
    if method == "first":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_index(mask)]
    if method == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    if method == "weighted_mean":
        # SGPT-style position weights 1..n over the real tokens: later tokens of a causal model
        # have seen more of the sentence, so they count more.
        w = torch.cumsum(mask.long(), dim=1).to(hidden.dtype) * mask.to(hidden.dtype)  # (B, T)
        w = (w / w.sum(1, keepdim=True).clamp(min=1)).unsqueeze(-1)
        return (hidden * w).sum(1)
    raise ValueError(f"pooling={method!r} is not one of {POOLINGS}")
