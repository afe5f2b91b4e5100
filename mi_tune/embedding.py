"""One embedding path for training, the probe and downstream evaluation.

``hidden_states`` runs the backbone (never the LM head); ``embed_token_ids_multi`` pools chosen layers
(in one or several ways) of one forward pass per batch; ``embed_texts`` does it for a list of texts, batched and sorted by length
with dynamic padding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import log
from .modeling import backbone
from .pooling import pool


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All L+1 hidden states of one forward pass through the backbone (no LM logits). Each (B, T, D)."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return enc["input_ids"]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


ECHO = "echo"  # training-free baseline: the input twice, mean-pooled over the second copy (which has seen the whole first)


def echo_sequences(seqs: list[list[int]], n_prefix: int) -> tuple[list[list[int]], list[int]]:
    """Echo inputs: each sequence followed by a copy of itself without its first ``n_prefix`` (special) tokens, and
    where the copy starts. A causal model's states over the copy have seen the whole sentence once. A text with no
    tokens of its own (only the prefix) has no copy: it is pooled from position 0, i.e. its plain mean."""
    return [s + s[n_prefix:] for s in seqs], [len(s) if len(s) > n_prefix else 0 for s in seqs]


def position_limit(model, tokenizer) -> int | None:
    """How many positions the model takes: the tokenizer's model_max_length when it states one (BERT-style 512),
    else the config's max_position_embeddings; None when neither says."""
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 1_000_000:
        return n
    cfg = getattr(backbone(model), "config", None)
    n = getattr(cfg, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def echo_max_length(max_length: int, n_prefix: int, limit: int | None) -> int:
    """The cut of the first copy so that the doubled sequence (2n - n_prefix tokens) fits in ``limit`` positions."""
    if limit is None or 2 * max_length - n_prefix <= limit:
        return max_length
    return (limit + n_prefix) // 2


def special_prefix_length(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the text (BOS: 1; none: 0)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def length_order(lengths: Sequence[int]) -> np.ndarray:
    """The order sequences are embedded in: longest first (the memory peak shows up at once), ties as given."""
    return np.argsort([-n for n in lengths], kind="stable")


@torch.inference_mode()  # cheaper than no_grad: no version counters or views tracked; outputs leave as numpy
def embed_token_ids_multi(model, seqs: list[list[int]], pad_id: int, layers: Sequence[int], poolings: Sequence[str],
                          batch_size: int = 32, device=None, progress: str | None = None,
                          pool_from: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """{pooling: (N, len(layers), D) float32} for pre-tokenized sequences: every pooling from the SAME forward pass per
    batch. ``pool_from``: per sequence, the first position that is pooled (echo: where the copy starts)."""
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    order = length_order([len(s) for s in seqs])
    out: dict[str, np.ndarray] = {}
    was_training = model.training
    model.eval()
    batches = range(0, len(seqs), batch_size)
    for start in tqdm(batches, desc=progress or "embedding", disable=progress is None, leave=False):
        idx = order[start: start + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        pool_mask = mask
        if pool_from is not None:
            starts = torch.tensor([pool_from[i] for i in idx], device=device).unsqueeze(1)
            pool_mask = mask * (torch.arange(mask.shape[1], device=device).unsqueeze(0) >= starts)
        hs = hidden_states(model, ids, mask)
        for p in poolings:
            emb = torch.stack([pool(hs[l], pool_mask, p) for l in layers], dim=1).float().cpu().numpy()
            if p not in out:
                out[p] = np.empty((len(seqs),) + emb.shape[1:], dtype=np.float32)
            out[p][idx] = emb
    model.train(was_training)
    return out


def embed_token_ids(model, seqs: list[list[int]], pad_id: int, layers: Sequence[int], pooling: str,
                    batch_size: int = 32, device=None, progress: str | None = None) -> np.ndarray:
    """Pooled embeddings (N, len(layers), D) float32 for pre-tokenized sequences, one forward per batch."""
    return embed_token_ids_multi(model, seqs, pad_id, layers, [pooling], batch_size, device, progress)[pooling]


def embed_texts(model, tokenizer, texts: Sequence[str], layer: int = -1, pooling: str = "mean", max_length: int = 128,
                batch_size: int = 32, progress: str | None = None) -> np.ndarray:
    """texts -> (N, D) float32 embeddings of one hidden-state layer. ``pooling="echo"``: each text (cut at max_length)
    is fed twice and its second copy mean-pooled (echo embeddings, Springer et al. 2024, without their prompt)."""
    if pooling == ECHO:
        n_prefix = special_prefix_length(tokenizer)
        limit = position_limit(model, tokenizer)
        cut = echo_max_length(max_length, n_prefix, limit)
        if cut < max_length:
            log(f"echo: texts cut at {cut} tokens instead of max_length={max_length}, so that the text twice "
                f"({2 * cut - n_prefix} tokens) fits the model's {limit} positions")
        seqs, starts = echo_sequences(tokenize(tokenizer, texts, cut), n_prefix)
        return embed_token_ids_multi(model, seqs, tokenizer.pad_token_id, [layer], ["mean"], batch_size, progress=progress,
                                     pool_from=starts)["mean"][:, 0]
    seqs = tokenize(tokenizer, texts, max_length)
    return embed_token_ids(model, seqs, tokenizer.pad_token_id, [layer], pooling, batch_size, progress=progress)[:, 0]
