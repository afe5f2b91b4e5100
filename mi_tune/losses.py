"""The recoverability objective as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bag_of_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int,
                  exclude_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-hot target y in {0,1}^V: 1 iff the token occurs among the real tokens.

    Special and pad tokens (``exclude_ids``) are never targets. (B, T) -> (B, V) float.
    """
    valid = attention_mask.bool()  # (B, T)
    if exclude_ids is not None and exclude_ids.numel():
        valid &= ~torch.isin(input_ids, exclude_ids.to(input_ids.device))
    y = torch.zeros(input_ids.shape[0], vocab_size + 1, device=input_ids.device)  # extra slot collects invalid positions
    ids = input_ids.masked_fill(~valid, vocab_size)  # (B, T)
    y.scatter_(1, ids, 1.0)
    return y[:, :vocab_size]


def recoverability_loss(logits: torch.Tensor, targets: torch.Tensor, positive_weight: float = 1.0) -> torch.Tensor:
    """Bag-of-tokens BCE: sum over the vocabulary / bag size, mean over sentences.

    logits, targets: (B, V). Dividing by |bag| makes the loss "nats per bag token", comparable in
    scale to a next-token loss (so the two weights in a recipe mean something), independent of |V|.
    ``positive_weight`` > 1 up-weights the rare positives (|bag| << |V|).
    """
    pw = None if positive_weight == 1.0 else torch.tensor(positive_weight, device=logits.device, dtype=torch.float32)
    per_elem = F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=pw, reduction="none")  # (B, V)
    bag = targets.sum(1).clamp(min=1)  # (B,)
    return (per_elem.sum(1) / bag).mean()


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Plain causal LM cross-entropy over real tokens. logits: (B, T, V)."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (B, T-1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
